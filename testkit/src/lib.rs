//! Test helpers shared by the crates' tests: free ports, private Redis and S3
//! (s3s-fs) servers started per test, and child processes that are killed on drop
//! and whose log tail is printed when a test fails.
pub mod load;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The cache of the set-up (`DEFUSE_CACHE`, default `~/.cache/defuse`).
pub fn cache_dir() -> PathBuf {
    std::env::var("DEFUSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/defuse")
        })
}

/// A child process whose output goes to a log file; killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`KILL`, `TERM`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to end, at most `timeout`; its exit code.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The last `n` lines of the log.
    pub fn tail(&self, n: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- last lines of {} ({}) -----\n{}\n-----",
                self.name,
                self.log.display(),
                self.tail(40)
            );
        }
        self.signal("CONT");
        self.kill();
    }
}

/// A private Redis server on a free port.
pub struct Redis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
    aof: bool,
    password: Option<String>,
}

impl Redis {
    /// Starts one; `aof`: append-only file on (for restart tests).
    pub fn start(aof: bool) -> Redis {
        Self::start_with(aof, None)
    }

    /// One that demands `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> Redis {
        Self::start_with(false, Some(password.into()))
    }

    fn start_with(aof: bool, password: Option<String>) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Redis {
            port: free_port(),
            dir,
            proc: None,
            aof,
            password,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// (Re)starts the server on the same port and folder.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--save",
            "",
        ])
        .args([
            "--appendonly",
            if self.aof { "yes" } else { "no" },
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(self.dir.path());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let p = Proc::spawn("redis", &mut cmd, self.dir.path());
        assert!(
            wait_port(self.port, Duration::from_secs(10)),
            "redis did not start:\n{}",
            p.tail(20)
        );
        self.proc = Some(p);
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// A private S3-compatible server (s3s-fs, installed by `deploy/setup-test.sh`).
pub struct S3 {
    pub port: u16,
    pub root: tempfile::TempDir,
    pub proc: Proc,
}

pub const S3_KEY: &str = "defuse-test-key";
pub const S3_SECRET: &str = "defuse-test-secret";

impl S3 {
    pub fn binary() -> PathBuf {
        cache_dir().join("bin/bin/s3s-fs")
    }

    pub fn start() -> S3 {
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let proc = Self::spawn(port, root.path());
        S3 { port, root, proc }
    }

    /// Kills the server (SIGKILL): clients get connection refused until `restart`.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same port and folder (the objects are kept).
    pub fn restart(&mut self) {
        self.proc.kill();
        self.proc = Self::spawn(self.port, self.root.path());
    }

    fn spawn(port: u16, root: &Path) -> Proc {
        let mut cmd = Command::new(Self::binary());
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            S3_KEY,
            "--secret-key",
            S3_SECRET,
        ])
        .arg(root);
        let proc = Proc::spawn("s3s-fs", &mut cmd, root);
        assert!(
            wait_port(port, Duration::from_secs(10)),
            "s3s-fs did not start (run deploy/setup-test.sh):\n{}",
            proc.tail(20)
        );
        proc
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment an S3 client needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", S3_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// Small MNIST models for tests, trained by the `defuse` binary on 4,000 training
/// images: a CNN of width 8 (1 epoch) and a VAE with latent 6 (2 epochs). Returns
/// (classifier, vae) under `dir`.
pub fn train_small_mnist_models(defuse: &Path, data: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let (clf, vae) = (dir.join("clf.safetensors"), dir.join("vae.safetensors"));
    let train = |what: &str, out: &Path, args: &[&str]| {
        let st = Command::new(defuse)
            .args(["train", what, "--data"])
            .arg(data)
            .arg("--out")
            .arg(out)
            .args(["--limit-train", "4000"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "defuse train {what} failed");
    };
    train("classifier", &clf, &["--epochs", "1", "--width", "8"]);
    train(
        "vae",
        &vae,
        &[
            "--epochs", "2", "--latent", "6", "--width", "16", "--hidden", "64",
        ],
    );
    (clf, vae)
}

/// Resident memory of process `pid` in KiB (Linux `/proc/PID/status`, `VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
