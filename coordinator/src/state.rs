//! The coordinator's shared state: its settings, its stores, and what this process
//! caches and runs, behind one lock ([`Local`]). The driver, the rounds, the folder
//! copies and the API all work through it; it depends on none of them.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use defuse_core::artifacts::ArtifactStore;
use defuse_core::config::JobConfig;
use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;
use crate::keys;
use crate::lifecycle::JobState;
use crate::store::{JobRecord, StateStore};

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
    /// The user token: when set, every job API call and HTTP request (but health
    /// checks) must carry it (or the page's session cookie).
    pub token: Option<defuse_proto::auth::Secret>,
    /// The worker token: when set, every worker API call must carry it. Set with the
    /// user token or not at all ([`defuse_proto::auth::check_tokens`]).
    pub worker_token: Option<defuse_proto::auth::Secret>,
    /// A token that opens only `GET /metrics` (a Prometheus scrape job's; optional:
    /// the user token opens `/metrics` too). Checked like the others.
    pub metrics_token: Option<defuse_proto::auth::Secret>,
    /// The folders a submitted job may read from this coordinator's disk (`data.path`,
    /// `models.*`, `label.file`); `None` (the embedded run) allows any path.
    pub allowed_roots: Option<Vec<PathBuf>>,
    /// Limits of the HTTP side (timeouts, connections, sign-in attempts).
    pub http_limits: HttpLimits,
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
            worker_token: None,
            metrics_token: None,
            allowed_roots: Some(Vec::new()),
            http_limits: HttpLimits::default(),
            tls: None,
            keep_jobs: 1000,
            keep_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// Limits of the HTTP side: a client that sends its request head slowly, holds a
/// connection, or guesses tokens is cut off.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// A request head (line and headers) must arrive within this, and a TLS
    /// handshake too.
    pub header_timeout: std::time::Duration,
    /// A connection that moves no byte either way for this long is closed (an idle
    /// keep-alive connection, a client that connects and says nothing).
    pub idle_timeout: std::time::Duration,
    /// A connection is closed after this long in all (a long download included).
    pub connection_timeout: std::time::Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Sign-in attempts per client address per minute.
    pub logins_per_minute: u32,
    /// How long a page session lasts after signing in.
    pub session_ttl: std::time::Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
            connection_timeout: std::time::Duration::from_secs(600),
            max_connections: 512,
            logins_per_minute: 10,
            session_ttl: std::time::Duration::from_secs(12 * 3600),
        }
    }
}

/// A fresh random secret of 32 bytes (64 hex characters): the embedded run's tokens.
pub fn random_secret() -> defuse_proto::auth::Secret {
    let b: [u8; 32] = rand::random();
    defuse_proto::auth::Secret::new(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

/// The plan of a job's identify step, kept in the artifact store (`jobs/<id>/plan.json`)
/// so a restarted coordinator finds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub ranges: Vec<(u64, u64)>,
    pub classifier_key: String,
    pub vae_key: String,
    pub vae_decoder_key: String,
    /// The digest of the data's manifest (`keys::data_manifest`) when planned; empty
    /// in plans of older releases (then workers do not check).
    #[serde(default)]
    pub data_digest: String,
    /// When identify was planned (ms since the epoch): its duration is measured from here.
    #[serde(default)]
    pub planned_ms: u64,
}

/// The plan of a job's fine-tune, in the artifact store (`jobs/<id>/finetune/plan.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RoundsPlan {
    pub rounds: usize,
    pub parts: usize,
    pub extension: String,
    pub scenario_key: String,
    pub n_train: usize,
    pub n_scenario: usize,
    pub image_shape: [i64; 3],
    pub num_classes: i64,
    /// The correct step's hash, handed back in `rounds-done.json`.
    pub hash: String,
    /// The data's digest from identify's plan (empty: not checked).
    #[serde(default)]
    pub data_digest: String,
    /// When the fine-tune was planned (ms since the epoch).
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
    /// What this process runs and caches: never held across an `.await` (see
    /// [`Inner::local`]).
    local: Mutex<Local>,
}

