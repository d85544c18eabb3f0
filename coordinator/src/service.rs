//! The gRPC services (workers, clients) over the store, and the coordinator's shared
//! state.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use defuse_core::artifacts::ArtifactStore;
use defuse_core::pipeline::JobConfig;
use defuse_core::scenarios::{self, Scenario};
use defuse_proto::job_service_server::{JobService, JobServiceServer};
use defuse_proto::worker_service_server::{WorkerService, WorkerServiceServer};
use defuse_proto::*;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::store::{now_ms, FailOutcome, Fenced, JobRecord, JobState, StateStore, StoreError};

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
    /// Where central steps keep a job's files: `<work_dir>/<job id>/`.
    pub work_dir: PathBuf,
    /// Embedded mode: a job's files go to its config's `out` folder instead.
    pub use_job_out: bool,
    /// When set, every gRPC call and HTTP request (but health checks) must carry it.
    pub token: Option<defuse_proto::auth::Secret>,
    /// When set, gRPC and HTTP are served over TLS with this certificate.
    pub tls: Option<defuse_proto::tls::ServerPem>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease_ms: 15_000,
            heartbeat_ms: 2_000,
            max_attempts: 3,
            tick_ms: 500,
            work_dir: PathBuf::from("coordinator-work"),
            use_job_out: false,
            token: None,
            tls: None,
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
    pub store: Arc<dyn StateStore>,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Jobs whose central step runs now in this process.
    pub in_flight: Mutex<HashSet<String>>,
    /// Jobs this process has seen: one missing from the store was lost.
    pub known: Mutex<HashSet<String>>,
    pub plans: Mutex<HashMap<String, Arc<Plan>>>,
    pub round_plans: Mutex<HashMap<String, Arc<crate::rounds::RoundsPlan>>>,
    /// Per round sub-job: summed (ce_train * rows, ce_scenario * rows, rows) of its
    /// accepted parts (for status and the history; not needed to go on after a restart).
    pub round_stats: Mutex<HashMap<String, (f64, f64, usize)>>,
    pub round_history: Mutex<HashMap<String, Vec<defuse_core::correct::CorrectEpoch>>>,
    /// Failed tries to merge a job's current round (retried, up to a limit).
    pub merge_failures: Mutex<HashMap<String, u32>>,
    /// The jobs with shards to lease, as the driver last listed them (None before its
    /// first tick): a lease reads this instead of listing every job in the store.
    pub leasable: Mutex<Option<Arc<Vec<JobRecord>>>>,
}

