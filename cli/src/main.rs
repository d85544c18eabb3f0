//! `defuse`: the command-line front of Defuse.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use defuse_core::data::DataSpec;
use defuse_core::models::{parse_device, Classifier, CnnArch, Vae, VaeArch};
use defuse_core::train::{self, TrainOptions};

mod cluster;
mod logging;
mod run;

#[derive(Parser)]
#[command(
    name = "defuse",
    version,
    about = "Find and fix the systematic failures of image classifiers"
)]
struct Cli {
    /// Log as JSON lines instead of text (also: DEFUSE_LOG_FORMAT=json). Levels: RUST_LOG.
    #[arg(long, global = true)]
    log_json: bool,
    /// A file holding the user token (else DEFUSE_TOKEN; never on the command line):
    /// it opens the job API and the web page. Clients send it; a coordinator demands it.
    #[arg(long, global = true, env = "DEFUSE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// A file holding the worker token (else DEFUSE_WORKER_TOKEN): it opens only the
    /// worker API. Workers send it; a coordinator demands it.
    #[arg(long, global = true, env = "DEFUSE_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// PEM bundle of the CA that signed an https:// coordinator's certificate (workers
    /// and clients; default: the system's roots).
    #[arg(long, global = true, env = "DEFUSE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole job in one process: models, identify, distill, label, correct, report.
    /// Resumes after the last finished step. Exit code 3: waiting for labels.
    Run {
        /// The job file (TOML); see examples/.
        config: PathBuf,
        /// Output folder (default: the config's `out`, else runs/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Identify workers in this process; libtorch's threads (OMP_NUM_THREADS, else
        /// the cores) are shared among them, and the central steps use them all. 0: one
        /// worker per thread, each with one thread (the fastest split measured).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Override a setting of the job file: KEY=VALUE, e.g. identify.samples=50
        /// (the value in TOML syntax, a bare word else a string: quote a string that
        /// reads as another value, name='"2024-01-01"'; repeatable). From the
        /// environment: DEFUSE__IDENTIFY__SAMPLES=50 (one key), DEFUSE_SET (several,
        /// split by ';'). Order: defaults < job file < DEFUSE__* < DEFUSE_SET < --set.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The device to run on (cpu, cuda, cuda:N): the same as --set device=...
        #[arg(long)]
        device: Option<String>,
    },
    /// Run a coordinator: job state in Redis (--redis or REDIS_URL; memory without),
    /// artifacts in a folder or S3 (--artifacts file:///path | s3://bucket/prefix).
    Coordinator {
        /// Address of the gRPC services (workers and clients).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: String,
        /// Redis URL of the job, shard and worker state (set REDIS_URL when it holds a
        /// password); without it, state is in this process's memory.
        #[arg(long, env = "REDIS_URL")]
        redis: Option<String>,
        /// Where models, shard outputs, checkpoints and reports go: file:///path or
        /// s3://bucket/prefix (S3 settings from the AWS_* environment).
        #[arg(long, env = "DEFUSE_ARTIFACTS")]
        artifacts: Option<String>,
        /// Where central steps keep each job's files.
        /// A cache of job folders for the central steps (an emptyDir is enough: what
        /// matters is in Redis and the artifact store).
        #[arg(long, default_value = "coordinator-work")]
        work_dir: PathBuf,
        /// A shard lease lasts this long without a heartbeat (ms).
        #[arg(long, default_value_t = 15_000)]
        lease_ms: u64,
        /// How often workers send heartbeats (ms).
        #[arg(long, default_value_t = 2_000)]
        heartbeat_ms: u64,
        /// Attempts per shard before its job fails (hand-backs on shutdown do not count).
        #[arg(long, default_value_t = 3)]
        max_attempts: u32,
        /// The leader lease lasts this long without a renewal (ms): with several
        /// coordinators on one Redis, how long the others wait to take over from a
        /// dead leader.
        #[arg(long, default_value_t = 10_000)]
        leader_ms: u64,
        /// Serve the labelling page, the JSON API, /metrics, /healthz and /readyz here.
        #[arg(long, env = "DEFUSE_HTTP_LISTEN")]
        http_listen: Option<String>,
        /// Serve gRPC and HTTP over TLS with this certificate chain (PEM)...
        #[arg(long, env = "DEFUSE_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// ... and this private key (PEM).
        #[arg(long, env = "DEFUSE_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// A folder on this machine that submitted jobs may read (data.path, models.*,
        /// label.file); repeatable, or DEFUSE_ALLOW_PATHS split by ':'. Any other path
        /// is refused at submit; with none, jobs may read no local path.
        #[arg(
            long = "allow-path",
            value_name = "DIR",
            env = "DEFUSE_ALLOW_PATHS",
            value_delimiter = ':'
        )]
        allow_path: Vec<PathBuf>,
    },
    /// Run a worker: lease tasks from a coordinator and run them on a device.
    Worker {
        #[command(flatten)]
        remote: Remote,
        /// cpu, cuda or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Where downloaded models and outputs wait before upload.
        #[arg(long, default_value = "/tmp/defuse-worker")]
        cache_dir: PathBuf,
        /// libtorch intra-op threads (0: its default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Protocol version to announce (for testing refusals).
        #[arg(long, hide = true)]
        protocol_version: Option<u32>,
        /// Serve Prometheus metrics on http://ADDR/metrics.
        #[arg(long, env = "DEFUSE_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Exit (status 0) once the coordinator has had no queued, running or
        /// labelling job for this many seconds: the worker pods of a Kubernetes Job
        /// then complete. Without it the worker runs until stopped.
        #[arg(long, env = "DEFUSE_EXIT_WHEN_IDLE", value_name = "SECONDS")]
        exit_when_idle: Option<u64>,
    },
    /// Submit a job to a coordinator; prints its id.
    Submit {
        /// The job file (TOML).
        config: PathBuf,
        #[command(flatten)]
        remote: Remote,
        /// The job's id (letters, digits, '-' and '_'); default: its name and a
        /// unique suffix.
        #[arg(long)]
        job_id: Option<String>,
        /// Wait until the job ends; exit 0 when done, 3 when it waits for labels, 4
        /// when it failed or was cancelled.
        #[arg(long)]
        wait: bool,
        /// Override a setting of the job file, as `run --set` does.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Send the paths of models and labels as they are (files on the
        /// coordinator's disk), instead of uploading those that are files here.
        #[arg(long)]
        no_upload: bool,
    },
    /// Jobs of a coordinator, or one job's steps and shards.
    Status {
        /// A job id (default: every job, a line each).
        job: Option<String>,
        #[command(flatten)]
        remote: Remote,
        /// Print JSON (the shape of the HTTP API's /api/jobs).
        #[arg(long)]
        json: bool,
        /// Redraw every 2 seconds until the job ends (with an ETA); for one job, exit
        /// as `submit --wait` does (0 done, 3 waiting for labels, 4 failed or
        /// cancelled).
        #[arg(long)]
        watch: bool,
    },
    /// Cancel a job: no shard stays leased, no task keeps running.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Download a job's results from a coordinator into a folder, in the layout of
    /// `defuse run`'s output: report, summary, failures, scenarios, labels, and the
    /// fine-tuned model once done. Prints each file written.
    Results {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: Remote,
        /// The folder to write into (created if needed).
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete a finished job from a coordinator: its state, its artifacts, its files.
    Delete {
        /// The job id (of a done, failed or cancelled job).
        job: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Label a job's failure scenarios: `defuse label runs/x 3=8 5=discard`, or --file.
    /// JOB is a job's output folder (`defuse run`), or a job id on a coordinator: there
    /// the labels are final, and scenarios left out are discarded.
    Label {
        /// A job's output folder, or a job id.
        job: String,
        #[command(flatten)]
        remote: Remote,
        /// A JSON file {"<scenario id>": <class id> | "<class name>" | "discard"}.
        #[arg(long)]
        file: Option<PathBuf>,
        /// <scenario>=<class id or name>|discard
        pairs: Vec<String>,
    },
    /// The lambda sweep: correct the classifier once per lambda from the same
    /// identify/distill/label outputs (run first if needed); writes sweep/ with a table
    /// and a figure of test accuracy against failure-scenario accuracy.
    Sweep {
        /// The job file (TOML).
        config: PathBuf,
        /// Output folder (default: the config's `out`, else runs/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Comma-separated lambdas (>= 0): the loss is CE(train) + lambda * CE(scenario).
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0])]
        lambdas: Vec<f64>,
    },
    /// Fit a Dirichlet-process Gaussian mixture to the rows of an N x D matrix.
    Cluster(ClusterArgs),
    /// Train a built-in model on a dataset.
    Train {
        #[command(subcommand)]
        what: TrainWhat,
    },
    /// Print a shell completion script, e.g. `defuse completions bash >
    /// ~/.local/share/bash-completion/completions/defuse`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `defuse man > ~/.local/share/man/man1/defuse.1`.
    Man,
}

