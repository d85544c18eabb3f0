//! The distributed commands: `coordinator`, `worker`, `submit`, `status`, `cancel`,
//! and the embedded `run` (a coordinator and its workers in this process, over
//! loopback gRPC, with the in-memory state store and a local artifact folder).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use defuse_coordinator::store::{memory::MemoryStore, redis::RedisStore, StateStore};
use defuse_coordinator::{Coordinator, CoordinatorConfig};
use defuse_core::artifacts::{self, ArtifactStore, LocalStore, S3Store};
use defuse_core::config::JobConfig;
use defuse_proto::auth;
use defuse_proto::job_service_client::JobServiceClient;
use defuse_proto::*;

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested");
}

pub async fn open_artifacts(url: &str) -> anyhow::Result<Arc<dyn ArtifactStore>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s = S3Store::from_env(bucket, prefix).await;
        s.ensure_bucket().await.with_context(|| {
            format!(
                "S3 bucket of {url} (AWS_ENDPOINT_URL={:?})",
                std::env::var("AWS_ENDPOINT_URL").ok()
            )
        })?;
        return Ok(artifacts::Metered::wrap(s));
    }
    Ok(artifacts::open(url).await?)
}

pub struct CoordinatorArgs {
    pub listen: String,
    pub redis: Option<String>,
    pub artifacts: Option<String>,
    pub work_dir: PathBuf,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    pub max_attempts: u32,
    pub leader_ms: u64,
    pub http_listen: Option<String>,
    pub token: Option<String>,
    pub worker_token: Option<String>,
    /// DEFUSE_METRICS_TOKEN: opens only `/metrics`.
    pub metrics_token: Option<String>,
    pub allow_paths: Vec<PathBuf>,
    pub tls: Option<defuse_proto::tls::ServerPem>,
}

static TLS_CA: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();

/// The CA bundle (PEM) clients and workers trust for https:// coordinators.
pub fn set_tls_ca(pem: Option<Vec<u8>>) {
    let _ = TLS_CA.set(pem);
}

pub fn tls_ca() -> Option<Vec<u8>> {
    TLS_CA.get().cloned().flatten()
}

/// The coordinator's certificate and key files, checked to be PEM.
pub fn read_server_pem(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<defuse_proto::tls::ServerPem> {
    let read = |p: &std::path::Path, what: &str, marker: &str| -> anyhow::Result<Vec<u8>> {
        let b = std::fs::read(p)
            .with_context(|| format!("cannot read the TLS {what} {}", p.display()))?;
        if !String::from_utf8_lossy(&b).contains(marker) {
            anyhow::bail!("{}: not a PEM {what} (no '{marker}' line)", p.display());
        }
        Ok(b)
    };
    Ok(defuse_proto::tls::ServerPem {
        cert: read(cert, "certificate", "-----BEGIN CERTIFICATE-----")?,
        key: read(key, "key", "PRIVATE KEY-----")?,
    })
}

/// How long a coordinator's metric series lives without an update: the series of
/// a job or a worker gone that long (labels `job`, `worker`) leave `/metrics`, so
/// they do not grow with every job and worker ever seen. The coordinator's own
/// series are set every tick and stay; an event counter that saw no event for that
/// long leaves too and comes back from zero (Prometheus reads a counter reset).
/// Workers' series are bounded (no job label) and never pruned.
pub const METRICS_IDLE: Duration = Duration::from_secs(3600);

/// The coordinator's Prometheus exporter: series idle for `idle` are dropped.
fn prometheus(idle: Duration) -> metrics_exporter_prometheus::PrometheusBuilder {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .idle_timeout(metrics_util::MetricKindMask::ALL, Some(idle))
}

/// Serves Prometheus text on `http://addr/metrics` (any path answers).
fn install_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%addr, "metrics on /metrics");
    }
    Ok(())
}

pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let http = match &a.http_listen {
            Some(addr) => {
                let handle = prometheus(METRICS_IDLE)
                    .install_recorder()
                    .context("cannot install the metrics recorder")?;
                let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (--http-listen)"))?;
                tracing::info!(addr = %listener.local_addr()?, "labelling page, /metrics, /healthz and /readyz");
                println!("http on {}", listener.local_addr()?);
                let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || handle.render());
                Some((listener, defuse_coordinator::http::HttpOptions { metrics: Some(render) }))
            }
            None => None,
        };
        if a.token.is_none() {
            tracing::warn!("no tokens (DEFUSE_TOKEN and DEFUSE_WORKER_TOKEN): anyone who reaches the ports can submit jobs, label them and act as a worker");
        }
        if a.allow_paths.is_empty() {
            tracing::warn!("no --allow-path (DEFUSE_ALLOW_PATHS): submitted jobs may read no path on this machine");
        }
        let store: Arc<dyn StateStore> = match &a.redis {
            Some(url) => Arc::new(RedisStore::connect(url).await?),
            None => {
                tracing::warn!("no --redis (or REDIS_URL): job state lives in memory and dies with this process");
                Arc::new(MemoryStore::new())
            }
        };
        let url = a.artifacts.clone().unwrap_or_else(|| format!("file://{}", std::path::absolute(a.work_dir.join("artifacts")).unwrap_or_default().display()));
        let artifacts = open_artifacts(&url).await?;
        let cfg = CoordinatorConfig { lease_ms: a.lease_ms, heartbeat_ms: a.heartbeat_ms, max_attempts: a.max_attempts, leader_ms: a.leader_ms, work_dir: a.work_dir.clone(), token: a.token.clone().map(defuse_proto::auth::Secret::new), worker_token: a.worker_token.clone().map(defuse_proto::auth::Secret::new), metrics_token: a.metrics_token.clone().map(defuse_proto::auth::Secret::new), allowed_roots: Some(a.allow_paths.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())).collect()), tls: a.tls.clone(), ..Default::default() };
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("cannot listen on {}", a.listen))?;
        tracing::info!(addr = %listener.local_addr()?, store = ?store, artifacts = %artifacts.url(), "coordinator listening");
        println!("coordinator listening on {}", listener.local_addr()?);
        defuse_coordinator::serve(Coordinator::new(cfg, store, artifacts), listener, http, shutdown_signal()).await?;
        Ok(())
    })
}

pub fn worker(
    cfg: defuse_worker::WorkerConfig,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        install_metrics(metrics)?;
        defuse_worker::run(cfg, shutdown_signal()).await?;
        Ok(())
    })
}

async fn client(
    url: &str,
    token: Option<String>,
) -> anyhow::Result<JobServiceClient<auth::AuthChannel>> {
    let bearer =
        auth::Bearer::new(token.as_deref()).map_err(|m| defuse_core::Error::invalid("token", m))?;
    let ch = defuse_proto::tls::endpoint(url, tls_ca().as_deref())
        .map_err(anyhow::Error::msg)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the coordinator at {url} (set --coordinator or DEFUSE_COORDINATOR)"
            )
        })?;
    Ok(JobServiceClient::new(auth::AuthChannel::new(ch, bearer))
        .max_decoding_message_size(defuse_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(defuse_proto::MAX_MESSAGE_BYTES))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    if matches!(
        s.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::AlreadyExists
            | tonic::Code::FailedPrecondition
            | tonic::Code::Unauthenticated
    ) {
        // bad input (exit code 2), said once
        anyhow::Error::new(defuse_core::Error::invalid(
            "request",
            format!("the coordinator says: {}", s.message()),
        ))
    } else {
        anyhow::anyhow!("coordinator: {}", s.message())
    }
}

/// The exit code a job's final state asks for: `None` (0) done, 3 waiting for labels,
/// 4 failed or cancelled; `None` too while it is not there yet (see [`finished`]).
fn exit_code_of(j: &JobStatus) -> Option<u8> {
    match j.state.as_str() {
        "awaiting_labels" => Some(3),
        "failed" | "cancelled" => Some(4),
        _ => None,
    }
}

/// Whether a job has stopped moving on its own: final, or waiting for labels not
/// given yet.
fn finished(j: &JobStatus) -> bool {
    ["done", "failed", "cancelled"].contains(&j.state.as_str())
        || (j.state == "awaiting_labels" && !j.labelled)
}

