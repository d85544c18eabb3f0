//! The gRPC services (workers, clients) over the store, and the coordinator's shared
//! state.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use defuse_core::artifacts::ArtifactStore;
use defuse_core::config::JobConfig;
use defuse_core::scenarios::{self, Scenario};
use defuse_proto::job_service_server::{JobService, JobServiceServer};
use defuse_proto::worker_service_server::{WorkerService, WorkerServiceServer};
use defuse_proto::*;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::keys::{self, files};
use crate::lifecycle::{JobState, Phase};
use crate::store::{
    now_ms, Attempt, FailOutcome, Failure, Fenced, JobRecord, StateStore, StoreError,
};

/// Settings of a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A lease lasts this long without a heartbeat.
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    /// Attempts per shard before the job fails.
    pub max_attempts: u32,
    /// Period of the driver loop (and reaper).
    pub tick_ms: u64,
    /// The leader lease lasts this long without a renewal (renewed every tick): how
    /// long other coordinators wait before taking over from a dead leader.
    pub leader_ms: u64,
    /// Where central steps keep a job's files: `<work_dir>/<job id>/`.
    pub work_dir: PathBuf,
    /// Embedded mode: a job's files go to its config's `out` folder instead.
    pub use_job_out: bool,
    /// When set, every gRPC call and HTTP request (but health checks) must carry it.
    pub token: Option<defuse_proto::auth::Secret>,
    /// When set, gRPC and HTTP are served over TLS with this certificate.
    pub tls: Option<defuse_proto::tls::ServerPem>,
    /// Retention of finished jobs: at most this many are kept (the oldest are deleted,
    /// state and artifacts)...
    pub keep_jobs: usize,
    /// ...and none longer than this after it finished (ms).
    pub keep_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease_ms: 15_000,
            heartbeat_ms: 2_000,
            max_attempts: 3,
            tick_ms: 500,
            leader_ms: 10_000,
            work_dir: PathBuf::from("coordinator-work"),
            use_job_out: false,
            token: None,
            tls: None,
            keep_jobs: 1000,
            keep_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// The plan of a job's identify step, kept in the artifact store (`jobs/<id>/plan.json`)
/// so a restarted coordinator finds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub ranges: Vec<(u64, u64)>,
    pub classifier_key: String,
    pub vae_key: String,
    pub vae_decoder_key: String,
    /// When identify was planned (ms since the epoch): its duration is measured from here.
    #[serde(default)]
    pub planned_ms: u64,
}

pub(crate) struct Inner {
    pub cfg: CoordinatorConfig,
    /// This process's name in the leader election (host name and a random part).
    pub node: String,
    /// The fencing token while this coordinator leads, 0 while it follows.
    pub leading: std::sync::atomic::AtomicU64,
    pub store: Arc<dyn StateStore>,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Jobs whose central step runs now in this process, with the handle that stops
    /// it (a job cancelled meanwhile).
    pub in_flight: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Jobs this process has seen: one missing from the store was lost.
    pub known: Mutex<HashSet<String>>,
    pub plans: Mutex<HashMap<String, Arc<Plan>>>,
    pub round_plans: Mutex<HashMap<String, Arc<crate::rounds::RoundsPlan>>>,
    /// The losses of each job's last merged round, for status (a cache: they are in
    /// the artifact store, `keys::round_stats`).
    pub last_round: Mutex<HashMap<String, defuse_core::correct::CorrectEpoch>>,
    /// Central steps that failed with a retryable error: (tries, not before).
    pub retries: Mutex<HashMap<String, (u32, std::time::Instant)>>,
    /// The jobs with shards to lease, as the driver last listed them (None before its
    /// first tick): a lease reads this instead of listing every job in the store.
    pub leasable: Mutex<Option<Arc<Vec<JobRecord>>>>,
}

/// Jobs per page of a listing, by default and at most.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// What a leased shard's task is built from.
enum TaskSource {
    Identify(Arc<Plan>),
    Round(Arc<crate::rounds::RoundsPlan>),
}

/// A job whose shards workers lease now: identify, or a fine-tune round.
pub(crate) fn is_leasable(j: &JobRecord) -> bool {
    j.state == JobState::Running && j.step.leasable()
}

/// A coordinator: clone it freely.
#[derive(Clone)]
pub struct Coordinator {
    pub(crate) inner: Arc<Inner>,
}