impl Command {
    /// The subcommand's name, for the span around it.
    fn name(&self) -> &'static str {
        match self {
            Command::Run { .. } => "run",
            Command::Coordinator { .. } => "coordinator",
            Command::Worker { .. } => "worker",
            Command::Submit { .. } => "submit",
            Command::Status { .. } => "status",
            Command::Cancel { .. } => "cancel",
            Command::Delete { .. } => "delete",
            Command::Results { .. } => "results",
            Command::Label { .. } => "label",
            Command::Sweep { .. } => "sweep",
            Command::Cluster(_) => "cluster",
            Command::Train { .. } => "train",
            Command::Completions { .. } => "completions",
            Command::Man => "man",
        }
    }
}

/// Where the coordinator's gRPC services are (for workers and clients).
#[derive(Args)]
struct Remote {
    /// The coordinator's gRPC address (https:// for TLS).
    #[arg(
        long,
        env = "DEFUSE_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
}

#[derive(Args)]
struct ClusterArgs {
    /// Input matrix: .npy (f4/f8, C order) or .safetensors (tensor `codes` or the only one).
    input: PathBuf,
    /// Output JSON: weights, means, covariances, per-row assignments.
    #[arg(long)]
    out: PathBuf,
    /// Truncation level (most components).
    #[arg(long, default_value_t = 100)]
    max_components: usize,
    /// Components above this weight count as effective.
    #[arg(long, default_value_t = 0.01)]
    weight_cutoff: f64,
    /// Most EM iterations.
    #[arg(long, default_value_t = 1000)]
    max_iter: usize,
    /// Stop when the lower bound improves by less than this.
    #[arg(long, default_value_t = 1e-3)]
    tol: f64,
    /// Seed of the k-means start.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum TrainWhat {
    /// The built-in CNN classifier.
    Classifier {
        #[command(flatten)]
        common: TrainArgs,
        /// Width of the first convolution.
        #[arg(long, default_value_t = 32)]
        width: i64,
    },
    /// The built-in convolutional VAE.
    Vae {
        #[command(flatten)]
        common: TrainArgs,
        /// Latent size.
        #[arg(long, default_value_t = 10)]
        latent: i64,
        /// Weight of the KL term (1 = plain VAE).
        #[arg(long, default_value_t = 1.0)]
        beta: f64,
        /// Width of the first convolution.
        #[arg(long, default_value_t = 32)]
        width: i64,
        /// Size of the hidden linear layer.
        #[arg(long, default_value_t = 256)]
        hidden: i64,
        /// Where to write a PNG of test inputs above their reconstructions
        /// (default: next to --out, `<out>.recon.png`).
        #[arg(long)]
        grid: Option<PathBuf>,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Dataset folder (IDX files or <class>/ image folders).
    #[arg(long)]
    data: PathBuf,
    /// Output model file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Epochs (default: 5 for the classifier, 10 for the VAE).
    #[arg(long)]
    epochs: Option<usize>,
    /// Rows per batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Multiply the learning rate by this after every epoch.
    #[arg(long, default_value_t = 1.0)]
    lr_decay: f64,
    /// Seed of the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Use only the first N training images (0 = all).
    #[arg(long, default_value_t = 0)]
    limit_train: usize,
    /// Stop each epoch after N batches (0 = all).
    #[arg(long, default_value_t = 0)]
    max_batches: usize,
}

impl TrainArgs {
    fn options(&self, default_epochs: usize) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs.unwrap_or(default_epochs),
            batch_size: self.batch,
            lr: self.lr,
            seed: self.seed,
            max_batches: self.max_batches,
            lr_decay: self.lr_decay,
        }
    }

    fn load(&self) -> anyhow::Result<defuse_core::data::Dataset> {
        let mut spec = DataSpec::from_path(&self.data);
        spec.limit_train = self.limit_train;
        let ds = spec.load()?;
        tracing::info!(
            dataset = %ds.name, train = ds.train.len(), test = ds.test.len(), classes = ds.num_classes(),
            shape = ?ds.image_shape(), "dataset loaded"
        );
        Ok(ds)
    }
}

