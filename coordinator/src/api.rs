//! The job API of a coordinator: submit, label, cancel, delete, list and status, with
//! one error type ([`CoordinatorError`]). The gRPC services (`service.rs`) and the
//! HTTP layer (`http.rs`) adapt it and add nothing of their own.
use defuse_core::config::JobConfig;
use defuse_core::scenarios::{self, Scenario};
use defuse_proto::trace::{self, TraceParent};
use defuse_proto::{JobStatus, StepProgress, MAX_MESSAGE_BYTES};

use crate::error::CoordinatorError;
use crate::keys::{self, files};
use crate::lifecycle::{JobState, Phase};
use crate::state::Coordinator;
use crate::store::{now_ms, JobRecord, Stage, StoreError};

/// Jobs per page of a listing, by default and at most.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

impl Coordinator {
    /// A page of the jobs, in id order after `after`: at most `limit` (1..=1000) and the id to go on from
    /// (empty on the last page). Only the page's records are read.
    pub async fn jobs_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, String), StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let ids: Vec<String> = self
            .inner
            .store
            .job_ids()
            .await?
            .into_iter()
            .filter(|id| id.as_str() > after)
            .collect();
        let mut jobs = Vec::new();
        for id in ids.iter().take(limit) {
            if let Some(r) = self.inner.store.get_job(id).await? {
                jobs.push(r);
            }
        }
        let next = if ids.len() > limit {
            ids[limit - 1].clone()
        } else {
            String::new()
        };
        Ok((jobs, next))
    }

    /// A job's record, or `NotFound`.
    pub(crate) async fn job(&self, job: &str) -> Result<JobRecord, CoordinatorError> {
        self.inner
            .store
            .get_job(job)
            .await?
            .ok_or_else(|| CoordinatorError::not_found(format!("no job {job}")))
    }

    /// Whether a client may upload `name` for the job it is about to submit as `job`
    /// (checked before any byte is read).
    pub async fn check_upload(&self, job: &str, name: &str) -> Result<(), CoordinatorError> {
        if !valid_id(job) {
            return Err(CoordinatorError::invalid(format!(
                "job id '{job}': use letters, digits, '-' and '_' only"
            )));
        }
        if !defuse_core::sources::valid_upload_name(name) {
            return Err(CoordinatorError::invalid(format!(
                "upload '{name}': expected a plain file name (no '/', not hidden, at most 200 bytes)"
            )));
        }
        if self.inner.store.get_job(job).await?.is_some() {
            return Err(CoordinatorError::conflict(format!(
                "job {job} exists: files are uploaded before their job is submitted"
            )));
        }
        Ok(())
    }

    /// Stores an uploaded file (received into `path`, of SHA-256 `sha256`) with the job
    /// `job` to come; returns what its config names it by.
    pub async fn store_upload(
        &self,
        job: &str,
        name: &str,
        path: &std::path::Path,
        sha256: &str,
    ) -> Result<String, CoordinatorError> {
        self.check_upload(job, name).await?;
        let u = defuse_core::sources::Upload {
            sha256: sha256.into(),
            name: name.into(),
        };
        self.inner
            .artifacts
            .put_file(&keys::upload(job, &u), path)
            .await
            .map_err(|e| CoordinatorError::unavailable(e.to_string()))?;
        tracing::info!(job, name, sha256, "input uploaded");
        Ok(u.url())
    }

    /// Deletes a finished job: its artifacts (`jobs/<job>/`), its
    /// cached folder, then its state. Returns how many objects were removed.
    pub async fn delete(&self, job: &str) -> Result<u32, CoordinatorError> {
        let rec = self.job(job).await?;
        if !rec.state.is_final() {
            return Err(CoordinatorError::conflict(format!(
                "job {job} is {}: cancel it first",
                rec.state.as_str()
            )));
        }
        // until the leader has retired it, a central step of the job may still write
        let active = self.inner.store.active_jobs().await?;
        if active.iter().any(|j| j.id == job) {
            return Err(CoordinatorError::conflict(format!(
                "job {job} ended a moment ago: delete it in a few seconds"
            )));
        }
        let n = crate::driver::delete_job(self, &rec)
            .await
            .map_err(|e| CoordinatorError::unavailable(e.to_string()))?;
        tracing::info!(job = %job, objects = n, "job deleted");
        Ok(n)
    }

    /// One pass of the driver (leader election, then every job moved on as the
    /// leader); returns whether this coordinator leads. `serve` runs it every
    /// `tick_ms`; tests call it to step a coordinator by hand.
    pub async fn tick(&self) -> Result<bool, StoreError> {
        crate::driver::tick(self).await
    }

    /// Validates and records a job; nothing runs before the driver picks it up.
    pub async fn submit(
        &self,
        config_toml: &str,
        job_id: Option<String>,
    ) -> Result<String, CoordinatorError> {
        self.submit_traced(config_toml, job_id, None).await
    }

    /// [`Coordinator::submit`] under the caller's trace context (the `traceparent` it
    /// sent): the job becomes a trace of its own inside the caller's, or a new trace.
    pub async fn submit_traced(
        &self,
        config_toml: &str,
        job_id: Option<String>,
        caller: Option<TraceParent>,
    ) -> Result<String, CoordinatorError> {
        if config_toml.len() > MAX_MESSAGE_BYTES {
            return Err(CoordinatorError::invalid("config larger than 4 MiB"));
        }
        let mut cfg: JobConfig = toml::from_str(config_toml)
            .map_err(|e| CoordinatorError::invalid(format!("job config: {e}")))?;
        cfg.validate()
            .map_err(|e| CoordinatorError::invalid(format!("job config: {e}")))?;
        // before anything looks at the disk, so a refused path tells nothing of it
        if let Some(roots) = &self.inner.cfg.allowed_roots {
            crate::paths::check_job(&cfg, roots)?;
        }
        if !cfg.data.in_bucket() && !cfg.data.path.is_dir() {
            return Err(CoordinatorError::invalid(format!(
                "job config: data.path {} is not a folder on the coordinator",
                cfg.data.path.display()
            )));
        }
        let name = cfg.name.clone().unwrap_or_else(|| "job".into());
        let id = match job_id.filter(|s| !s.is_empty()) {
            Some(id) if valid_id(&id) => id,
            Some(id) => {
                return Err(CoordinatorError::invalid(format!(
                    "job id '{id}': use letters, digits, '-' and '_' only"
                )))
            }
            None => format!(
                "{}-{:x}{:04x}",
                sanitize(&name),
                now_ms(),
                rand::random::<u16>()
            ),
        };
        cfg.name = Some(name.clone());
        let now = now_ms();
        let rec = JobRecord {
            id: id.clone(),
            name,
            state: JobState::Queued,
            step: Phase::Models,
            config_toml: toml::to_string(&cfg)
                .map_err(|e| CoordinatorError::internal(e.to_string()))?,
            n_shards: 0,
            error: String::new(),
            error_kind: None,
            created_ms: now,
            updated_ms: now,
            // with an exporter, the submit handler's own span (itself the caller's
            // child); else the caller's trace, or a new one
            trace_parent: trace::current()
                .or_else(|| caller.map(|c| c.child()))
                .unwrap_or_else(TraceParent::random)
                .to_string(),
        };
        match self.inner.store.create_job(&rec).await {
            Ok(()) => {}
            // the same job submitted again under its id (a retried `submit --wait`, a
            // Kubernetes runner pod restarted) is the job already there
            Err(crate::store::StoreError::Exists(_)) => {
                return match self.inner.store.get_job(&id).await? {
                    Some(old) if old.config_toml == rec.config_toml => {
                        tracing::info!(job = %id, "job submitted again with the same config");
                        Ok(id)
                    }
                    _ => Err(CoordinatorError::Exists(format!(
                        "job {id} exists already with another config (delete it, or choose another id)"
                    ))),
                };
            }
            Err(e) => return Err(e.into()),
        }
        // workers told "idle" at the last tick hear of this job at once
        if let Some(n) = self.inner.local().unfinished.as_mut() {
            *n += 1;
        }
        tracing::info!(job = %id, trace_id = %trace_id_of(&rec), "job submitted");
        Ok(id)
    }

    /// Stores the labels of a job waiting for them: validated against its scenarios
    /// and classes, all or nothing, never over labels already given. Scenarios left
    /// out are discarded. Returns (labelled, discarded).
    pub async fn set_labels(
        &self,
        job: &str,
        pairs: &[(String, String)],
    ) -> Result<(usize, usize), CoordinatorError> {
        let rec = self.job(job).await?;
        if rec.state != JobState::AwaitingLabels {
            return Err(CoordinatorError::conflict(format!(
                "job {job} is {}, not awaiting_labels",
                rec.state.as_str()
            )));
        }
        let (scenarios, classes) = self.scenarios(&rec).await?;
        let mut labels = scenarios::validate_labels(
            pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &scenarios,
            &classes,
        )
        .map_err(CoordinatorError::invalid)?;
        for s in &scenarios {
            labels.entry(s.id).or_insert(scenarios::Label::Discard);
        }
        let labelled = labels
            .values()
            .filter(|l| matches!(l, scenarios::Label::Class(_)))
            .count();
        if labelled == 0 {
            // labels are final: refuse what would leave nothing to correct
            return Err(CoordinatorError::invalid(
                "no scenario would have a class label: give at least one (labels are final)",
            ));
        }
        // stored once, atomically, in the state store: final across restarts
        let json = scenarios::labels_json(&labels);
        if !self
            .inner
            .store
            .put_labels(job, &json)
            .await
            .map_err(CoordinatorError::from)?
        {
            return Err(CoordinatorError::conflict(format!(
                "job {job} is labelled already"
            )));
        }
        tracing::info!(job = %job, labelled, discarded = labels.len() - labelled, "labels stored");
        Ok((labelled, labels.len() - labelled))
    }

    /// Cancels a job: it ends, with every shard it has pending or leased (identify,
    /// the round it is in); its central step stops at the driver's next tick.
    /// Returns the job's state (a job that had ended keeps its own).
    pub async fn cancel(&self, job: &str) -> Result<JobState, CoordinatorError> {
        // a job the store does not have was never there (or was deleted): NotFound
        self.inner
            .store
            .cancel(job, now_ms())
            .await
            .map_err(|e| match e {
                StoreError::Lost(_) => CoordinatorError::not_found(format!("no job {job}")),
                e => e.into(),
            })?;
        let rec = self.job(job).await?;
        tracing::info!(job = %job, state = rec.state.as_str(), "cancel");
        Ok(rec.state)
    }

    /// A file of a job's folder (`keys::files`), from its durable copy in the
    /// artifact store (from the folder itself in the embedded mode): what any
    /// coordinator can read, whatever its disk holds.
    pub async fn job_file(
        &self,
        rec: &JobRecord,
        rel: &str,
    ) -> Result<bytes::Bytes, CoordinatorError> {
        if self.inner.cfg.use_job_out {
            let path = self.job_dir_of(rec)?.join(rel);
            return tokio::fs::read(&path)
                .await
                .map(Into::into)
                .map_err(|e| CoordinatorError::conflict(format!("{}: {e}", path.display())));
        }
        match self
            .inner
            .artifacts
            .get(&keys::folder_file(&rec.id, rel))
            .await
        {
            Ok(b) => Ok(b),
            Err(e @ defuse_core::artifacts::ArtifactError::NotFound { .. }) => Err(
                CoordinatorError::conflict(format!("job {}: {rel} not written yet ({e})", rec.id)),
            ),
            Err(e) => Err(CoordinatorError::unavailable(e.to_string())),
        }
    }

    /// The results a job has now, by name: files of its folder (`RESULT_FILES`, those
    /// written so far) and, once done, the fine-tuned model (`model/<file>`).
    pub async fn results(&self, job: &str) -> Result<Vec<String>, CoordinatorError> {
        let rec = self.job(job).await?;
        let mut names = Vec::new();
        for rel in RESULT_FILES {
            let written = if self.inner.cfg.use_job_out {
                self.job_dir_of(&rec)?.join(rel).is_file()
            } else {
                self.inner
                    .artifacts
                    .exists(&keys::folder_file(job, rel))
                    .await
                    .map_err(|e| CoordinatorError::unavailable(e.to_string()))?
            };
            if written {
                names.push(rel.to_string());
            }
        }
        if !self.inner.cfg.use_job_out {
            let prefix = keys::final_model(job, "");
            let models = self
                .inner
                .artifacts
                .list(&prefix)
                .await
                .map_err(|e| CoordinatorError::unavailable(e.to_string()))?;
            for key in models {
                if let Some(file) = key.strip_prefix(&prefix) {
                    names.push(format!("{MODEL_DIR}{file}"));
                }
            }
        }
        Ok(names)
    }

    /// One result of [`Coordinator::results`], by name.
    pub async fn result(&self, job: &str, name: &str) -> Result<bytes::Bytes, CoordinatorError> {
        let rec = self.job(job).await?;
        if let Some(file) = name.strip_prefix(MODEL_DIR) {
            if file.is_empty() || file.contains('/') || self.inner.cfg.use_job_out {
                return Err(CoordinatorError::not_found(format!(
                    "job {job}: no result {name}"
                )));
            }
            return match self
                .inner
                .artifacts
                .get(&keys::final_model(job, file))
                .await
            {
                Ok(b) => Ok(b),
                Err(defuse_core::artifacts::ArtifactError::NotFound { .. }) => Err(
                    CoordinatorError::not_found(format!("job {job}: no result {name}")),
                ),
                Err(e) => Err(CoordinatorError::unavailable(e.to_string())),
            };
        }
        if !RESULT_FILES.contains(&name) {
            return Err(CoordinatorError::not_found(format!(
                "job {job}: no result {name} (results: {})",
                RESULT_FILES.join(", ")
            )));
        }
        self.job_file(&rec, name).await.map_err(|e| match e {
            CoordinatorError::Conflict(m) => CoordinatorError::not_found(m),
            e => e,
        })
    }

    /// A job's scenarios and class names, as its distill step left them.
    pub async fn scenarios(
        &self,
        rec: &JobRecord,
    ) -> Result<(Vec<Scenario>, Vec<String>), CoordinatorError> {
        let scenarios: Vec<Scenario> =
            serde_json::from_slice(&self.job_file(rec, files::SCENARIOS).await?)
                .map_err(|e| CoordinatorError::internal(format!("scenarios of {}: {e}", rec.id)))?;
        let classes: Vec<String> =
            serde_json::from_slice(&self.job_file(rec, files::CLASSES).await?)
                .map_err(|e| CoordinatorError::internal(format!("classes of {}: {e}", rec.id)))?;
        Ok((scenarios, classes))
    }

    /// A job's status. `with_summary`: with the report's `summary.json` once done (one
    /// read of the artifact store); listings leave it out, so a page of jobs stays
    /// small (and the error is cut to 4 KiB in both).
    pub(crate) async fn status_of(&self, rec: &JobRecord, with_summary: bool) -> JobStatus {
        let mut steps = Vec::new();
        let order = ["models", "identify", "finish"];
        let round = rec.step.round();
        let at = match rec.step {
            Phase::Models => 0,
            Phase::Identify => 1,
            _ => 2,
        };
        for (i, step) in order.iter().enumerate() {
            let state = if rec.state == JobState::Done || i < at {
                "done"
            } else if i > at {
                "pending"
            } else {
                match rec.state {
                    JobState::Failed => "failed",
                    JobState::Cancelled => "cancelled",
                    JobState::AwaitingLabels => "awaiting_labels",
                    JobState::Queued => "pending",
                    _ => "running",
                }
            };
            let mut p = StepProgress {
                step: step.to_string(),
                state: state.into(),
                ..Default::default()
            };
            if *step == "identify" {
                if let Ok(c) = self.inner.store.counts(&rec.id, Stage::Identify).await {
                    set_counts(&mut p, &c);
                }
            }
            steps.push(p);
        }
        if let Some(r) = round {
            let state = match rec.state {
                JobState::Failed => "failed",
                JobState::Cancelled => "cancelled",
                _ => "running",
            };
            let mut p = StepProgress {
                step: "finetune".into(),
                state: state.into(),
                ..Default::default()
            };
            if let Ok(c) = self
                .inner
                .store
                .counts(&rec.id, Stage::Round(r as u32))
                .await
            {
                set_counts(&mut p, &c);
            }
            // any coordinator can say it: the plan is read through its cache
            let rounds = self
                .rounds_plan(rec)
                .await
                .map(|p| p.rounds.to_string())
                .unwrap_or_else(|_| "?".into());
            let last = self.inner.local().last_round.get(&rec.id).cloned();
            p.detail = match last {
                Some(e) => format!(
                    "round {}/{rounds}; last round ce_train {:.4}, ce_scenario {:.4}",
                    r + 1,
                    e.ce_train,
                    e.ce_scenario
                ),
                None => format!("round {}/{rounds}", r + 1),
            };
            steps.push(p);
        }
        let summary_json = if with_summary && rec.state == JobState::Done {
            self.inner
                .artifacts
                .get(&keys::result(&rec.id, files::SUMMARY))
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        // labels given but not yet picked up by the driver: the job is about to resume
        let labelled = rec.state == JobState::AwaitingLabels
            && matches!(self.inner.store.labels(&rec.id).await, Ok(Some(_)));
        JobStatus {
            labelled,
            job_id: rec.id.clone(),
            name: rec.name.clone(),
            state: rec.state.as_str().into(),
            step: rec.step.to_string(),
            error: bounded(&rec.error, MAX_ERROR_BYTES),
            steps,
            summary_json,
            created_ms: rec.created_ms,
            updated_ms: rec.updated_ms,
            trace_id: trace_id_of(rec),
            error_kind: rec
                .error_kind
                .map_or(String::new(), |k| k.as_str().to_string()),
        }
    }
}