/// A job whose shards workers lease now: identify, or a fine-tune round.
pub(crate) fn is_leasable(j: &JobRecord) -> bool {
    j.state == JobState::Running && (j.step == "identify" || j.step == "finetune-part")
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
                store,
                artifacts,
                in_flight: Mutex::new(HashSet::new()),
                known: Mutex::new(HashSet::new()),
                plans: Mutex::new(HashMap::new()),
                round_plans: Mutex::new(HashMap::new()),
                round_stats: Mutex::new(HashMap::new()),
                round_history: Mutex::new(HashMap::new()),
                merge_failures: Mutex::new(HashMap::new()),
                leasable: Mutex::new(None),
            }),
        }
    }

    /// The jobs people submitted, without the fine-tune rounds' sub-jobs.
    pub(crate) async fn submitted_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs = self.inner.store.list_jobs().await?;
        jobs.retain(|j| crate::rounds::parse_sub_job(&j.id).is_none());
        Ok(jobs)
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
    ) -> Result<String, Status> {
        if config_toml.len() > MAX_MESSAGE_BYTES {
            return Err(Status::invalid_argument("config larger than 4 MiB"));
        }
        let mut cfg: JobConfig = toml::from_str(config_toml)
            .map_err(|e| Status::invalid_argument(format!("job config: {e}")))?;
        cfg.validate()
            .map_err(|e| Status::invalid_argument(format!("job config: {e}")))?;
        if !cfg.data.path.is_dir() {
            return Err(Status::invalid_argument(format!(
                "job config: data.path {} is not a folder on the coordinator",
                cfg.data.path.display()
            )));
        }
        let name = cfg.name.clone().unwrap_or_else(|| "job".into());
        let id = match job_id.filter(|s| !s.is_empty()) {
            Some(id) if id.contains("--round-") => {
                return Err(Status::invalid_argument(format!(
                    "job id '{id}': '--round-' is kept for fine-tune rounds"
                )))
            }
            Some(id) if valid_id(&id) => id,
            Some(id) => {
                return Err(Status::invalid_argument(format!(
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
            step: "models".into(),
            config_toml: toml::to_string(&cfg).map_err(|e| Status::internal(e.to_string()))?,
            n_shards: 0,
            error: String::new(),
            created_ms: now,
            updated_ms: now,
        };
        self.inner
            .store
            .create_job(&rec)
            .await
            .map_err(store_status)?;
        self.inner.known.lock().unwrap().insert(id.clone());
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
    ) -> Result<(usize, usize), Status> {
        let rec = self
            .inner
            .store
            .get_job(job)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no job {job}")))?;
        if rec.state != JobState::AwaitingLabels {
            return Err(Status::failed_precondition(format!(
                "job {job} is {}, not awaiting_labels",
                rec.state.as_str()
            )));
        }
        let dir = self.job_dir_of(&rec)?;
        let (scenarios, classes) = read_scenarios(&dir)?;
        let mut labels = scenarios::validate_labels(
            pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &scenarios,
            &classes,
        )
        .map_err(Status::invalid_argument)?;
        for s in &scenarios {
            labels.entry(s.id).or_insert(scenarios::Label::Discard);
        }
        let labelled = labels
            .values()
            .filter(|l| matches!(l, scenarios::Label::Class(_)))
            .count();
        if labelled == 0 {
            // labels are final: refuse what would leave nothing to correct
            return Err(Status::invalid_argument(
                "no scenario would have a class label: give at least one (labels are final)",
            ));
        }
        // write aside, then link into place: the file appears whole, and only once
        let path = dir.join("labels.json");
        let tmp = dir.join(format!("labels.json.{}.tmp", rand::random::<u32>()));
        scenarios::write_labels(&tmp, &labels).map_err(|e| Status::internal(e.to_string()))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Status::failed_precondition(format!(
                    "job {job} is labelled already"
                )))
            }
            Err(e) => return Err(Status::internal(format!("{}: {e}", path.display()))),
        }
        tracing::info!(job = %job, labelled, discarded = labels.len() - labelled, "labels stored");
        Ok((labelled, labels.len() - labelled))
    }

    /// The folder of a job's central files.
    pub fn job_dir_of(&self, rec: &JobRecord) -> Result<PathBuf, Status> {
        let cfg: JobConfig = toml::from_str(&rec.config_toml)
            .map_err(|e| Status::internal(format!("config of job {}: {e}", rec.id)))?;
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
    async fn finetune_task(
        &self,
        rec: &JobRecord,
        lease: &crate::store::Lease,
    ) -> Result<Response<LeaseResponse>, Status> {
        let (job, round) = crate::rounds::parse_sub_job(&rec.id)
            .ok_or_else(|| Status::internal(format!("{} is not a round", rec.id)))?;
        let plan = crate::rounds::plan(self, job)
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(LeaseResponse {
            task: Some(Task {
                task: Some(TaskRef {
                    job: rec.id.clone(),
                    step: "finetune".into(),
                    shard: lease.shard,
                    attempt: lease.attempt,
                }),
                config_toml: rec.config_toml.clone(),
                classifier_key: crate::rounds::checkpoint_key(job, round, &plan.extension),
                scenario_key: plan.scenario_key.clone(),
                round: round as u32,
                model_extension: plan.extension.clone(),
                output_key: crate::shard_output_key(&rec.id, lease.shard, lease.attempt),
                ..Default::default()
            }),
            retry_after_ms: 0,
        }))
    }

    pub(crate) async fn plan(&self, job: &str) -> Result<Arc<Plan>, Status> {
        if let Some(p) = self.inner.plans.lock().unwrap().get(job) {
            return Ok(p.clone());
        }
        let bytes = self
            .inner
            .artifacts
            .get(&format!("jobs/{job}/plan.json"))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let plan: Plan = serde_json::from_slice(&bytes)
            .map_err(|e| Status::internal(format!("plan of job {job}: {e}")))?;
        let plan = Arc::new(plan);
        self.inner
            .plans
            .lock()
            .unwrap()
            .insert(job.into(), plan.clone());
        Ok(plan)
    }

    pub(crate) async fn status_of(&self, rec: &JobRecord) -> JobStatus {
        let mut steps = Vec::new();
        let order = ["models", "identify", "finish"];
        let round = crate::rounds::round_of_step(&rec.step);
        let at = if round.is_some() {
            2
        } else {
            order.iter().position(|s| *s == rec.step).unwrap_or(0)
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
            let last = self
                .inner
                .round_history
                .lock()
                .unwrap()
                .get(&rec.id)
                .and_then(|h| h.last().cloned());
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
        let summary_json = if rec.state == JobState::Done {
            self.inner
                .artifacts
                .get(&format!("jobs/{}/report/summary.json", rec.id))
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
            step: rec.step.clone(),
            error: rec.error.clone(),
            steps,
            summary_json,
            created_ms: rec.created_ms,
            updated_ms: rec.updated_ms,
        }
    }
}

/// A job's scenarios and class names, as its distill step left them.
pub fn read_scenarios(dir: &std::path::Path) -> Result<(Vec<Scenario>, Vec<String>), Status> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| Status::failed_precondition(format!("{}: {e}", p.display())))
    };
    let scenarios: Vec<Scenario> = serde_json::from_slice(&read("distill/scenarios.json")?)
        .map_err(|e| Status::internal(format!("scenarios of {}: {e}", dir.display())))?;
    let classes: Vec<String> = serde_json::from_slice(&read("classes.json")?)
        .map_err(|e| Status::internal(format!("classes of {}: {e}", dir.display())))?;
    Ok((scenarios, classes))
}