/// What one coordinator process keeps in memory besides the stores: the central steps
/// it runs and caches of what the stores hold. Losing all of it (a restart) loses
/// nothing: the stores have the state, and the caches are read again.
#[derive(Default)]
pub(crate) struct Local {
    /// Jobs whose central step runs now in this process, with the handle that stops
    /// it (a job cancelled meanwhile, a leadership lost). Written by the driver.
    pub in_flight: HashMap<String, tokio::task::JoinHandle<()>>,
    /// Jobs this process has seen active: one missing from the store was lost.
    /// Written by the driver.
    pub known: HashSet<String>,
    /// Central steps that failed with a retryable error: (tries, not before).
    /// Written by the driver and the central steps it started.
    pub retries: HashMap<String, (u32, Instant)>,
    /// The jobs with shards to lease, as the driver last listed them (None before its
    /// first tick): a lease reads this instead of listing every job in the store.
    pub leasable: Option<Arc<Vec<JobRecord>>>,
    /// How many jobs were not final at that listing (None before it): none tells
    /// idle workers that no work will come.
    pub unfinished: Option<usize>,
    /// Caches of plans in the artifact store (`keys::plan`, `keys::finetune_plan`):
    /// filled by whoever reads one first.
    pub plans: HashMap<String, Arc<Plan>>,
    pub round_plans: HashMap<String, Arc<RoundsPlan>>,
    /// The losses of each job's last merged round, for status (a cache: they are in
    /// the artifact store, `keys::round_stats`).
    pub last_round: HashMap<String, defuse_core::correct::CorrectEpoch>,
}

impl Inner {
    /// The process-local state. Take it, read or write, and let it go within one
    /// statement or block; never across an `.await`.
    pub fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
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
                local: Mutex::new(Local::default()),
            }),
        }
    }

    /// Drops what this process caches of a job (a deleted job).
    pub(crate) fn forget(&self, job: &str) {
        let mut local = self.inner.local();
        local.known.remove(job);
        local.plans.remove(job);
        local.round_plans.remove(job);
        local.last_round.remove(job);
        local.retries.remove(job);
    }

    /// This coordinator's name in the leader election.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Whether this coordinator can serve: its state store answers. One answer for
    /// HTTP `/readyz` and the gRPC health service.
    pub async fn ready(&self) -> Result<(), crate::store::StoreError> {
        self.inner
            .store
            .get_job("-readiness-probe-")
            .await
            .map(|_| ())
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.inner.store
    }

    pub fn artifacts(&self) -> &Arc<dyn ArtifactStore> {
        &self.inner.artifacts
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

    /// The identify plan of `rec`, read through its cache.
    pub(crate) async fn plan(&self, rec: &JobRecord) -> Result<Arc<Plan>, CoordinatorError> {
        self.cached_plan(
            rec,
            keys::plan(&rec.id),
            "plan of job",
            |l| &mut l.plans,
            |p| p.planned_ms,
        )
        .await
    }

    /// The fine-tune plan of `rec`, read through its cache.
    pub(crate) async fn rounds_plan(
        &self,
        rec: &JobRecord,
    ) -> Result<Arc<RoundsPlan>, CoordinatorError> {
        self.cached_plan(
            rec,
            keys::finetune_plan(&rec.id),
            "fine-tune plan of",
            |l| &mut l.round_plans,
            |p| p.planned_ms,
        )
        .await
    }

    /// A plan in the artifact store at `key`, cached in `Local` (`cache`). A cached plan
    /// older than the job is of a job deleted and submitted again under the same id,
    /// and is read again.
    async fn cached_plan<P: serde::de::DeserializeOwned>(
        &self,
        rec: &JobRecord,
        key: String,
        what: &str,
        cache: fn(&mut Local) -> &mut HashMap<String, Arc<P>>,
        planned_ms: fn(&P) -> u64,
    ) -> Result<Arc<P>, CoordinatorError> {
        let job = rec.id.as_str();
        if let Some(p) = cache(&mut self.inner.local()).get(job) {
            if planned_ms(p) >= rec.created_ms {
                return Ok(p.clone());
            }
        }
        let bytes = self
            .inner
            .artifacts
            .get(&key)
            .await
            .map_err(|e| CoordinatorError::unavailable(e.to_string()))?;
        let plan: P = serde_json::from_slice(&bytes)
            .map_err(|e| CoordinatorError::internal(format!("{what} {job}: {e}")))?;
        let plan = Arc::new(plan);
        cache(&mut self.inner.local()).insert(job.into(), plan.clone());
        Ok(plan)
    }
}

/// How many of `jobs` are not final.
pub(crate) fn unfinished(jobs: &[JobRecord]) -> usize {
    jobs.iter().filter(|j| !j.state.is_final()).count()
}