/// A Redis URL with a password given as a flag would be visible to every user (`ps`);
/// such a password belongs in `REDIS_URL` (the environment) instead.
fn password_on_command_line() -> Option<String> {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut urls = args
        .windows(2)
        .filter(|w| w[0] == "--redis")
        .map(|w| w[1].clone())
        .chain(
            args.iter()
                .filter_map(|a| a.strip_prefix("--redis=").map(String::from)),
        );
    // a password: `user:pass@` before the host, or a `password=` query parameter
    urls.find(|u| {
        let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
        let userinfo = rest.rsplit_once('@').map(|(ui, _)| ui).unwrap_or("");
        userinfo.contains(':') || u.contains("password=") || u.contains("pass=")
    })
}

fn main() -> ExitCode {
    if password_on_command_line().is_some() {
        eprintln!("error: --redis: the URL carries a password, and command lines are visible to every user (ps); set REDIS_URL in the environment instead");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let _logs = logging::init(cli.log_json);
    let span = tracing::info_span!("command", name = cli.cmd.name());
    let _in = span.enter();
    let tokens = read_token(cli.token_file.as_deref(), "DEFUSE_TOKEN").and_then(|user| {
        Ok(Tokens {
            user,
            worker: read_token(cli.worker_token_file.as_deref(), "DEFUSE_WORKER_TOKEN")?,
        })
    });
    let tokens = match tokens {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let tls_ca = match cli.tls_ca.as_deref().map(|p| {
        std::fs::read(p).map_err(|e| format!("cannot read the TLS CA {}: {e}", p.display()))
    }) {
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Some(Ok(pem)) => Some(pem),
        None => None,
    };
    cluster::set_tls_ca(tls_ca);
    match dispatch(cli.cmd, tokens) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit codes: 0 success, 1 a failure while running, 2 bad input (usage, config, data
/// or model files): fix the input and run again; 3 (`run`, `submit --wait`,
/// `status --watch`) waiting for labels; 4 (`submit --wait`, `status --watch`) the job
/// failed or was cancelled.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<defuse_core::Error>() {
        Some(defuse_core::Error::Torch(_)) | Some(defuse_core::Error::Io { .. }) => 1,
        Some(_) => 2,
        None => 1,
    }
}

/// The job-file overrides, lowest first: one per `DEFUSE__<KEY>` variable (the key path
/// in upper case, `__` between its parts: `DEFUSE__IDENTIFY__SAMPLES=50` is
/// `identify.samples=50`; in the order of their names), then DEFUSE_SET's (split by
/// ';'), then the command line's.
fn overrides(cli: Vec<String>) -> Vec<String> {
    overrides_from(std::env::vars_os(), cli)
}

fn overrides_from(
    env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    cli: Vec<String>,
) -> Vec<String> {
    let mut keyed = std::collections::BTreeMap::new();
    let mut set = String::new();
    for (k, v) in env {
        let (k, v) = (k.to_string_lossy(), v.to_string_lossy());
        if k == "DEFUSE_SET" {
            set = v.into_owned();
        } else if let Some(path) = k.strip_prefix("DEFUSE__") {
            let key = path
                .split("__")
                .collect::<Vec<_>>()
                .join(".")
                .to_lowercase();
            keyed.insert(k.to_string(), format!("{key}={v}"));
        }
    }
    let mut sets: Vec<String> = keyed.into_values().collect();
    sets.extend(
        set.split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from),
    );
    sets.extend(cli);
    sets
}

/// The two roles' tokens, as given to this process.
struct Tokens {
    /// The job API's (DEFUSE_TOKEN): clients send it.
    user: Option<String>,
    /// The worker API's (DEFUSE_WORKER_TOKEN): workers send it.
    worker: Option<String>,
}

/// A token from its file, else from the environment variable `var`.
fn read_token(file: Option<&std::path::Path>, var: &str) -> anyhow::Result<Option<String>> {
    let (t, from) = match file {
        Some(f) => (
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?,
            f.display().to_string(),
        ),
        None => match std::env::var(var) {
            Ok(t) => (t, var.to_string()),
            Err(_) => return Ok(None),
        },
    };
    let t = t.trim().to_string();
    // an empty secret must not turn access control off without a word
    if t.is_empty() {
        anyhow::bail!(defuse_core::Error::invalid(
            "token",
            format!("{from} is empty: give a token, or unset it to run without one")
        ));
    }
    if !t
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c))
    {
        anyhow::bail!(defuse_core::Error::invalid(
            "token",
            format!("the token in {from} may use letters, digits and - . _ ~ + / = only (e.g. openssl rand -hex 32)")
        ));
    }
    Ok(Some(t))
}

