//! TLS and secrets: a coordinator serving gRPC and HTTP over TLS (a private CA made
//! with openssl), a worker and the CLI reaching it over https:// with the token, and
//! clients that do not trust the certificate, or speak plain text, refused. No
//! secret (the token, the S3 secret key, the TLS private key, the Redis password)
//! appears in any log, and a Redis password on the command line is refused.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use defuse_testkit::{free_port, wait_port, Proc, Redis, S3, S3_SECRET};

mod common;
use common::{defuse, identify, repo};

const TOKEN: &str = "tls-test-token-5f1c9a-0123456789abcdef";
const WORKER_TOKEN: &str = "tls-test-worker-token-7d2e4b-0123456789";
const REDIS_PASSWORD: &str = "redis-pw-0b7e2d";
/// Our crates at debug level (where a leaked secret would show first).
const DEBUG_LOGS: &str = "debug,h2=info,hyper=info,aws=info,rustls=info,tower=info";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for localhost / 127.0.0.1 signed by it.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=defuse-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn tls_for_grpc_and_http_and_no_secret_in_any_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    certificates(dir);
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    std::fs::write(dir.join("worker-token"), WORKER_TOKEN).unwrap();
    let s3 = S3::start();
    let redis = Redis::start_with_password(REDIS_PASSWORD);
    // a password on the command line is refused (visible in ps); REDIS_URL is the way
    let out = Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_defuse"))
        .args([
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--redis", &redis.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("REDIS_URL"));
    let (port, http) = (free_port(), free_port());
    let mut cmd = defuse();
    cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--artifacts", "s3://defuse/tls"])
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--tls-cert")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.join("key.pem"))
        .env("REDIS_URL", redis.url())
        .env("DEFUSE_TOKEN_FILE", dir.join("token"))
        .env("DEFUSE_WORKER_TOKEN_FILE", dir.join("worker-token"))
        // the repository (data, model fixtures) and where data/mnist links to
        .env(
            "DEFUSE_ALLOW_PATHS",
            format!(
                "{}:{}",
                repo().display(),
                repo().join("data/mnist").canonicalize().unwrap().display(),
            ),
        )
        .env("RUST_LOG", DEBUG_LOGS)
        .envs(s3.env());
    let coordinator = Proc::spawn("coordinator", &mut cmd, dir);
    assert!(
        wait_port(port, Duration::from_secs(20)) && wait_port(http, Duration::from_secs(5)),
        "{}",
        coordinator.tail(20)
    );
    let https = format!("https://localhost:{port}");
    let client = |url: &str, ca: bool, token: bool| {
        let mut c = defuse();
        c.args(["status", "--json", "--coordinator", url]);
        if ca {
            c.env("DEFUSE_TLS_CA", dir.join("ca.pem"));
        }
        if token {
            c.env("DEFUSE_TOKEN_FILE", dir.join("token"));
        }
        c.output().unwrap()
    };

    // gRPC: the CA and the token let a client in
    let ok = client(&https, true, true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // without the CA the certificate is unknown; plain text to a TLS port fails;
    // TLS without the token is refused
    for (url, ca, token, why) in [
        (https.as_str(), false, true, "untrusted certificate"),
        (
            &format!("http://127.0.0.1:{port}") as &str,
            false,
            true,
            "plain text",
        ),
        (https.as_str(), true, false, "no token"),
    ] {
        let out = client(url, ca, token);
        assert!(!out.status.success(), "{why}: should fail");
        eprintln!("{why}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }

    // HTTP: HTTPS with the CA; the token still needed; plain HTTP refused
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let (ok, body) = curl(&["--cacert", ca, &format!("https://localhost:{http}/healthz")]);
    assert!(ok && body.contains("ok"), "{body}");
    let (ok, body) = curl(&[
        "--cacert",
        ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://localhost:{http}/api/jobs"),
    ]);
    assert!(ok && body.contains("401"), "{body}");
    let (ok, body) = curl(&[
        "--cacert",
        ca,
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &format!("https://localhost:{http}/api/jobs"),
    ]);
    assert!(ok && body.starts_with('['), "{body}");
    let (ok, body) = curl(&[&format!("https://localhost:{http}/healthz")]);
    assert!(!ok, "untrusted certificate accepted: {body}");
    let (ok, body) = curl(&[&format!("http://127.0.0.1:{http}/healthz")]);
    assert!(!ok || !body.contains("ok"), "plain http served: {body}");

    // a worker over TLS runs a job's shards
    let mut wcmd = defuse();
    wcmd.args(["worker", "--coordinator", &https, "--threads", "1"])
        .arg("--cache-dir")
        .arg(dir.join("worker"))
        .env("DEFUSE_TLS_CA", dir.join("ca.pem"))
        .env("DEFUSE_WORKER_TOKEN_FILE", dir.join("worker-token"))
        .env("RUST_LOG", DEBUG_LOGS)
        .envs(s3.env());
    let worker = Proc::spawn("worker", &mut wcmd, dir);
    let fx = repo().join("core/tests/fixtures");
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"tls\"\n[data]\npath = \"{}\"\nlimit_test = 200\n[models]\nclassifier = \"{fx}/classifier_ok.pt\"\nvae = \"{fx}/encoder_ok.pt\"\nvae_decoder = \"{fx}/decoder_ok.pt\"\n[identify]\nsearch = \"all\"\nsamples = 8\nshard_size = 100\n",
            repo().join("data/mnist").display(),
            fx = fx.display()
        ),
    )
    .unwrap();
    // a client that trusts the CA and has the token
    let trusted = |args: &[&str]| {
        defuse()
            .args(args)
            .args(["--coordinator", &https])
            .env("DEFUSE_TLS_CA", dir.join("ca.pem"))
            .env("DEFUSE_TOKEN_FILE", dir.join("token"))
            .output()
            .unwrap()
    };
    let out = trusted(&["submit", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let out = trusted(&["status", &job, "--json"]);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let st = &v[0];
            if st["state"] != "running" && st["state"] != "queued"
                || identify(st)["shards"]["done"] == 2
            {
                assert_eq!(identify(st)["shards"]["done"], 2, "{st}");
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "worker over TLS:\n{}",
            worker.tail(20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(worker.log_text().contains("worker registered"));
    assert!(
        coordinator.log_text().contains("redis://:***@127.0.0.1"),
        "the store is logged with its password masked"
    );

    // no secret in any log, even at debug level
    let key_pem = std::fs::read_to_string(dir.join("key.pem")).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap();
    for p in [&coordinator, &worker] {
        let log = p.log_text();
        assert!(!log.is_empty());
        for (name, secret) in [
            ("token", TOKEN),
            ("worker token", WORKER_TOKEN),
            ("S3 secret", S3_SECRET),
            ("TLS key", key_line),
            ("Redis password", REDIS_PASSWORD),
        ] {
            assert!(!log.contains(secret), "the {name} is in the {} log", p.name);
        }
    }
}
