//! The Defuse worker: registers with the coordinator, leases tasks (identify shards
//! and fine-tune parts), runs them on its device, writes each output under its attempt's key in the artifact
//! store, and completes or fails the task with a typed error. Heartbeats run on the
//! async runtime while the search runs on a blocking thread, so compute never starves
//! them; a heartbeat answered ABANDON (lease lost, job cancelled) stops the search.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use defuse_core::artifacts::{self, ArtifactStore};
use defuse_core::config::JobConfig;
use defuse_core::data::manifest::DataManifest;
use defuse_core::data::{Dataset, SplitName};
use defuse_core::identify::identify;
use defuse_core::models::{self, Classifier};
use defuse_proto::worker_service_client::WorkerServiceClient;
use defuse_proto::*;
use tracing::Instrument;

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `http://host:port` of the coordinator.
    pub coordinator: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Where downloaded models and outputs wait.
    pub cache_dir: PathBuf,
    /// Intra-op threads for libtorch (0: libtorch's default).
    pub threads: usize,
    /// Overrides the protocol version sent (tests of the refusal).
    pub protocol_version: u32,
    /// The coordinator's token, if it has one.
    pub token: Option<auth::Secret>,
    /// CA bundle (PEM) to trust for an https:// coordinator (else the system's roots).
    pub tls_ca: Option<Vec<u8>>,
    /// Stop once the coordinator has had no unfinished job for this long (a worker
    /// of a Kubernetes Job then completes); `None`: run until stopped.
    pub exit_when_idle: Option<Duration>,
}