/// A job id as the coordinator makes them: the name and a unique suffix.
fn new_job_id(name: &str) -> String {
    let base: String = name
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
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{}-{ms:x}{:04x}",
        if base.is_empty() { "job" } else { &base },
        rand::random::<u16>()
    )
}

/// Uploads a file for job `job` (not yet submitted) in chunks of 1 MiB; returns the
/// `upload://` URL its config names it by, and its size.
async fn put_input(
    c: &mut JobServiceClient<auth::AuthChannel>,
    job: &str,
    path: &Path,
) -> anyhow::Result<(String, u64)> {
    use tokio::io::AsyncReadExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (job, shown) = (job.to_string(), path.display().to_string());
    // the reader feeds the stream; the first chunk names the job and the file
    let reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = f.read(&mut buf).await?;
            if n == 0 && !first {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            let chunk = InputChunk {
                job_id: if first { job.clone() } else { String::new() },
                name: if first { name.clone() } else { String::new() },
                data: buf,
            };
            first = false;
            if tx.send(chunk).await.is_err() || n == 0 {
                return Ok(());
            }
        }
    });
    let r = c
        .put_input(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_err);
    reader
        .await
        .map_err(|e| anyhow::anyhow!("reading {shown}: {e}"))?
        .with_context(|| format!("cannot read {shown}"))?;
    let r = r?.into_inner();
    Ok((r.url, r.bytes))
}

/// Says on stderr how a job ended, and returns its exit code.
fn report_end(j: &JobStatus) -> Option<u8> {
    match j.state.as_str() {
        "failed" => eprintln!("job {} failed: {}", j.job_id, j.error),
        "cancelled" => eprintln!("job {} was cancelled", j.job_id),
        "awaiting_labels" => eprintln!(
            "job {} waits for labels: defuse label {} --file labels.json",
            j.job_id, j.job_id
        ),
        _ => {}
    }
    exit_code_of(j)
}