impl Coordinator {
    pub fn new(
        cfg: CoordinatorConfig,
        store: Arc<dyn StateStore>,
        artifacts: Arc<dyn ArtifactStore>,
    ) -> Self {
        Coordinator {
            inner: Arc::new(Inner {
                cfg,
                node: defuse_core::fresh_process_id(),
                leading: std::sync::atomic::AtomicU64::new(0),
                store,
                artifacts,
                in_flight: Mutex::new(HashMap::new()),
                known: Mutex::new(HashSet::new()),
                plans: Mutex::new(HashMap::new()),
                round_plans: Mutex::new(HashMap::new()),
                last_round: Mutex::new(HashMap::new()),
                retries: Mutex::new(HashMap::new()),
                leasable: Mutex::new(None),
            }),
        }
    }

    /// A page of the jobs people submitted (without the fine-tune rounds' sub-jobs),
    /// in id order after `after`: at most `limit` (1..=1000) and the id to go on from
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
            .filter(|id| id.as_str() > after && crate::rounds::parse_sub_job(id).is_none())
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
    async fn job(&self, job: &str) -> Result<JobRecord, CoordinatorError> {
        self.inner
            .store
            .get_job(job)
            .await?
            .ok_or_else(|| CoordinatorError::not_found(format!("no job {job}")))
    }

    /// Deletes a finished job: its round sub-jobs, its artifacts (`jobs/<job>/`), its
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

    /// Drops what this process caches of a job (a deleted job).
    pub(crate) fn forget(&self, job: &str) {
        let i = &self.inner;
        i.known.lock().unwrap().remove(job);
        i.plans.lock().unwrap().remove(job);
        i.round_plans.lock().unwrap().remove(job);
        i.last_round.lock().unwrap().remove(job);
        i.retries.lock().unwrap().remove(job);
    }