impl WorkerConfig {
    pub fn new(coordinator: impl Into<String>) -> Self {
        WorkerConfig {
            coordinator: coordinator.into(),
            device: "cpu".into(),
            cache_dir: std::env::temp_dir().join("defuse-worker"),
            threads: 0,
            protocol_version: PROTOCOL_VERSION,
            token: None,
            tls_ca: None,
            exit_when_idle: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator refused this worker: {0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

struct Running {
    task: TaskRef,
    abandon: Arc<AtomicBool>,
}

/// Runs a worker until `shutdown` resolves: then it stops leasing, hands back the task
/// it runs (as a retryable SHUTDOWN failure) and returns.
pub async fn run(
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let id = defuse_core::fresh_process_id();
    let device =
        models::parse_device(&cfg.device).map_err(|e| WorkerError::Other(e.to_string()))?;
    // the task threads set theirs (`threads::enter`); this one's is for anything else
    defuse_core::threads::enter(cfg.threads);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    let channel = defuse_proto::tls::endpoint(&cfg.coordinator, cfg.tls_ca.as_deref())
        .map_err(WorkerError::Other)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .connect_lazy();
    let bearer =
        auth::Bearer::new(cfg.token.as_ref().map(|t| t.expose())).map_err(WorkerError::Other)?;
    let channel = auth::AuthChannel::new(channel, bearer);
    // one message limit both ways, as the coordinator's
    let new_client = || {
        WorkerServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
    let mut client = new_client();
    let (reg, store) = register(&mut client, &cfg, &id, &stop).await?;
    let Some((reg, store)) = reg.zip(store) else {
        return Ok(());
    };
    tracing::info!(worker = %id, device = %cfg.device, artifacts = %store.url(), "worker registered");

    let running: Arc<Mutex<Option<Running>>> = Arc::new(Mutex::new(None));
    let reregister = Arc::new(AtomicBool::new(false));
    let hb = tokio::spawn(heartbeat_loop(
        new_client(),
        id.clone(),
        running.clone(),
        reregister.clone(),
        Duration::from_millis(reg.heartbeat_ms.max(50)),
    ));
    let datasets: Arc<Mutex<DataCache>> = Default::default();
    // since when the coordinator has said it has no unfinished job
    let mut idle_since: Option<tokio::time::Instant> = None;

    while !stop.load(Ordering::SeqCst) {
        if reregister.swap(false, Ordering::SeqCst) {
            tracing::warn!(worker = %id, "coordinator does not know this worker: registering again");
            if register(&mut client, &cfg, &id, &stop).await?.0.is_none() {
                break;
            }
        }
        let task = match client
            .lease(LeaseRequest {
                worker_id: id.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                reregister.store(true, Ordering::SeqCst);
                continue;
            }
            Err(s) => {
                tracing::debug!(error = %s.message(), "lease failed; coordinator unavailable?");
                sleep_unless(&stop, 500).await;
                continue;
            }
        };
        let Some(task) = task.task else {
            if let Some(grace) = cfg.exit_when_idle {
                match (task.idle, idle_since) {
                    (false, _) => idle_since = None,
                    (true, None) => idle_since = Some(tokio::time::Instant::now()),
                    (true, Some(t)) if t.elapsed() >= grace => {
                        tracing::info!(worker = %id, idle_s = grace.as_secs_f64(), "no unfinished job on the coordinator: exiting (--exit-when-idle)");
                        break;
                    }
                    (true, Some(_)) => {}
                }
            }
            sleep_unless(&stop, task.retry_after_ms.clamp(50, 5000)).await;
            continue;
        };
        idle_since = None;
        let tref = task.task.clone().unwrap_or_default();
        let abandon = Arc::new(AtomicBool::new(false));
        *running.lock().unwrap() = Some(Running {
            task: tref.clone(),
            abandon: abandon.clone(),
        });
        // shard: the identify shard, or the part of fine-tune round `round`
        let span = tracing::info_span!("task", job = %tref.job, round = tref.round(), shard = tref.index(), attempt = tref.attempt, worker = %id, trace_id = tracing::field::Empty);
        // the task is a span of its job's trace (and so is the Complete call below)
        if let Some(tp) = defuse_proto::trace::TraceParent::parse(&task.traceparent) {
            defuse_proto::trace::adopt(&span, &tp);
        }
        let outcome = execute(
            &task,
            &store,
            &cfg,
            device,
            &datasets,
            abandon.clone(),
            stop.clone(),
        )
        .instrument(span.clone())
        .await;
        *running.lock().unwrap() = None;
        let result = match &outcome {
            Outcome::Done(..) => "done",
            Outcome::Abandoned => "abandoned",
            Outcome::Failed(_) => "failed",
        };
        metrics::counter!("defuse_worker_tasks_total", "result" => result).increment(1);
        report(&mut client, &id, &tref, &task.output_key, outcome)
            .instrument(span)
            .await;
    }
    hb.abort();
    tracing::info!(worker = %id, "worker stopped");
    Ok(())
}

async fn sleep_unless(stop: &AtomicBool, ms: u64) {
    let end = tokio::time::Instant::now() + Duration::from_millis(ms);
    while tokio::time::Instant::now() < end && !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50.min(ms))).await;
    }
}

/// Registers (retrying while the coordinator is unreachable); `None` when stopped.
async fn register(
    client: &mut WorkerServiceClient<auth::AuthChannel>,
    cfg: &WorkerConfig,
    id: &str,
    stop: &AtomicBool,
) -> Result<(Option<RegisterResponse>, Option<Arc<dyn ArtifactStore>>), WorkerError> {
    let req = RegisterRequest {
        protocol_version: cfg.protocol_version,
        worker_id: id.into(),
        host: gethostname::gethostname().to_string_lossy().into_owned(),
        device: cfg.device.clone(),
        memory_bytes: 0,
        threads: cfg.threads as u32,
    };
    let mut waited = 0u64;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok((None, None));
        }
        match client.register(req.clone()).await {
            Ok(r) => {
                let r = r.into_inner();
                let store = artifacts::open(&r.artifacts_url)
                    .await
                    .map_err(|e| WorkerError::Other(e.to_string()))?;
                return Ok((Some(r), Some(store)));
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::InvalidArgument
                        | tonic::Code::Unauthenticated
                ) =>
            {
                return Err(WorkerError::Refused(s.message().to_string()));
            }
            Err(s) => {
                if waited % 10_000 == 0 {
                    tracing::warn!(coordinator = %cfg.coordinator, error = %s.message(), "coordinator unreachable, retrying");
                }
                sleep_unless(stop, 500).await;
                waited += 500;
            }
        }
    }
}