/// The job a metric is labelled with: a round's parent, so rounds add no series.
fn metric_job(id: &str) -> &str {
    crate::rounds::parse_sub_job(id).map_or(id, |(job, _)| job)
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
    match e {
        StoreError::Lost(_) => Status::failed_precondition(e.to_string()),
        StoreError::Exists(_) => Status::already_exists(e.to_string()),
        StoreError::Backend(_) => Status::unavailable(e.to_string()),
    }
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
            None => Arc::new(self.inner.store.list_jobs().await.map_err(store_status)?),
        };
        for rec in jobs.iter().filter(|j| is_leasable(j)) {
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
            if rec.step == "finetune-part" {
                return self.finetune_task(rec, &lease).await;
            }
            let plan = self.plan(&rec.id).await?;
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
                    output_key: crate::shard_output_key(&rec.id, lease.shard, lease.attempt),
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
                .renew(
                    &t.job,
                    t.shard,
                    &r.worker_id,
                    t.attempt,
                    now,
                    self.inner.cfg.lease_ms,
                )
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
        if r.output_key != crate::shard_output_key(&t.job, t.shard, t.attempt) {
            return Err(Status::invalid_argument(format!(
                "output key {} is not the key of attempt {}",
                r.output_key, t.attempt
            )));
        }
        let started = std::time::Instant::now();
        let f = self
            .inner
            .store
            .complete(&t.job, t.shard, &r.worker_id, t.attempt, &r.output_key)
            .await;
        crate::metrics::store_call("complete", started.elapsed().as_secs_f64(), f.is_ok());
        let f = f.map_err(store_status)?;
        crate::metrics::completion(metric_job(&t.job), f == Fenced::Accepted);
        let acceptance = match f {
            Fenced::Accepted if t.step == "finetune" => {
                let v: serde_json::Value = serde_json::from_str(&r.stats_json).unwrap_or_default();
                let n = v["samples"].as_u64().unwrap_or(0) as usize;
                let mut stats = self.inner.round_stats.lock().unwrap();
                let e = stats.entry(t.job.clone()).or_default();
                e.0 += v["ce_train"].as_f64().unwrap_or(0.0) * n as f64;
                e.1 += v["ce_scenario"].as_f64().unwrap_or(0.0) * n as f64;
                e.2 += n;
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
        let o = self
            .inner
            .store
            .fail(
                &t.job,
                t.shard,
                &r.worker_id,
                t.attempt,
                e.retryable,
                &e.message,
                self.inner.cfg.max_attempts,
            )
            .await
            .map_err(store_status)?;
        tracing::warn!(job = %t.job, shard = t.shard, attempt = t.attempt, worker = %r.worker_id, retryable = e.retryable, outcome = ?o, error = %e.message, "task failed");
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
            Some(rec) => Ok(Response::new(self.status_of(&rec).await)),
            None => Err(Status::not_found(format!("no job {id}"))),
        }
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let id = req.into_inner().job_id;
        // a fine-tune round in flight goes with its job
        if let Some(r) = self
            .inner
            .store
            .get_job(&id)
            .await
            .map_err(store_status)?
            .and_then(|j| crate::rounds::round_of_step(&j.step))
        {
            let sub = crate::rounds::sub_job(&id, r);
            if let Err(e) = self.inner.store.cancel(&sub, now_ms()).await {
                tracing::warn!(job = %id, round = r, error = %e, "cannot cancel the round");
            }
        }
        self.inner
            .store
            .cancel(&id, now_ms())
            .await
            .map_err(store_status)?;
        let rec = self
            .inner
            .store
            .get_job(&id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no job {id}")))?;
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

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let mut jobs = Vec::new();
        for rec in self.submitted_jobs().await.map_err(store_status)? {
            jobs.push(self.status_of(&rec).await);
        }
        Ok(Response::new(ListResponse { jobs }))
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
    let driver = tokio::spawn(crate::driver::run(coord.clone()));
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
    driver.abort();
    if let Some(w) = web {
        let _ = w.await;
    }
    Ok(r?)
}