fn dispatch(cmd: Command, tokens: Tokens) -> anyhow::Result<Option<u8>> {
    let token = tokens.user;
    match cmd {
        Command::Run {
            config,
            out,
            workers,
            set,
            device,
        } => {
            let mut sets = overrides(set);
            sets.extend(device.map(|d| format!("device={d:?}")));
            run::run(&config, out, workers, &sets)
        }
        Command::Coordinator {
            listen,
            redis,
            artifacts,
            work_dir,
            lease_ms,
            heartbeat_ms,
            max_attempts,
            leader_ms,
            http_listen,
            tls_cert,
            tls_key,
            allow_path,
        } => {
            // copies of data sets in buckets: a cache beside the job folders (hidden: no job id)
            defuse_core::data::remote::set_mirror_root(work_dir.join(".data"));
            cluster::coordinator(cluster::CoordinatorArgs {
                listen,
                redis,
                artifacts,
                work_dir,
                lease_ms,
                heartbeat_ms,
                max_attempts,
                leader_ms,
                http_listen,
                token,
                worker_token: tokens.worker,
                metrics_token: std::env::var(defuse_proto::auth::METRICS_TOKEN_ENV)
                    .ok()
                    .filter(|t| !t.is_empty()),
                allow_paths: allow_path,
                tls: match (tls_cert, tls_key) {
                    (Some(c), Some(k)) => Some(cluster::read_server_pem(&c, &k)?),
                    _ => None,
                },
            })
            .map(|()| None)
        }
        Command::Worker {
            remote: Remote { coordinator },
            device,
            cache_dir,
            threads,
            protocol_version,
            metrics_listen,
            exit_when_idle,
        } => {
            let mut w = defuse_worker::WorkerConfig::new(coordinator);
            w.exit_when_idle = exit_when_idle.map(std::time::Duration::from_secs);
            w.device = device;
            defuse_core::data::remote::set_mirror_root(cache_dir.join("data"));
            w.cache_dir = cache_dir;
            w.threads = threads;
            w.token = tokens.worker.map(defuse_proto::auth::Secret::new);
            w.tls_ca = cluster::tls_ca();
            if let Some(v) = protocol_version {
                w.protocol_version = v;
            }
            cluster::worker(w, metrics_listen).map(|()| None)
        }
        Command::Submit {
            config,
            remote: Remote { coordinator },
            job_id,
            wait,
            set,
            no_upload,
        } => cluster::submit(
            &coordinator,
            token,
            &config,
            job_id,
            wait,
            &overrides(set),
            !no_upload,
        ),
        Command::Status {
            job,
            remote: Remote { coordinator },
            json,
            watch,
        } => cluster::status(&coordinator, token, job, json, watch),
        Command::Cancel {
            job,
            remote: Remote { coordinator },
        } => cluster::cancel(&coordinator, token, job).map(|()| None),
        Command::Delete {
            job,
            remote: Remote { coordinator },
        } => cluster::delete(&coordinator, token, job).map(|()| None),
        Command::Results {
            job,
            remote: Remote { coordinator },
            out,
        } => cluster::results(&coordinator, token, &job, &out).map(|()| None),
        Command::Label {
            job,
            remote: Remote { coordinator },
            file,
            pairs,
        } => if std::path::Path::new(&job).is_dir() {
            run::label(std::path::Path::new(&job), file.as_deref(), &pairs)
        } else {
            cluster::label(&coordinator, token, &job, file.as_deref(), &pairs)
        }
        .map(|()| None),
        Command::Train { what } => train_cmd(what).map(|()| None),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "defuse", &mut std::io::stdout());
            Ok(None)
        }
        Command::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
            Ok(None)
        }
        Command::Sweep {
            config,
            out,
            lambdas,
        } => run::sweep(&config, out, &lambdas).map(|()| None),
        Command::Cluster(a) => cluster_cmd(a).map(|()| None),
    }
}