async fn heartbeat_loop(
    mut client: WorkerServiceClient<auth::AuthChannel>,
    id: String,
    running: Arc<Mutex<Option<Running>>>,
    reregister: Arc<AtomicBool>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (tasks, flags): (Vec<TaskRef>, Vec<Arc<AtomicBool>>) = running
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.task.clone(), r.abandon.clone()))
            .unzip();
        match client
            .heartbeat(HeartbeatRequest {
                worker_id: id.clone(),
                running: tasks.clone(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if r.reregister {
                    reregister.store(true, Ordering::SeqCst);
                }
                // one verdict per task sent; extra verdicts are ignored
                for ((v, t), flag) in r.verdicts.iter().zip(&tasks).zip(&flags) {
                    if *v == TaskVerdict::Abandon as i32 {
                        tracing::warn!(worker = %id, job = %t.job, unit = %t.unit(), attempt = t.attempt, "lease lost: abandoning the task");
                        flag.store(true, Ordering::SeqCst);
                    }
                }
            }
            Err(s) => tracing::debug!(error = %s.message(), "heartbeat failed"),
        }
    }
}

enum Outcome {
    /// Output key, the task's statistics (JSON) and the output's SHA-256.
    Done(String, String, String),
    Abandoned,
    Failed(TaskError),
}

/// How a search ended without a result: stopped on request (lease lost, shutdown),
/// or failed.
enum Ended {
    Cancelled,
    Failed(TaskError),
}

impl From<TaskError> for Ended {
    fn from(e: TaskError) -> Self {
        Ended::Failed(e)
    }
}

fn task_error(kind: FailureKind, retryable: bool, message: impl Into<String>) -> TaskError {
    TaskError {
        kind: kind as i32,
        retryable,
        message: message.into(),
    }
}

/// Where artifact `key` lives under `root`: a key is a relative path of plain parts, so
/// nothing a task names is read or written outside the worker's folders.
fn local_path(root: &std::path::Path, key: &str) -> Result<PathBuf, TaskError> {
    if !artifacts::valid_key(key) {
        return Err(task_error(
            FailureKind::Execution,
            false,
            format!("artifact key '{key}' is not a relative path of plain parts: refused"),
        ));
    }
    Ok(root.join(key))
}

async fn fetch(
    store: &Arc<dyn ArtifactStore>,
    key: &str,
    cache: &std::path::Path,
) -> Result<PathBuf, TaskError> {
    let path = local_path(cache, key)?;
    if !path.exists() {
        store
            .get_file(key, &path)
            .await
            .map_err(|e| task_error(FailureKind::Io, true, e.to_string()))?;
    }
    Ok(path)
}

/// The data a task's job was planned with: its manifest's digest, and the manifest
/// (downloaded) to name what differs and to find the files of a shard.
struct PlannedData {
    digest: String,
    manifest: PathBuf,
}

impl PlannedData {
    fn read(&self) -> Option<DataManifest> {
        std::fs::read(&self.manifest)
            .ok()
            .and_then(|b| serde_json::from_slice::<DataManifest>(&b).ok())
    }
}

/// What a worker keeps of the data its tasks read.
#[derive(Default)]
struct DataCache {
    /// whole data sets by config and digest (the fine-tune's parts read the training
    /// split at random)
    full: HashMap<String, Arc<Dataset>>,
    /// the digests this worker's data was checked against, and found equal
    checked: std::collections::HashSet<String>,
    /// plans' data manifests by digest, parsed once (every shard reads its layout)
    manifests: HashMap<String, Arc<DataManifest>>,
}

/// Downloads the manifest a task names (none: the job's plan has no digest).
async fn planned_data(
    store: &Arc<dyn ArtifactStore>,
    data: Option<&DataIdentity>,
    cache: &std::path::Path,
) -> Result<Option<PlannedData>, TaskError> {
    let Some(d) = data.filter(|d| !d.digest.is_empty()) else {
        return Ok(None);
    };
    let manifest = fetch(store, &d.manifest_key, cache).await?;
    Ok(Some(PlannedData {
        digest: d.digest.clone(),
        manifest,
    }))
}

/// Checks, once per digest, that the files at `data.path` are the ones the job was
/// planned with: a worker that sees other data refuses (not retryable: no attempt here
/// will see the right data), naming the first file that differs.
fn check_data(
    datasets: &Mutex<DataCache>,
    job_cfg: &JobConfig,
    planned: &PlannedData,
) -> defuse_core::Result<()> {
    let key = format!("{}|{}", job_cfg.data.path.display(), planned.digest);
    if datasets.lock().unwrap().checked.contains(&key) {
        return Ok(());
    }
    let seen = DataManifest::of(&job_cfg.data.path)?;
    if seen.digest() != planned.digest {
        let why = planned
            .read()
            .and_then(|m| m.difference(&seen))
            .unwrap_or_else(|| "its files differ".into());
        return Err(defuse_core::Error::invalid(
            "data.path",
            format!(
                "{}: this worker's data is not the data the job was planned with: {why}",
                job_cfg.data.path.display()
            ),
        ));
    }
    datasets.lock().unwrap().checked.insert(key);
    Ok(())
}