/// A job's trace id (32 hex digits; empty for a job stored without one).
pub fn trace_id_of(rec: &JobRecord) -> String {
    TraceParent::parse(&rec.trace_parent)
        .map(|t| t.trace_hex())
        .unwrap_or_default()
}

/// A step's shard counts, as a status carries them.
fn set_counts(p: &mut StepProgress, c: &crate::store::ShardCounts) {
    p.shards_total = c.total as u64;
    p.shards_pending = c.pending as u64;
    p.shards_leased = c.leased as u64;
    p.shards_done = c.done as u64;
    p.shards_failed = c.failed as u64;
}

/// The files of a job's folder that are its results, under these names (the same
/// relative paths as in a `defuse run` output folder).
pub const RESULT_FILES: &[&str] = &[
    files::SUMMARY,
    files::REPORT,
    files::FAILURES,
    files::ASSIGNMENTS,
    files::FAILURES_TABLE,
    files::SCENARIOS,
    files::CLASSES,
    files::LABELS,
];

/// Results under this prefix are the fine-tuned classifier, by its file name.
pub const MODEL_DIR: &str = "model/";

/// A job's status as JSON: the one shape of `GET /api/jobs/<id>`, each entry of
/// `GET /api/jobs`, and `defuse status --json`.
pub fn job_json(st: &JobStatus) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = st
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "step": s.step, "state": s.state,
                "shards": {"total": s.shards_total, "pending": s.shards_pending,
                           "leased": s.shards_leased, "done": s.shards_done, "failed": s.shards_failed},
                "detail": s.detail,
            })
        })
        .collect();
    let summary: Option<serde_json::Value> = serde_json::from_str(&st.summary_json).ok();
    serde_json::json!({
        "id": st.job_id, "name": st.name, "state": st.state, "step": st.step,
        "error": st.error, "steps": steps, "summary": summary,
        "created_ms": st.created_ms, "updated_ms": st.updated_ms, "labelled": st.labelled,
        "trace_id": st.trace_id,
        "error_kind": (!st.error_kind.is_empty()).then_some(&st.error_kind),
    })
}

/// The longest error a status carries.
const MAX_ERROR_BYTES: usize = 4096;

/// `s` cut to at most `max` bytes, on a character boundary, marked when cut.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &s[..end], s.len() - end)
}

pub(crate) fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn sanitize(s: &str) -> String {
    let v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    if v.is_empty() {
        "job".into()
    } else {
        v
    }
}