    /// This coordinator's name in the leader election.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.inner.store
    }

    pub fn artifacts(&self) -> &Arc<dyn ArtifactStore> {
        &self.inner.artifacts
    }

    /// Validates and records a job; nothing runs before the driver picks it up.
    pub async fn submit(
        &self,
        config_toml: &str,
        job_id: Option<String>,
    ) -> Result<String, CoordinatorError> {
        if config_toml.len() > MAX_MESSAGE_BYTES {
            return Err(CoordinatorError::invalid("config larger than 4 MiB"));
        }
        let mut cfg: JobConfig = toml::from_str(config_toml)
            .map_err(|e| CoordinatorError::invalid(format!("job config: {e}")))?;
        cfg.validate()
            .map_err(|e| CoordinatorError::invalid(format!("job config: {e}")))?;
        if !cfg.data.path.is_dir() {
            return Err(CoordinatorError::invalid(format!(
                "job config: data.path {} is not a folder on the coordinator",
                cfg.data.path.display()
            )));
        }
        let name = cfg.name.clone().unwrap_or_else(|| "job".into());
        let id = match job_id.filter(|s| !s.is_empty()) {
            Some(id) if id.contains("--round-") => {
                return Err(CoordinatorError::invalid(format!(
                    "job id '{id}': '--round-' is kept for fine-tune rounds"
                )))
            }
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
            created_ms: now,
            updated_ms: now,
        };
        self.inner
            .store
            .create_job(&rec)
            .await
            .map_err(CoordinatorError::from)?;
        tracing::info!(job = %id, "job submitted");
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

    /// The folder of a job's central files.
    pub fn job_dir_of(&self, rec: &JobRecord) -> Result<PathBuf, CoordinatorError> {
        let cfg: JobConfig = toml::from_str(&rec.config_toml)
            .map_err(|e| CoordinatorError::internal(format!("config of job {}: {e}", rec.id)))?;
        Ok(self.job_dir(rec, &cfg))
    }

    pub(crate) fn job_dir(&self, rec: &JobRecord, cfg: &JobConfig) -> PathBuf {
        if self.inner.cfg.use_job_out {
            cfg.out_dir()
        } else {
            self.inner.cfg.work_dir.join(&rec.id)
        }
    }

    /// The task of a fine-tune part: train from round `r`'s checkpoint.
    fn finetune_task(
        &self,
        rec: &JobRecord,
        plan: &crate::rounds::RoundsPlan,
        lease: &crate::store::Lease,
    ) -> Result<Response<LeaseResponse>, Status> {
        let (job, round) = crate::rounds::parse_sub_job(&rec.id)
            .ok_or_else(|| Status::internal(format!("{} is not a round", rec.id)))?;
        Ok(Response::new(LeaseResponse {
            task: Some(Task {
                task: Some(TaskRef {
                    job: rec.id.clone(),
                    step: "finetune".into(),
                    shard: lease.shard,
                    attempt: lease.attempt,
                }),
                config_toml: rec.config_toml.clone(),
                classifier_key: keys::checkpoint(job, round, &plan.extension),
                scenario_key: plan.scenario_key.clone(),
                round: round as u32,
                model_extension: plan.extension.clone(),
                output_key: keys::part_output(
                    job,
                    round,
                    lease.shard,
                    lease.attempt,
                    &plan.extension,
                ),
                ..Default::default()
            }),
            retry_after_ms: 0,
        }))
    }

    /// The identify plan of `rec` (cached; a cached plan older than the job is of a
    /// job deleted and submitted again under the same id, and is read again).
    pub(crate) async fn plan(&self, rec: &JobRecord) -> Result<Arc<Plan>, CoordinatorError> {
        let job = rec.id.as_str();
        if let Some(p) = self.inner.plans.lock().unwrap().get(job) {
            if p.planned_ms >= rec.created_ms {
                return Ok(p.clone());
            }
        }
        let bytes = self
            .inner
            .artifacts
            .get(&keys::plan(job))
            .await
            .map_err(|e| CoordinatorError::unavailable(e.to_string()))?;
        let plan: Plan = serde_json::from_slice(&bytes)
            .map_err(|e| CoordinatorError::internal(format!("plan of job {job}: {e}")))?;
        let plan = Arc::new(plan);
        self.inner
            .plans
            .lock()
            .unwrap()
            .insert(job.into(), plan.clone());
        Ok(plan)
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
                if let Ok(c) = self.inner.store.counts(&rec.id).await {
                    p.shards_total = c.total as u64;
                    p.shards_pending = c.pending as u64;
                    p.shards_leased = c.leased as u64;
                    p.shards_done = c.done as u64;
                    p.shards_failed = c.failed as u64;
                }
            }
            steps.push(p);
        }
        if let Some(r) = round {
            let sub = crate::rounds::sub_job(&rec.id, r);
            let mut p = StepProgress {
                step: "finetune".into(),
                state: "running".into(),
                ..Default::default()
            };
            if let Ok(c) = self.inner.store.counts(&sub).await {
                p.shards_total = c.total as u64;
                p.shards_pending = c.pending as u64;
                p.shards_leased = c.leased as u64;
                p.shards_done = c.done as u64;
                p.shards_failed = c.failed as u64;
            }
            let rounds = self
                .inner
                .round_plans
                .lock()
                .unwrap()
                .get(&rec.id)
                .map(|p| p.rounds.to_string())
                .unwrap_or_else(|| "?".into());
            let last = self.inner.last_round.lock().unwrap().get(&rec.id).cloned();
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
        JobStatus {
            job_id: rec.id.clone(),
            name: rec.name.clone(),
            state: rec.state.as_str().into(),
            step: rec.step.to_string(),
            error: bounded(&rec.error, MAX_ERROR_BYTES),
            steps,
            summary_json,
            created_ms: rec.created_ms,
            updated_ms: rec.updated_ms,
        }
    }
}