/// The dataset of a job config, loaded once per worker and data digest (checked first).
fn dataset(
    datasets: &Mutex<DataCache>,
    job_cfg: &JobConfig,
    planned: Option<&PlannedData>,
) -> defuse_core::Result<Arc<Dataset>> {
    let key = format!(
        "{}|{}",
        serde_json::to_string(&job_cfg.data).unwrap_or_default(),
        planned.map_or("", |p| p.digest.as_str())
    );
    if let Some(d) = datasets.lock().unwrap().full.get(&key).cloned() {
        return Ok(d);
    }
    if let Some(p) = planned {
        check_data(datasets, job_cfg, p)?;
    }
    let d = Arc::new(job_cfg.data.load()?);
    datasets.lock().unwrap().full.insert(key, d.clone());
    Ok(d)
}

/// The images of one identify shard: read alone from the files that hold them when the
/// plan says where they are (memory and reads follow the shard, not the data set), else
/// from the whole data set (a plan without a layout: SVHN's MAT files).
fn shard_data(
    datasets: &Mutex<DataCache>,
    job_cfg: &JobConfig,
    planned: Option<&PlannedData>,
    range: std::ops::Range<usize>,
) -> defuse_core::Result<Arc<Dataset>> {
    let manifest = planned_manifest(datasets, planned);
    match (planned, manifest.as_ref().and_then(|m| m.layout.as_ref())) {
        (Some(p), Some(layout)) => {
            check_data(datasets, job_cfg, p)?;
            let files = manifest.as_ref().map(|m| m.files.as_slice());
            let ds =
                job_cfg
                    .data
                    .read_window_planned(layout, job_cfg.identify.split, range, files)?;
            Ok(Arc::new(ds))
        }
        _ => dataset(datasets, job_cfg, planned),
    }
}

/// The plan's data manifest, parsed once per digest.
fn planned_manifest(
    datasets: &Mutex<DataCache>,
    planned: Option<&PlannedData>,
) -> Option<Arc<DataManifest>> {
    planned.and_then(|p| {
        let cached = datasets.lock().unwrap().manifests.get(&p.digest).cloned();
        cached.or_else(|| {
            let m = Arc::new(p.read()?);
            let mut cache = datasets.lock().unwrap();
            // a worker's jobs come and go: keep the last few plans' manifests
            if cache.manifests.len() >= 8 {
                cache.manifests.clear();
            }
            cache.manifests.insert(p.digest.clone(), m.clone());
            Some(m)
        })
    })
}

/// The training images of one fine-tune part, and the size of the training split: only
/// the part's rows ([`defuse_core::correct::part_rows`]), read from the files that hold
/// them, when the plan says where they are (memory follows the part, not the data
/// set), else the whole data set (a plan without a layout: SVHN's MAT files).
fn part_data(
    datasets: &Mutex<DataCache>,
    job_cfg: &JobConfig,
    planned: Option<&PlannedData>,
    n_scenario: usize,
    round: usize,
    part: usize,
) -> defuse_core::Result<(Arc<Dataset>, usize)> {
    let manifest = planned_manifest(datasets, planned);
    match (planned, manifest.as_ref().and_then(|m| m.layout.as_ref())) {
        (Some(p), Some(layout)) => {
            check_data(datasets, job_cfg, p)?;
            let n_train = layout.images(SplitName::Train);
            let rows = defuse_core::correct::part_rows(
                n_train,
                n_scenario,
                &job_cfg.correct,
                job_cfg.seed,
                round,
                part,
            );
            let files = manifest.as_ref().map(|m| m.files.as_slice());
            let ds = job_cfg
                .data
                .read_rows(layout, SplitName::Train, &rows, files)?;
            Ok((Arc::new(ds), n_train))
        }
        _ => {
            let ds = dataset(datasets, job_cfg, planned)?;
            let n = ds.train.len();
            Ok((ds, n))
        }
    }
}

