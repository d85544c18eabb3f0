//! What the process-level tests share: a cluster of real processes (Redis with its
//! append-only file, s3s-fs, a coordinator, workers) and ways to look into it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use defuse_testkit::{free_port, wait_port, Proc, Redis, S3};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A `defuse` process, run with one libtorch thread: results are byte-for-byte equal
/// across processes at the same thread count per process, and on some CPUs (AVX-512)
/// libtorch's kernels round differently with 1 and 2 threads, so every process a test
/// compares (the embedded run, the coordinator, the workers) runs with one.
pub fn defuse() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_defuse"));
    c.env("RUST_LOG", "info").env("OMP_NUM_THREADS", "1");
    c
}

/// Small models, trained once per test on a slice of MNIST.
pub fn train_models(dir: &Path) -> (PathBuf, PathBuf) {
    defuse_testkit::train_small_mnist_models(
        Path::new(env!("CARGO_BIN_EXE_defuse")),
        &repo().join("data/mnist"),
        dir,
    )
}

/// The whole MNIST test split, 20 shards of 500 images.
pub fn config(out: &Path, clf: &Path, vae: &Path) -> String {
    format!(
        r#"
name = "dist"
seed = 11
out = "{out}"
[data]
path = "{data}"
limit_train = 4000
[models]
classifier = "{clf}"
vae = "{vae}"
[identify]
samples = 24
keep = 2
shard_size = 500
perturbation = {{ kind = "gaussian", sigma = 0.5 }}
[distill]
max_components = 20
[label]
discard_non_failures = false
[correct]
samples_per_scenario = 40
"#,
        out = out.display(),
        data = repo().join("data/mnist").display(),
        clf = clf.display(),
        vae = vae.display()
    )
}

pub struct Cluster {
    pub dir: PathBuf,
    pub redis: Redis,
    pub s3: S3,
    pub port: u16,
    pub metrics_port: u16,
    pub coordinator: Option<Proc>,
    pub workers: Vec<Proc>,
}

impl Cluster {
    pub fn start(dir: &Path) -> Cluster {
        let mut c = Cluster {
            dir: dir.into(),
            redis: Redis::start(true),
            s3: S3::start(),
            port: free_port(),
            metrics_port: free_port(),
            coordinator: None,
            workers: vec![],
        };
        c.start_coordinator();
        c
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn start_coordinator(&mut self) {
        let mut cmd = defuse();
        cmd.args([
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--redis",
            &self.redis.url(),
            "--http-listen",
            &format!("127.0.0.1:{}", self.metrics_port),
        ])
        .args([
            "--artifacts",
            "s3://defuse/test",
            "--lease-ms",
            "3000",
            "--heartbeat-ms",
            "300",
            "--max-attempts",
            "3",
        ])
        .arg("--work-dir")
        .arg(self.dir.join("coordinator-work"))
        // the jobs read the repository's data (data/mnist links into the cache) and the
        // models trained in the test's folder
        .arg("--allow-path")
        .arg(repo())
        .arg("--allow-path")
        .arg(repo().join("data/mnist").canonicalize().unwrap())
        .arg("--allow-path")
        .arg(&self.dir)
        .envs(self.s3.env());
        let n = self.dir.read_dir().map(|d| d.count()).unwrap_or(0);
        let p = Proc::spawn(&format!("coordinator-{n}"), &mut cmd, &self.dir);
        assert!(
            wait_port(self.port, Duration::from_secs(20)),
            "coordinator did not listen:\n{}",
            p.tail(30)
        );
        self.coordinator = Some(p);
    }

    pub fn start_worker(&mut self, extra: &[&str]) -> usize {
        let i = self.workers.len();
        let mut cmd = defuse();
        cmd.args(["worker", "--coordinator", &self.url(), "--threads", "1"])
            .arg("--cache-dir")
            .arg(self.dir.join(format!("worker-{i}")))
            .args(extra)
            .envs(self.s3.env());
        self.workers
            .push(Proc::spawn(&format!("worker-{i}"), &mut cmd, &self.dir));
        i
    }

    /// The id worker `i` registered with (from its log).
    pub fn worker_id(&self, i: usize) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.workers[i].log_text();
            if let Some(id) = log
                .lines()
                .find(|l| l.contains("worker registered"))
                .and_then(|l| l.split("worker=").nth(1))
                .map(|s| s.split_whitespace().next().unwrap().to_string())
            {
                return id;
            }
            assert!(
                Instant::now() < end,
                "worker {i} never registered:\n{}",
                self.workers[i].tail(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn submit(&self, cfg: &Path) -> String {
        let out = defuse()
            .args([
                "submit",
                cfg.to_str().unwrap(),
                "--coordinator",
                &self.url(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "submit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn status(&self, job: &str) -> Option<serde_json::Value> {
        let out = defuse()
            .args(["status", job, "--json", "--coordinator", &self.url()])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get(0).cloned()
    }

    /// Polls until `pred` holds on the job's status.
    pub fn wait_for(
        &self,
        job: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.status(job) {
                if pred(&s) {
                    return s;
                }
                if s["state"] == "failed" && what != "failed" {
                    panic!("job failed while waiting for {what}: {}", s["error"]);
                }
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        panic!(
            "timed out waiting for {what}: last status {:?}",
            self.status(job)
        );
    }
}

/// Prometheus samples `name{labels} value` whose labels include every one of `with`.
pub fn scrape(port: u16, name: &str, with: &[&str]) -> Vec<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

pub fn identify(s: &serde_json::Value) -> serde_json::Value {
    s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["step"] == "identify")
        .cloned()
        .unwrap()
}

pub fn redis_shards(url: &str, job: &str) -> Vec<(String, String)> {
    redis_hash(url, &format!("{{job:{job}}}:shards"))
}

/// The parts of fine-tune round `round` of `job`, as Redis holds them.
#[allow(dead_code)]
pub fn redis_round_parts(url: &str, job: &str, round: u32) -> Vec<(String, String)> {
    redis_hash(url, &format!("{{job:{job}}}:round:{round}:shards"))
}

fn redis_hash(url: &str, key: &str) -> Vec<(String, String)> {
    let out = Command::new("redis-cli")
        .args(["-u", url, "HGETALL", key])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Vec<String> = text.lines().map(str::to_string).collect();
    v.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

/// The distributed run in `work` (a coordinator's job folder) found exactly the
/// embedded run's failures in `emb`, byte for byte, and wrote the same report (less
/// timings and names). At least `min_failures` failures, so the check means something.
pub fn assert_same_result(emb: &Path, work: &Path, min_failures: usize) {
    let read = |d: &Path| {
        defuse_core::identify::Failures::read(&d.join("identify/failures.safetensors"))
            .unwrap()
            .0
    };
    let (a, b) = (read(emb), read(work));
    assert!(a.len() > min_failures, "{} failures", a.len());
    assert_eq!(a.source_index, b.source_index);
    assert_eq!(a.predicted, b.predicted);
    assert_eq!(a.eps_norm, b.eps_norm);
    assert_eq!(a.confidence, b.confidence);
    assert!(a.codes.equal(&b.codes), "codes differ");
    let summary = |d: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("report/summary.json")).unwrap())
                .unwrap();
        for k in ["step_seconds", "model", "job"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    assert_eq!(summary(emb), summary(work));
}

/// One field of a job's shard hash in Redis (`<shard>:<name>`), empty when absent.
pub fn field(fields: &[(String, String)], key: &str) -> String {
    fields
        .iter()
        .find(|(f, _)| f == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Everything every coordinator process of the test logged (`coordinator-*.log`).
pub fn coordinator_logs(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("coordinator-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}