/// Submits a job and prints its id; with `wait`, follows it (its phase changes on
/// stderr) until it ends and returns the exit code of its final state. With `upload`,
/// the job's models and labels file that are files here are uploaded with it first.
#[allow(clippy::too_many_arguments)]
pub fn submit(
    url: &str,
    token: Option<String>,
    config: &Path,
    job_id: Option<String>,
    wait: bool,
    sets: &[String],
    upload: bool,
) -> anyhow::Result<Option<u8>> {
    // check here first: a bad config never reaches the coordinator
    let checked = JobConfig::load_with(config, sets)?;
    // relative paths taken from the job file's folder (still relative when that
    // folder is: the coordinator reads them from its working directory)
    let mut cfg = JobConfig::read_with(config, sets)?;
    let local: Vec<&'static str> = if upload {
        defuse_core::sources::input_fields(&mut cfg)
            .into_iter()
            .filter(|(_, p)| p.as_deref().is_some_and(Path::is_file))
            .map(|(field, _)| field)
            .collect()
    } else {
        Vec::new()
    };
    // uploads go with a job id chosen here
    let job_id = match job_id {
        Some(id) => Some(id),
        None if !local.is_empty() => Some(new_job_id(checked.name.as_deref().unwrap_or("job"))),
        None => None,
    };
    runtime()?.block_on(async {
        let mut c = client(url, token).await?;
        for (field, p) in defuse_core::sources::input_fields(&mut cfg) {
            if !local.contains(&field) {
                continue;
            }
            let path = p.clone().expect("a file");
            let id = job_id.as_deref().expect("chosen above");
            let (url, bytes) = put_input(&mut c, id, &path).await?;
            eprintln!("{field}: uploaded {} ({bytes} bytes)", path.display());
            *p = Some(url.into());
        }
        let text = toml::to_string(&cfg)?;
        let r = c
            .submit(SubmitRequest {
                config_toml: text,
                job_id: job_id.unwrap_or_default(),
            })
            .await
            .map_err(status_err)?;
        let id = r.into_inner().job_id;
        println!("{id}");
        if !wait {
            return Ok(None);
        }
        let mut last = String::new();
        let mut told_trace = false;
        loop {
            let j = match c.status(StatusRequest { job_id: id.clone() }).await {
                Ok(r) => r.into_inner(),
                // a coordinator restarting (a rollout, a new leader) is waited out
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    eprintln!(
                        "job {id}: coordinator unavailable ({}), retrying",
                        s.message()
                    );
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                Err(s) => return Err(status_err(s)),
            };
            if !told_trace && !j.trace_id.is_empty() {
                eprintln!("job {id}: trace {}", j.trace_id);
                told_trace = true;
            }
            let now = format!("{} {}", j.state, j.step);
            if now != last {
                eprintln!("job {id}: {now}");
                last = now;
            }
            if finished(&j) {
                return Ok(report_end(&j));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// Prints the jobs of a coordinator, or one job. With `watch`, redraws until every job
/// shown has finished; for one job, returns the exit code of its final state.
pub fn status(
    url: &str,
    token: Option<String>,
    job: Option<String>,
    json: bool,
    watch: bool,
) -> anyhow::Result<Option<u8>> {
    runtime()?.block_on(async {
        let mut c = client(url, token).await?;
        let started = std::time::Instant::now();
        let mut first_done: Option<u64> = None;
        loop {
            let jobs = match &job {
                Some(id) => vec![c
                    .status(StatusRequest { job_id: id.clone() })
                    .await
                    .map_err(status_err)?
                    .into_inner()],
                None => {
                    // every page
                    let mut all = Vec::new();
                    let mut token = String::new();
                    loop {
                        let page = c
                            .list(ListRequest {
                                page_size: 1000,
                                page_token: token,
                            })
                            .await
                            .map_err(status_err)?
                            .into_inner();
                        all.extend(page.jobs);
                        if page.next_page_token.is_empty() {
                            break all;
                        }
                        token = page.next_page_token;
                    }
                }
            };
            if json {
                let v: Vec<serde_json::Value> = jobs.iter().map(defuse_coordinator::job_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if watch {
                    print!("\x1b[2J\x1b[H");
                }
                println!(
                    "{:<32} {:<16} {:<9} {:>12}  error",
                    "job", "state", "step", "shards"
                );
                for j in &jobs {
                    let id = j.steps.iter().find(|s| s.step == "identify");
                    let shards = id
                        .map(|s| format!("{}/{}", s.shards_done, s.shards_total))
                        .unwrap_or_default();
                    println!(
                        "{:<32} {:<16} {:<9} {:>12}  {}",
                        j.job_id, j.state, j.step, shards, j.error
                    );
                }
                if let [j] = &jobs[..] {
                    println!();
                    for s in &j.steps {
                        let shards = if s.shards_total > 0 {
                            format!(
                                "  shards: {} done, {} leased, {} pending, {} failed of {}",
                                s.shards_done,
                                s.shards_leased,
                                s.shards_pending,
                                s.shards_failed,
                                s.shards_total
                            )
                        } else {
                            String::new()
                        };
                        let detail = if s.detail.is_empty() {
                            String::new()
                        } else {
                            format!("  {}", s.detail)
                        };
                        println!("  {:<9} {:<16}{shards}{detail}", s.step, s.state);
                    }
                    if !j.trace_id.is_empty() {
                        println!("  trace     {}", j.trace_id);
                    }
                    // the evaluation, once the job has its report
                    if let Ok(r) = serde_json::from_str::<serde_json::Value>(&j.summary_json) {
                        let pct = |k: &str| 100.0 * r[k].as_f64().unwrap_or(f64::NAN);
                        println!(
                            "  report    test accuracy {:.2}% -> {:.2}%, failure scenarios {:.2}% -> {:.2}% ({} scenarios, {} labelled)",
                            pct("test_accuracy_before"),
                            pct("test_accuracy_after"),
                            pct("scenario_accuracy_before"),
                            pct("scenario_accuracy_after"),
                            r["n_scenarios"],
                            r["n_labelled"]
                        );
                    }
                    if let Some(s) = j.steps.iter().find(|s| {
                        s.step == "identify" && s.state == "running" && s.shards_total > 0
                    }) {
                        let base = *first_done.get_or_insert(s.shards_done);
                        let rate = (s.shards_done - base) as f64
                            / started.elapsed().as_secs_f64().max(1e-3);
                        if rate > 0.0 {
                            println!(
                                "  identify ETA {:.0} s",
                                (s.shards_total - s.shards_done) as f64 / rate
                            );
                        }
                    }
                }
            }
            if !watch {
                return Ok(None);
            }
            if jobs.iter().all(finished) {
                return Ok(match (&job, &jobs[..]) {
                    (Some(_), [j]) => report_end(j),
                    _ => None,
                });
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// `defuse results`: every result of a job into `out`, each written whole (through a
/// temporary file) under its name.
pub fn results(url: &str, token: Option<String>, job: &str, out: &Path) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut c = client(url, token).await?;
        let names = c
            .list_results(ListResultsRequest {
                job_id: job.to_string(),
            })
            .await
            .map_err(status_err)?
            .into_inner()
            .names;
        for name in names {
            // a name is a relative path of plain parts: nothing written outside `out`
            if !defuse_core::artifacts::valid_key(&name) {
                anyhow::bail!("coordinator: result name '{name}' is not a relative path");
            }
            let rel = Path::new(&name);
            let mut stream = c
                .fetch_result(FetchResultRequest {
                    job_id: job.to_string(),
                    name: name.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(status_err)? {
                data.extend_from_slice(&chunk.data);
            }
            let target = out.join(rel);
            let dir = target.parent().unwrap_or(out);
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let tmp = target.with_file_name(format!(
                "{}.part",
                target.file_name().unwrap_or_default().to_string_lossy()
            ));
            std::fs::write(&tmp, &data)
                .and_then(|()| std::fs::rename(&tmp, &target))
                .with_context(|| format!("cannot write {}", target.display()))?;
            println!("{}", target.display());
        }
        Ok(())
    })
}

/// Labels a job waiting on a coordinator: `pairs` like `3=8`, or a labels file.
pub fn label(
    url: &str,
    token: Option<String>,
    job: &str,
    file: Option<&Path>,
    pairs: &[String],
) -> anyhow::Result<()> {
    use defuse_core::scenarios::{label_pairs_from_args, label_pairs_from_json};
    let list = match (file, pairs.is_empty()) {
        (Some(f), true) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            label_pairs_from_json(&text).map_err(|m| defuse_core::Error::format(f, m))?
        }
        (None, false) => {
            label_pairs_from_args(pairs).map_err(|m| defuse_core::Error::invalid("label", m))?
        }
        _ => bail!(defuse_core::Error::invalid(
            "label",
            "give either --file or <scenario>=<class> pairs"
        )),
    };
    let mut labels = std::collections::HashMap::new();
    for (k, v) in list {
        if labels.insert(k.clone(), v).is_some() {
            bail!(defuse_core::Error::invalid(
                "label",
                format!("scenario {k} is labelled twice")
            ));
        }
    }
    runtime()?.block_on(async {
        let mut c = client(url, token).await?;
        let r = c
            .label(LabelRequest {
                job_id: job.to_string(),
                labels,
            })
            .await
            .map_err(status_err)?
            .into_inner();
        println!(
            "job {job}: {} scenarios labelled, {} discarded; correction starts now",
            r.labelled, r.discarded
        );
        Ok(())
    })
}

pub fn cancel(url: &str, token: Option<String>, job: String) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut c = client(url, token).await?;
        let r = c
            .cancel(CancelRequest {
                job_id: job.clone(),
            })
            .await
            .map_err(status_err)?;
        println!("{job}: {}", r.into_inner().state);
        Ok(())
    })
}

pub fn delete(url: &str, token: Option<String>, job: String) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut c = client(url, token).await?;
        let r = c
            .delete(DeleteRequest {
                job_id: job.clone(),
            })
            .await
            .map_err(status_err)?;
        println!("{job}: deleted ({} objects)", r.into_inner().objects);
        Ok(())
    })
}

/// The embedded mode: the same coordinator and workers, in this process.
pub enum Embedded {
    Done,
    AwaitingLabels,
}

pub fn embedded(cfg: &JobConfig, workers: usize) -> anyhow::Result<Embedded> {
    // identify in `workers` in-process workers sharing libtorch's threads (0: one worker
    // a thread, the split that measured fastest), the central steps with all of them
    let cores = defuse_core::threads::default_count();
    let workers = if workers == 0 { cores } else { workers };
    let per_worker = (cores / workers).max(1);
    defuse_core::threads::set_central(cores);
    tracing::info!(
        workers,
        threads_per_worker = per_worker,
        central_threads = cores,
        "embedded run"
    );
    let out = cfg.out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let toml_text = toml::to_string(cfg)?;
    let job_id = cfg
        .name
        .clone()
        .unwrap_or_else(|| "job".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect::<String>();
    runtime()?.block_on(async move {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
        let artifacts: Arc<dyn ArtifactStore> = Arc::new(LocalStore::new(
            out.join(defuse_core::layout::EMBEDDED_ARTIFACTS),
        ));
        // a fresh pair of tokens: another user of this machine who finds the
        // loopback port cannot submit, cancel or act as a worker
        let (token, worker_token) = (
            defuse_coordinator::random_secret(),
            defuse_coordinator::random_secret(),
        );
        let ccfg = CoordinatorConfig {
            token: Some(token),
            worker_token: Some(worker_token.clone()),
            allowed_roots: None,
            use_job_out: true,
            work_dir: out.clone(),
            tick_ms: 200,
            ..Default::default()
        };
        let coord = Coordinator::new(ccfg, store.clone(), artifacts);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tracing::info!(%url, "embedded coordinator listening (its tokens are this process's own)");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let server = tokio::spawn(defuse_coordinator::serve(
            coord.clone(),
            listener,
            None,
            wait(stop_rx.clone()),
        ));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let mut w = defuse_worker::WorkerConfig::new(url.clone());
            w.device = cfg.device.clone();
            w.threads = per_worker;
            w.cache_dir = out.join(format!("worker-{i}"));
            w.token = Some(worker_token.clone());
            handles.push(tokio::spawn(defuse_worker::run(w, wait(stop_rx.clone()))));
        }
        let id = coord
            .submit(&toml_text, Some(job_id.clone()))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // identify runs in the workers: its progress bar follows the shards
        let mut bar: Option<indicatif::ProgressBar> = None;
        let outcome = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let rec = store.get_job(&id).await?.context("job vanished")?;
            if rec.step == defuse_coordinator::lifecycle::Phase::Identify {
                let c = store
                    .counts(&id, defuse_coordinator::lifecycle::Stage::Identify)
                    .await?;
                let b = bar.get_or_insert_with(|| {
                    defuse_core::progress::bar(c.total as u64, "identify (shards)")
                });
                b.set_position(c.done as u64);
            } else if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            match rec.state.as_str() {
                "done" => break Ok(Embedded::Done),
                "awaiting_labels" => break Ok(Embedded::AwaitingLabels),
                // the job's own input at fault: a usage error (exit 2), as from `run`
                "failed"
                    if rec.error_kind == Some(defuse_coordinator::lifecycle::ErrorKind::Input) =>
                {
                    break Err(defuse_core::Error::invalid("job", rec.error).into())
                }
                "failed" => break Err(anyhow::anyhow!("job failed: {}", rec.error)),
                "cancelled" => bail!("job cancelled"),
                _ => {}
            }
        };
        let _ = stop_tx.send(true);
        for h in handles {
            let _ = h.await;
        }
        let _ = server.await;
        outcome
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_jobs_long_gone_leave_the_metrics() {
        let recorder = prometheus(Duration::from_millis(200)).build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("defuse_shard_leases_total", "job" => "old-job").increment(1);
        });
        assert!(handle.render().contains("old-job"));
        std::thread::sleep(Duration::from_millis(400));
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("defuse_shard_leases_total", "job" => "new-job").increment(1);
        });
        let text = handle.render();
        assert!(text.contains("new-job"), "{text}");
        assert!(!text.contains("old-job"), "an idle series was kept: {text}");
    }
}