/// One part of one fine-tune round: `local_steps` steps from the round's checkpoint
/// on this part's batches; the output is the trained checkpoint, in the same format.
#[allow(clippy::too_many_arguments)]
async fn finetune(
    task: &Task,
    part: &FineTunePart,
    spec: &FineTuneSpec,
    store: &Arc<dyn ArtifactStore>,
    cfg: &WorkerConfig,
    device: tch::Device,
    datasets: &Arc<Mutex<DataCache>>,
    job_cfg: JobConfig,
) -> Outcome {
    let cache = cfg.cache_dir.join("artifacts");
    let (ckpt, scn) = match (
        fetch(store, &spec.checkpoint_key, &cache).await,
        fetch(store, &spec.scenario_key, &cache).await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Outcome::Failed(e),
    };
    // the checkpoint the coordinator published, or a refusal naming it (the cached
    // copy is dropped: another attempt downloads it again)
    if !spec.checkpoint_sha256.is_empty() {
        match artifacts::sha256_file(&ckpt) {
            Ok(h) if h == spec.checkpoint_sha256 => {}
            Ok(h) => {
                let _ = std::fs::remove_file(&ckpt);
                return Outcome::Failed(task_error(
                    FailureKind::Io,
                    true,
                    format!(
                        "checkpoint {}: its content is not what the coordinator published (SHA-256 {h}, recorded {}); it was replaced in the store",
                        spec.checkpoint_key, spec.checkpoint_sha256
                    ),
                ));
            }
            Err(e) => {
                return Outcome::Failed(task_error(
                    FailureKind::Io,
                    true,
                    format!("{}: {e}", ckpt.display()),
                ))
            }
        }
    }
    let planned = match planned_data(store, spec.data.as_ref(), &cache).await {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let ext = if spec.model_extension == "pt" {
        "pt"
    } else {
        "safetensors"
    };
    // the checkpoint's file name must say its format
    let ckpt_local = ckpt.with_extension(format!("model.{ext}"));
    if !ckpt_local.exists() {
        // through a temporary file: a crash never leaves half a checkpoint to reuse
        let tmp = ckpt_local.with_extension(format!("part-{}", std::process::id()));
        if let Err(e) = std::fs::copy(&ckpt, &tmp).and_then(|_| std::fs::rename(&tmp, &ckpt_local))
        {
            return Outcome::Failed(task_error(
                FailureKind::Io,
                true,
                format!("{} -> {}: {e}", ckpt.display(), ckpt_local.display()),
            ));
        }
    }
    let out_path = match local_path(
        &cfg.cache_dir.join("out"),
        &format!("{}.{ext}", task.output_key),
    ) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let datasets = datasets.clone();
    let out2 = out_path.clone();
    let (round, part) = (part.round as usize, part.part as usize);
    let threads = cfg.threads;
    let r = tokio::task::spawn_blocking(move || -> Result<String, TaskError> {
        defuse_core::threads::enter(threads);
        let exec = |e: defuse_core::Error| {
            let retryable = !matches!(e, defuse_core::Error::Invalid { .. });
            task_error(FailureKind::Execution, retryable, e.to_string())
        };
        let (tensors, _) = defuse_core::tensor_io::read(&scn).map_err(exec)?;
        let get = |k: &str| {
            tensors.get(k).map(|t| t.shallow_clone()).ok_or_else(|| {
                task_error(
                    FailureKind::Execution,
                    false,
                    format!("scenario data lacks {k}"),
                )
            })
        };
        let (x, y) = (get("train_x")?, get("train_y")?);
        // the training labels the job changes (absent in files from before them)
        let train_labels = match (
            tensors.get(defuse_core::correct::TRAIN_LABEL_ROWS),
            tensors.get(defuse_core::correct::TRAIN_LABEL_VALUES),
        ) {
            (Some(r), Some(v)) => defuse_core::correct::train_labels_from(r, v).map_err(exec)?,
            _ => Default::default(),
        };
        let n_scenario = x.size().first().copied().unwrap_or(0).max(0) as usize;
        let (ds, n_train) = part_data(
            &datasets,
            &job_cfg,
            planned.as_ref(),
            n_scenario,
            round,
            part,
        )
        .map_err(exec)?;
        let mut clf = Classifier::load(
            &ckpt_local,
            ds.image_shape(),
            ds.num_classes() as i64,
            device,
        )
        .map_err(exec)?;
        let (ce_t, ce_s, n) = defuse_core::correct::train_part(
            &mut clf,
            &ds.train,
            n_train,
            &x,
            &y,
            &train_labels,
            &job_cfg.correct,
            job_cfg.seed,
            round,
            part,
        )
        .map_err(exec)?;
        if let Some(d) = out2.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| task_error(FailureKind::Io, true, e.to_string()))?;
        }
        clf.save(&out2).map_err(exec)?;
        let m = n.max(1) as f64;
        Ok(
            serde_json::json!({"samples": n, "ce_train": ce_t / m, "ce_scenario": ce_s / m})
                .to_string(),
        )
    })
    .await;
    let stats = match r {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => return Outcome::Failed(e),
        Err(e) => {
            return Outcome::Failed(task_error(
                FailureKind::Execution,
                true,
                format!("task panicked: {e}"),
            ))
        }
    };
    upload(store.as_ref(), &task.output_key, &out_path, stats).await
}