/// The job a metric is labelled with: a round's parent, so rounds add no series.
fn metric_job(id: &str) -> &str {
    crate::rounds::parse_sub_job(id).map_or(id, |(job, _)| job)
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

/// The attempt a worker's task reference names.
fn attempt_of<'a>(t: &'a TaskRef, worker: &'a str) -> Attempt<'a> {
    Attempt {
        job: &t.job,
        shard: t.shard,
        attempt: t.attempt,
        worker,
    }
}

fn valid_id(s: &str) -> bool {
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
    // no "--" in a generated id: "<job>--round-<r>" names fine-tune rounds
    let mut v = v;
    while v.contains("--") {
        v = v.replace("--", "-");
    }
    if v.is_empty() {
        "job".into()
    } else {
        v
    }
}

pub(crate) fn store_status(e: StoreError) -> Status {
    CoordinatorError::from(e).into()
}

#[tonic::async_trait]
impl WorkerService for Coordinator {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(worker = %r.worker_id, version = r.protocol_version, "worker refused: protocol version");
            return Err(Status::failed_precondition(format!(
                "worker {} speaks protocol version {}, this coordinator speaks {}: run a worker of the coordinator's release",
                r.worker_id, r.protocol_version, PROTOCOL_VERSION
            )));
        }
        if !valid_id(&r.worker_id.replace('.', "-")) {
            return Err(Status::invalid_argument(
                "worker_id: letters, digits, '.', '-' and '_' only",
            ));
        }
        let info = serde_json::json!({"host": r.host, "device": r.device, "memory_bytes": r.memory_bytes, "threads": r.threads});
        self.inner
            .store
            .register_worker(&r.worker_id, &info.to_string(), now_ms())
            .await
            .map_err(store_status)?;
        tracing::info!(worker = %r.worker_id, device = %r.device, "worker registered");
        Ok(Response::new(RegisterResponse {
            heartbeat_ms: self.inner.cfg.heartbeat_ms,
            lease_ms: self.inner.cfg.lease_ms,
            artifacts_url: self.inner.artifacts.url(),
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        let worker = req.into_inner().worker_id;
        let now = now_ms();
        if !self
            .inner
            .store
            .touch_worker(&worker, now)
            .await
            .map_err(store_status)?
        {
            return Err(Status::failed_precondition(format!(
                "unknown worker {worker}: register first"
            )));
        }
        let cached = self.inner.leasable.lock().unwrap().clone();
        let jobs = match cached {
            Some(j) => j,
            None => Arc::new(self.inner.store.active_jobs().await.map_err(store_status)?),
        };
        for rec in jobs.iter().filter(|j| is_leasable(j)) {
            // what the task needs is read before the lease is taken: a failed read
            // leaves the shard pending and burns no attempt
            let source = if rec.step == Phase::RoundParts {
                let Some((job, _)) = crate::rounds::parse_sub_job(&rec.id) else {
                    continue;
                };
                match crate::rounds::plan(self, job).await {
                    Ok(p) => TaskSource::Round(p),
                    Err(e) => {
                        tracing::warn!(job = %rec.id, error = %e, "fine-tune plan unreadable: leasing from other jobs");
                        continue;
                    }
                }
            } else {
                match self.plan(rec).await {
                    Ok(p) => TaskSource::Identify(p),
                    Err(e) => {
                        tracing::warn!(job = %rec.id, error = %e, "plan unreadable: leasing from other jobs");
                        continue;
                    }
                }
            };
            let started = std::time::Instant::now();
            let r = self
                .inner
                .store
                .lease(&rec.id, &worker, now, self.inner.cfg.lease_ms)
                .await;
            crate::metrics::store_call("lease", started.elapsed().as_secs_f64(), r.is_ok());
            let lease = match r {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => return Err(store_status(e)),
            };
            tracing::info!(job = %rec.id, shard = lease.shard, attempt = lease.attempt, worker = %worker, "shard leased");
            crate::metrics::lease(metric_job(&rec.id));
            let plan = match source {
                TaskSource::Round(plan) => return self.finetune_task(rec, &plan, &lease),
                TaskSource::Identify(plan) => plan,
            };
            let (start, end) = *plan
                .ranges
                .get(lease.shard as usize)
                .ok_or_else(|| Status::internal("shard outside the plan"))?;
            return Ok(Response::new(LeaseResponse {
                task: Some(Task {
                    task: Some(TaskRef {
                        job: rec.id.clone(),
                        step: "identify".into(),
                        shard: lease.shard,
                        attempt: lease.attempt,
                    }),
                    config_toml: rec.config_toml.clone(),
                    start,
                    end,
                    classifier_key: plan.classifier_key.clone(),
                    vae_key: plan.vae_key.clone(),
                    vae_decoder_key: plan.vae_decoder_key.clone(),
                    output_key: keys::shard_output(&rec.id, lease.shard, lease.attempt),
                    ..Default::default()
                }),
                retry_after_ms: 0,
            }));
        }
        Ok(Response::new(LeaseResponse {
            task: None,
            retry_after_ms: 300,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let now = now_ms();
        if !self
            .inner
            .store
            .touch_worker(&r.worker_id, now)
            .await
            .map_err(store_status)?
        {
            return Ok(Response::new(HeartbeatResponse {
                verdicts: vec![],
                reregister: true,
            }));
        }
        let mut verdicts = Vec::new();
        for t in &r.running {
            let v = match self
                .inner
                .store
                .renew(&attempt_of(t, &r.worker_id), now, self.inner.cfg.lease_ms)
                .await
            {
                Ok(Fenced::Accepted) => TaskVerdict::Continue,
                Ok(Fenced::Stale) | Err(StoreError::Lost(_)) => TaskVerdict::Abandon,
                Err(e) => return Err(store_status(e)),
            };
            verdicts.push(v as i32);
        }
        Ok(Response::new(HeartbeatResponse {
            verdicts,
            reregister: false,
        }))
    }

    async fn complete(
        &self,
        req: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let r = req.into_inner();
        let t = r
            .task
            .ok_or_else(|| Status::invalid_argument("task missing"))?;
        // the output must be the one of this attempt
        let expected = match crate::rounds::parse_sub_job(&t.job) {
            Some((job, round)) => {
                let plan = crate::rounds::plan(self, job)
                    .await
                    .map_err(Status::unavailable)?;
                keys::part_output(job, round, t.shard, t.attempt, &plan.extension)
            }
            None => keys::shard_output(&t.job, t.shard, t.attempt),
        };
        if r.output_key != expected {
            return Err(Status::invalid_argument(format!(
                "output key {} is not the key of attempt {}",
                r.output_key, t.attempt
            )));
        }
        if t.step == "finetune" {
            // a part's losses go beside its checkpoint before it is accepted: the
            // round's history survives a restart of the coordinator
            self.inner
                .artifacts
                .put(
                    &keys::part_stats(&r.output_key),
                    r.stats_json.clone().into(),
                )
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        let started = std::time::Instant::now();
        let f = self
            .inner
            .store
            .complete(&attempt_of(&t, &r.worker_id), &r.output_key)
            .await;
        crate::metrics::store_call("complete", started.elapsed().as_secs_f64(), f.is_ok());
        let f = f.map_err(store_status)?;
        crate::metrics::completion(metric_job(&t.job), f == Fenced::Accepted);
        let acceptance = match f {
            Fenced::Accepted if t.step == "finetune" => {
                tracing::info!(job = %t.job, part = t.shard, attempt = t.attempt, worker = %r.worker_id, "round part done");
                Acceptance::Accepted
            }
            Fenced::Accepted => {
                if let Ok(s) =
                    serde_json::from_str::<defuse_core::identify::IdentifyStats>(&r.stats_json)
                {
                    crate::metrics::shard_found(
                        &t.job,
                        s.n_searched as u64,
                        s.n_perturbations as u64,
                        s.n_failures as u64,
                    );
                }
                tracing::info!(job = %t.job, shard = t.shard, attempt = t.attempt, worker = %r.worker_id, "shard done");
                Acceptance::Accepted
            }
            Fenced::Stale => {
                tracing::warn!(job = %t.job, shard = t.shard, attempt = t.attempt, worker = %r.worker_id, "stale completion ignored");
                Acceptance::Stale
            }
        };
        Ok(Response::new(CompleteResponse {
            acceptance: acceptance as i32,
        }))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailResponse>, Status> {
        let r = req.into_inner();
        let t = r
            .task
            .ok_or_else(|| Status::invalid_argument("task missing"))?;
        let e = r.error.unwrap_or_default();
        let failure = if e.kind == FailureKind::Shutdown as i32 {
            Failure::HandBack
        } else if e.retryable {
            Failure::Retryable
        } else {
            Failure::Fatal
        };
        let o = self
            .inner
            .store
            .fail(
                &attempt_of(&t, &r.worker_id),
                failure,
                &e.message,
                self.inner.cfg.max_attempts,
            )
            .await
            .map_err(store_status)?;
        tracing::warn!(job = %t.job, shard = t.shard, attempt = t.attempt, worker = %r.worker_id, failure = ?failure, outcome = ?o, error = %e.message, "task failed");
        crate::metrics::task_failure(&t.job, e.retryable, &format!("{o:?}").to_lowercase());
        let acceptance = if o == FailOutcome::Stale {
            Acceptance::Stale
        } else {
            Acceptance::Accepted
        };
        Ok(Response::new(FailResponse {
            acceptance: acceptance as i32,
        }))
    }
}

#[tonic::async_trait]
impl JobService for Coordinator {
    async fn submit(
        &self,
        req: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let r = req.into_inner();
        let id = Coordinator::submit(self, &r.config_toml, Some(r.job_id)).await?;
        Ok(Response::new(SubmitResponse { job_id: id }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<JobStatus>, Status> {
        let id = req.into_inner().job_id;
        match self.inner.store.get_job(&id).await.map_err(store_status)? {
            Some(rec) => Ok(Response::new(self.status_of(&rec, true).await)),
            None => Err(Status::not_found(format!("no job {id}"))),
        }
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let id = req.into_inner().job_id;
        let round = self
            .inner
            .store
            .get_job(&id)
            .await
            .map_err(store_status)?
            .and_then(|j| j.step.round());
        // the job first: a round cancelled before it would fail it
        self.inner
            .store
            .cancel(&id, now_ms())
            .await
            .map_err(store_status)?;
        // then a fine-tune round in flight (the driver also ends it when it retires the
        // job, should this call fail)
        if let Some(r) = round {
            let sub = crate::rounds::sub_job(&id, r);
            if let Err(e) = self.inner.store.cancel(&sub, now_ms()).await {
                tracing::warn!(job = %id, round = r, error = %e, "cannot cancel the round");
            }
        }
        let rec = self.job(&id).await?;
        tracing::info!(job = %id, state = rec.state.as_str(), "cancel");
        Ok(Response::new(CancelResponse {
            state: rec.state.as_str().into(),
        }))
    }

    async fn label(&self, req: Request<LabelRequest>) -> Result<Response<LabelResponse>, Status> {
        let r = req.into_inner();
        let pairs: Vec<(String, String)> = r.labels.into_iter().collect();
        let (labelled, discarded) = self.set_labels(&r.job_id, &pairs).await?;
        Ok(Response::new(LabelResponse {
            labelled: labelled as u32,
            discarded: discarded as u32,
        }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let r = req.into_inner();
        let size = if r.page_size == 0 {
            DEFAULT_PAGE
        } else {
            r.page_size as usize
        };
        let (recs, next) = self
            .jobs_page(&r.page_token, size)
            .await
            .map_err(store_status)?;
        let mut jobs = Vec::new();
        for rec in &recs {
            jobs.push(self.status_of(rec, false).await);
        }
        Ok(Response::new(ListResponse {
            jobs,
            next_page_token: next,
        }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let id = req.into_inner().job_id;
        let objects = Coordinator::delete(self, &id).await?;
        Ok(Response::new(DeleteResponse { objects }))
    }
}

/// Why the servers could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Tls(String),
}

/// Serves both gRPC services on `grpc` (and, given `http`, the web page, health
/// checks and metrics there), and runs the driver loop until `shutdown`.
pub async fn serve(
    coord: Coordinator,
    grpc: tokio::net::TcpListener,
    http: Option<(tokio::net::TcpListener, crate::http::HttpOptions)>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // TLS settings are checked before anything starts
    let tls = coord.inner.cfg.tls.clone();
    let http_tls = match &tls {
        Some(pem) => Some(crate::http::tls_acceptor(pem).map_err(ServeError::Tls)?),
        None => None,
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(pem) = &tls {
        server = server.tls_config(pem.grpc())?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let driver = tokio::spawn(crate::driver::run(coord.clone(), stopped(stop_rx.clone())));
    let web = http.map(|(listener, opts)| {
        let app = crate::http::router(coord.clone(), opts);
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            let r = match http_tls {
                Some(acceptor) => crate::http::serve_tls(listener, app, acceptor, stop).await,
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                }
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "http server failed");
            }
        })
    });
    let guard = defuse_proto::auth::Guard::new(
        coord
            .inner
            .cfg
            .token
            .as_ref()
            .map(|t| t.expose().to_string()),
    );
    // TCP_NODELAY: without it Nagle's algorithm holds a lease reply back until the
    // client's delayed ACK, ~40 ms per lease (seen in bench/run.py's coordinator row).
    let incoming = tonic::transport::server::TcpIncoming::from(grpc)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let r = server
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(coord.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
            guard.clone(),
        ))
        .add_service(InterceptedService::new(
            JobServiceServer::new(coord.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
            guard,
        ))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx))
        .await;
    // the driver ends after the tick under way; the central steps it started are
    // stopped (each is idempotent: the next leader runs it again)
    let _ = driver.await;
    crate::driver::stop_central_steps(&coord, "shutting down");
    // another coordinator leads at once, not after the lease runs out
    if let Err(e) = coord.inner.store.resign(&coord.inner.node).await {
        tracing::warn!(error = %e, "cannot give up the leader lease; it ends by itself");
    }
    if let Some(w) = web {
        let _ = w.await;
    }
    Ok(r?)
}