fn cluster_cmd(a: ClusterArgs) -> anyhow::Result<()> {
    use defuse_core::dpgmm::{DpGmm, DpGmmOptions};
    let x = defuse_core::tensor_io::read_matrix(&a.input)?;
    let o = DpGmmOptions {
        max_components: a.max_components,
        max_iter: a.max_iter,
        tol: a.tol,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let m = DpGmm::fit(&x, &o, a.seed)?;
    let assignments = m.predict(&x)?;
    let effective: Vec<usize> = (0..m.n_components())
        .filter(|&k| m.weights[k] > a.weight_cutoff)
        .collect();
    let out = serde_json::json!({
        "input": a.input, "n": x.size()[0], "d": x.size()[1],
        "weights": m.weights, "means": m.means, "covariances": m.covariances,
        "assignments": assignments, "effective_components": effective,
        "n_effective": effective.len(), "weight_cutoff": a.weight_cutoff,
        "mean_log_likelihood": m.score(&x)?, "lower_bound": m.lower_bounds.last(),
        "n_iter": m.n_iter, "converged": m.converged, "seconds": started.elapsed().as_secs_f64(),
    });
    create_parent(&a.out)?;
    write_json(&a.out, &out)?;
    println!(
        "cluster: {} rows, {} effective components (weight > {}), {} iterations; wrote {}",
        x.size()[0],
        effective.len(),
        a.weight_cutoff,
        m.n_iter,
        a.out.display()
    );
    Ok(())
}

fn train_cmd(what: TrainWhat) -> anyhow::Result<()> {
    match what {
        TrainWhat::Classifier { common, width } => {
            let device = parse_device(&common.device)?;
            let ds = common.load()?;
            tch::manual_seed(common.seed as i64);
            let [c, h, w] = ds.image_shape();
            let arch = CnnArch {
                channels: c,
                height: h,
                width: w,
                num_classes: ds.num_classes() as i64,
                width_base: width,
            };
            let mut clf = Classifier::new_builtin(arch, device)?;
            let started = std::time::Instant::now();
            let history = train::train_classifier(&ds, &mut clf, &common.options(5))?;
            create_parent(&common.out)?;
            clf.save(&common.out)?;
            let last = history.last().expect("at least one epoch");
            let summary = serde_json::json!({
                "model": "classifier", "dataset": ds.name, "out": common.out,
                "test_accuracy": last.test_accuracy, "epochs": history,
                "seconds": started.elapsed().as_secs_f64(),
            });
            write_json(&common.out.with_extension("json"), &summary)?;
            println!(
                "classifier: test accuracy {:.2}% after {} epochs ({:.0} s); saved {}",
                100.0 * last.test_accuracy,
                history.len(),
                started.elapsed().as_secs_f64(),
                common.out.display()
            );
        }
        TrainWhat::Vae {
            common,
            latent,
            beta,
            width,
            hidden,
            grid,
        } => {
            let device = parse_device(&common.device)?;
            let ds = common.load()?;
            tch::manual_seed(common.seed as i64);
            let [c, h, w] = ds.image_shape();
            let arch = VaeArch {
                channels: c,
                height: h,
                width: w,
                latent,
                width_base: width,
                hidden,
                beta,
            };
            if latent < 1 || !(beta.is_finite() && beta >= 0.0) {
                anyhow::bail!(defuse_core::Error::invalid(
                    "vae",
                    "latent must be >= 1 and beta >= 0"
                ));
            }
            let mut vae = Vae::new_builtin(arch, device)?;
            let started = std::time::Instant::now();
            let history = train::train_vae(&ds, &mut vae, &common.options(10))?;
            create_parent(&common.out)?;
            vae.save(&common.out)?;
            let grid = grid.unwrap_or_else(|| common.out.with_extension("recon.png"));
            let x = ds.test.images(0..16.min(ds.test.len()), device);
            let recon = train::reconstruct(&vae, &x)?;
            defuse_core::images::write_grid(&grid, &[x, recon], 3)?;
            let last = history.last().expect("at least one epoch");
            let summary = serde_json::json!({
                "model": "vae", "dataset": ds.name, "out": common.out, "latent": latent, "beta": beta,
                "test_reconstruction": last.test_reconstruction, "test_kl": last.test_kl,
                "epochs": history, "grid": grid, "seconds": started.elapsed().as_secs_f64(),
            });
            write_json(&common.out.with_extension("json"), &summary)?;
            println!(
                "vae: test reconstruction {:.2} + KL {:.2} per image after {} epochs ({:.0} s); saved {}, grid {}",
                last.test_reconstruction, last.test_kl, history.len(), started.elapsed().as_secs_f64(),
                common.out.display(), grid.display()
            );
        }
    }
    Ok(())
}

fn create_parent(path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

fn write_json(path: &std::path::Path, v: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod override_tests {
    use super::overrides_from;

    #[test]
    fn keyed_variables_then_defuse_set_then_the_command_line() {
        let env = [
            ("DEFUSE__IDENTIFY__SAMPLES", "50"),
            ("DEFUSE_SET", "seed=3; identify.samples=60"),
            ("DEFUSE__CORRECT__CONFLICTING_LABELS", "drop"),
            ("DEFUSE__SEED", "2"),
            ("DEFUSE_TOKEN", "not a key"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let sets = overrides_from(env, vec!["identify.samples=70".into()]);
        assert_eq!(
            sets,
            [
                "correct.conflicting_labels=drop",
                "identify.samples=50",
                "seed=2",
                "seed=3",
                "identify.samples=60",
                "identify.samples=70",
            ]
        );
    }
}