async fn execute(
    task: &Task,
    store: &Arc<dyn ArtifactStore>,
    cfg: &WorkerConfig,
    device: tch::Device,
    datasets: &Arc<Mutex<DataCache>>,
    abandon: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let t = task.task.clone().unwrap_or_default();
    let job_cfg: JobConfig = match toml::from_str(&task.config_toml) {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed(task_error(
                FailureKind::Execution,
                false,
                format!("job config: {e}"),
            ))
        }
    };
    let spec = match (&t.work, &task.spec) {
        (Some(task_ref::Work::Finetune(part)), Some(task::Spec::Finetune(spec))) => {
            return finetune(task, part, spec, store, cfg, device, datasets, job_cfg).await;
        }
        (Some(task_ref::Work::Identify(_)), Some(task::Spec::Identify(spec))) => spec,
        _ => {
            return Outcome::Failed(task_error(
                FailureKind::Execution,
                false,
                format!(
                    "task {} of job {}: its unit of work and its inputs do not match (a coordinator of another release?)",
                    t.unit(),
                    t.job
                ),
            ))
        }
    };
    let cache = cfg.cache_dir.join("artifacts");
    let clf_path = match fetch(store, &spec.classifier_key, &cache).await {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let vae_path = match fetch(store, &spec.vae_key, &cache).await {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let planned = match planned_data(store, spec.data.as_ref(), &cache).await {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let dec_path = if spec.vae_decoder_key.is_empty() {
        None
    } else {
        match fetch(store, &spec.vae_decoder_key, &cache).await {
            Ok(p) => Some(p),
            Err(e) => return Outcome::Failed(e),
        }
    };
    let out_path = match local_path(&cfg.cache_dir.join("out"), &task.output_key) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let datasets = datasets.clone();
    let (start, end) = (spec.start as usize, spec.end as usize);
    let out2 = out_path.clone();
    let flags = (abandon.clone(), stop.clone());
    let threads = cfg.threads;
    let r = tokio::task::spawn_blocking(move || -> Result<String, Ended> {
        defuse_core::threads::enter(threads);
        let exec = |e: defuse_core::Error| match e {
            defuse_core::Error::Cancelled => Ended::Cancelled,
            e => {
                let retryable = !matches!(e, defuse_core::Error::Invalid { .. });
                Ended::Failed(task_error(FailureKind::Execution, retryable, e.to_string()))
            }
        };
        let ds = shard_data(&datasets, &job_cfg, planned.as_ref(), start..end).map_err(exec)?;
        let shape = ds.image_shape();
        let jit = defuse_core::frozen::jit_for(job_cfg.models.jit, job_cfg.identify.precision);
        let clf =
            Classifier::load_for_inference(&clf_path, shape, ds.num_classes() as i64, device, jit)
                .map_err(exec)?;
        let vae =
            models::load_vae(&vae_path, dec_path.as_deref(), shape, device, jit).map_err(exec)?;
        let o = &job_cfg.identify;
        let (f, s) = identify(
            ds.split(o.split),
            o.split,
            start..end,
            &clf,
            &vae,
            o,
            job_cfg.seed,
            |_| !flags.0.load(Ordering::SeqCst) && !flags.1.load(Ordering::SeqCst),
        )
        .map_err(exec)?;
        if let Some(d) = out2.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| task_error(FailureKind::Io, true, e.to_string()))?;
        }
        f.write(&out2, &s)
            .map_err(|e| task_error(FailureKind::Io, true, e.to_string()))?;
        metrics::counter!("defuse_worker_perturbations_total").increment(s.n_perturbations as u64);
        metrics::counter!("defuse_worker_failures_found_total").increment(s.n_failures as u64);
        Ok(serde_json::to_string(&s).unwrap_or_default())
    })
    .await;
    let stats = match r {
        Ok(Ok(stats)) => stats,
        Ok(Err(Ended::Cancelled)) => {
            return if stop.load(Ordering::SeqCst) {
                Outcome::Failed(task_error(
                    FailureKind::Shutdown,
                    true,
                    "worker shutting down; task handed back",
                ))
            } else {
                Outcome::Abandoned
            };
        }
        Ok(Err(Ended::Failed(e))) => return Outcome::Failed(e),
        Err(e) => {
            return Outcome::Failed(task_error(
                FailureKind::Execution,
                true,
                format!("task panicked: {e}"),
            ))
        }
    };
    if abandon.load(Ordering::SeqCst) {
        return Outcome::Abandoned;
    }
    tracing::info!(job = %t.job, unit = %t.unit(), attempt = t.attempt, "shard searched, uploading");
    upload(store.as_ref(), &task.output_key, &out_path, stats).await
}

/// Uploads a task's output, with the SHA-256 the coordinator records at acceptance.
async fn upload(
    store: &dyn ArtifactStore,
    key: &str,
    path: &std::path::Path,
    stats: String,
) -> Outcome {
    let sha256 = match artifacts::sha256_file(path) {
        Ok(h) => h,
        Err(e) => {
            return Outcome::Failed(task_error(
                FailureKind::Io,
                true,
                format!("{}: {e}", path.display()),
            ))
        }
    };
    match store.put_file(key, path).await {
        Ok(()) => Outcome::Done(key.to_string(), stats, sha256),
        Err(e) => Outcome::Failed(task_error(FailureKind::Io, true, e.to_string())),
    }
}

async fn report(
    client: &mut WorkerServiceClient<auth::AuthChannel>,
    id: &str,
    t: &TaskRef,
    output_key: &str,
    outcome: Outcome,
) {
    // a completion or failure must reach the coordinator; retry through short outages
    for attempt in 0..60 {
        let r = match &outcome {
            Outcome::Abandoned => return,
            Outcome::Done(key, stats, sha256) => client
                .complete(CompleteRequest {
                    worker_id: id.into(),
                    task: Some(t.clone()),
                    output_key: key.clone(),
                    stats_json: stats.clone(),
                    output_sha256: sha256.clone(),
                })
                .await
                .map(|r| r.into_inner().acceptance),
            Outcome::Failed(e) => client
                .fail(FailRequest {
                    worker_id: id.into(),
                    task: Some(t.clone()),
                    error: Some(e.clone()),
                })
                .await
                .map(|r| r.into_inner().acceptance),
        };
        match r {
            Ok(a) => {
                if a == Acceptance::Stale as i32 {
                    tracing::warn!(job = %t.job, unit = %t.unit(), attempt = t.attempt, output = output_key, "coordinator answered STALE: the result is ignored");
                } else if let Outcome::Failed(e) = &outcome {
                    tracing::warn!(job = %t.job, unit = %t.unit(), attempt = t.attempt, error = %e.message, "task failed");
                } else {
                    tracing::info!(job = %t.job, unit = %t.unit(), attempt = t.attempt, "task done");
                }
                return;
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) =>
            {
                if attempt % 10 == 0 {
                    tracing::warn!(error = %s.message(), "cannot report the task yet; retrying");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => {
                tracing::error!(error = %s.message(), "coordinator refused the report");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_leave_the_worker_folders_are_refused() {
        let root = std::path::Path::new("/var/cache/defuse");
        assert_eq!(
            local_path(root, "jobs/j/models/classifier.pt").unwrap(),
            root.join("jobs/j/models/classifier.pt")
        );
        for bad in ["../etc/passwd", "jobs/../../x", "/etc/passwd", "", "./x"] {
            let e = local_path(root, bad).unwrap_err();
            assert_eq!(e.kind, FailureKind::Execution as i32, "{bad}");
            assert!(!e.retryable, "{bad}");
            assert!(e.message.contains("refused"), "{bad}: {}", e.message);
        }
    }
}
