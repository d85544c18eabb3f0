//! The labelling page in a real browser, and the token on every entry point.
//!
//! A coordinator started with a token (real Redis, a worker process) runs a job whose
//! labels are manual. While it waits, requests without the token or with a wrong one
//! get 401 (HTTP) or UNAUTHENTICATED (gRPC) and change nothing; bad labels are refused
//! with a message and store nothing. Then headless Chromium (Debian's, driven by
//! playwright-core) signs in, labels every scenario by choosing classes on the page,
//! submits, and reads the report; the numbers it shows must be the job's.
//! Screenshots of each page visited go to `$CARGO_TARGET_TMPDIR/web-screenshots/`.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use defuse_testkit::{cache_dir, free_port, wait_port, Proc, Redis};

const TOKEN: &str = "t0ken-for-the-web-test-0123456789abcdef";
const WORKER_TOKEN: &str = "w0rker-t0ken-for-the-web-test-0123456789";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn defuse() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_defuse"));
    c.env("RUST_LOG", "info")
        .env_remove("DEFUSE_TOKEN")
        .env_remove("DEFUSE_WORKER_TOKEN");
    c
}

/// One HTTP/1.1 request; returns (status, body).
fn http(port: u16, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

const JSON: &str = "Content-Type: application/json";

fn job_state(grpc: u16, job: &str) -> Option<String> {
    let out = defuse()
        .env("DEFUSE_TOKEN", TOKEN)
        .args(["status", job, "--json", "--coordinator"])
        .arg(format!("http://127.0.0.1:{grpc}"))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?["state"].as_str().map(str::to_string)
}

#[test]
fn a_person_labels_scenarios_in_the_browser_and_the_job_corrects() {
    let chromium = PathBuf::from("/usr/bin/chromium");
    let playwright = cache_dir().join("node-env/node_modules/playwright-core");
    assert!(
        chromium.exists() && playwright.exists(),
        "Chromium or playwright-core missing: run deploy/setup-test.sh (make setup-test)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    let (clf, vae) = defuse_testkit::train_small_mnist_models(
        Path::new(env!("CARGO_BIN_EXE_defuse")),
        &repo().join("data/mnist"),
        dir,
    );
    let redis = Redis::start(false);
    let (grpc, web) = (free_port(), free_port());
    let coordinator = Proc::spawn(
        "coordinator",
        defuse()
            .env("DEFUSE_TOKEN", TOKEN)
            .env("DEFUSE_WORKER_TOKEN", WORKER_TOKEN)
            .args(["coordinator", "--redis", &redis.url(), "--listen"])
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{web}"))
            .arg("--artifacts")
            .arg(format!("file://{}", dir.join("artifacts").display()))
            .arg("--work-dir")
            .arg(dir.join("work"))
            .arg("--allow-path")
            .arg(repo())
            .arg("--allow-path")
            .arg(repo().join("data/mnist").canonicalize().unwrap())
            .arg("--allow-path")
            .arg(dir),
        dir,
    );
    assert!(
        wait_port(grpc, Duration::from_secs(20)) && wait_port(web, Duration::from_secs(5)),
        "coordinator did not listen:\n{}",
        coordinator.tail(30)
    );
    let url = format!("http://127.0.0.1:{grpc}");

    // gRPC: a worker with a wrong token is refused and exits; a client without one too
    let mut intruder = Proc::spawn(
        "worker-wrong-token",
        defuse()
            .env("DEFUSE_WORKER_TOKEN", "wrong")
            .args(["worker", "--coordinator", &url])
            .arg("--cache-dir")
            .arg(dir.join("intruder")),
        dir,
    );
    let code = intruder.wait_timeout(Duration::from_secs(30));
    assert!(
        matches!(code, Some(c) if c != 0),
        "a worker with a wrong token must stop: {code:?}\n{}",
        intruder.tail(10)
    );
    assert!(intruder.log_text().contains("wrong token"));
    let out = defuse()
        .args(["status", "--coordinator", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DEFUSE_TOKEN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _worker = Proc::spawn(
        "worker",
        defuse()
            .env("DEFUSE_WORKER_TOKEN", WORKER_TOKEN)
            .args(["worker", "--threads", "1", "--coordinator", &url])
            .arg("--cache-dir")
            .arg(dir.join("worker")),
        dir,
    );
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
name = "web <b>test</b>"
seed = 5
[data]
path = "{data}"
limit_train = 4000
[models]
classifier = "{clf}"
vae = "{vae}"
[identify]
samples = 24
keep = 2
limit = 3000
shard_size = 1000
perturbation = {{ kind = "gaussian", sigma = 0.5 }}
[distill]
max_components = 12
[label]
mode = "manual"
[correct]
samples_per_scenario = 40
"#,
            data = repo().join("data/mnist").display(),
            clf = clf.display(),
            vae = vae.display()
        ),
    )
    .unwrap();
    let out = defuse()
        .env("DEFUSE_TOKEN", TOKEN)
        .args(["submit", cfg.to_str().unwrap(), "--job-id", "web-1"])
        .args(["--coordinator", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = "web-1";
    let end = Instant::now() + Duration::from_secs(300);
    while job_state(grpc, job).as_deref() != Some("awaiting_labels") {
        assert!(
            Instant::now() < end,
            "job never waited for labels: {:?}\n{}",
            job_state(grpc, job),
            coordinator.tail(30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let job_dir = dir.join("work").join(job);
    let labels_file = job_dir.join("labels.json");

    // HTTP: health checks are open; everything else needs the token
    assert_eq!(http(web, "GET", "/healthz", &[], "").0, 200);
    assert_eq!(http(web, "GET", "/readyz", &[], "").0, 200);
    let auth = format!("Authorization: Bearer {TOKEN}");
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/api/jobs"),
        ("GET", "/metrics"),
        ("GET", "/jobs/web-1/scenarios/0/grid.png"),
        ("GET", "/jobs/web-1/scenarios/0/failures.png"),
    ] {
        assert_eq!(http(web, method, path, &[], "").0, 401, "{path}");
        assert_eq!(
            http(web, method, path, &["Authorization: Bearer nope"], "").0,
            401,
            "{path}"
        );
        assert_eq!(http(web, method, path, &[&auth], "").0, 200, "{path}");
    }
    let (code, metrics) = http(web, "GET", "/metrics", &[&auth], "");
    assert_eq!(code, 200);
    assert!(metrics.contains("defuse_shards"), "{metrics}");
    assert!(!metrics.contains(TOKEN), "the token leaked into /metrics");
    // labels without the token, with a wrong one, or that make no sense: refused, nothing stored
    let good = r#"{"0": "discard"}"#;
    let cookie_wrong = "Cookie: defuse_session=v1.99999999999.00000000000000000000000000000000.00";
    for headers in [
        vec![],
        vec!["Authorization: Bearer nope"],
        vec![cookie_wrong],
    ] {
        let (code, _) = http(web, "POST", "/api/jobs/web-1/labels", &headers, good);
        assert_eq!(code, 401);
        let form = http(
            web,
            "POST",
            "/jobs/web-1/labels",
            &[
                &headers[..],
                &["Content-Type: application/x-www-form-urlencoded"],
            ]
            .concat(),
            "scenario-0=discard",
        );
        assert_eq!(form.0, 401);
    }
    for (body, says) in [
        (r#"{"999": 1}"#, "scenario 999 does not exist"),
        (r#"{"0": "banana"}"#, "'banana' is not a class"),
        (r#"{"0": 10}"#, "out of range"),
        ("[1, 2]", "expected a JSON object"),
        (r#"{"0": "discard"}"#, "give at least one"),
    ] {
        let (code, text) = http(web, "POST", "/api/jobs/web-1/labels", &[&auth, JSON], body);
        assert_eq!(code, 400, "{body}: {text}");
        assert!(text.contains(says), "{body}: {text}");
    }
    // the CLI's labels go through the same check
    let out = defuse()
        .env("DEFUSE_TOKEN", TOKEN)
        .args(["label", job, "0=banana", "--coordinator", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!labels_file.exists(), "a refused label was stored");
    assert_eq!(job_state(grpc, job).as_deref(), Some("awaiting_labels"));
    let names = http(web, "GET", "/", &[&auth], "").1;
    assert!(
        names.contains("web &lt;b&gt;test&lt;/b&gt;") && !names.contains("<b>test</b>"),
        "a job name must be escaped on the page"
    );

    // each scenario gets the true class most of its source images have
    let scenarios: Vec<defuse_core::scenarios::Scenario> =
        serde_json::from_slice(&std::fs::read(job_dir.join("distill/scenarios.json")).unwrap())
            .unwrap();
    assert!(!scenarios.is_empty());
    let chosen: serde_json::Map<String, serde_json::Value> = scenarios
        .iter()
        .map(|s| (s.id.to_string(), s.source_majority().unwrap().into()))
        .collect();

    let out = Command::new("node")
        .arg(repo().join("cli/tests/web/label.cjs"))
        .env("PLAYWRIGHT_CORE", &playwright)
        .env("CHROMIUM", &chromium)
        .env("BASE", format!("http://127.0.0.1:{web}"))
        .env("JOB", job)
        .env("TOKEN", TOKEN)
        .env(
            "LABELS",
            serde_json::Value::Object(chosen.clone()).to_string(),
        )
        .env("SHOTS", &shots)
        .env("PROFILE", dir.join("chromium-profile"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser script failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        coordinator.tail(30)
    );
    let seen: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    eprintln!("browser saw: {seen}\nscreenshots in {}", shots.display());
    assert_eq!(seen["unauthenticated_status"], 401);
    assert!(seen["wrong_token_text"]
        .as_str()
        .unwrap()
        .contains("wrong token"));
    assert_eq!(seen["state_before"], "awaiting_labels");
    assert_eq!(seen["scenarios_on_page"], scenarios.len());
    assert_eq!(seen["state_after"], "done", "{}", coordinator.tail(30));
    assert_eq!(seen["jobs_page_lists_job"], true);

    // the labels clicked are the labels stored, and correction ran on them
    let stored: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&labels_file).unwrap()).unwrap();
    assert_eq!(stored, chosen);
    let summary: defuse_core::report::Summary =
        serde_json::from_slice(&std::fs::read(job_dir.join("report/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary.n_labelled, scenarios.len());
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    assert_eq!(seen["test-before"], pct(summary.test_accuracy_before));
    assert_eq!(seen["test-after"], pct(summary.test_accuracy_after));
    assert_eq!(
        seen["scenario-before"],
        pct(summary.scenario_accuracy_before)
    );
    assert_eq!(seen["scenario-after"], pct(summary.scenario_accuracy_after));
    assert!(summary.scenario_accuracy_after > summary.scenario_accuracy_before);
    for name in [
        "01-sign-in",
        "03-awaiting-labels",
        "04-labelled",
        "06-report",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "{name}.png");
    }

    // a job that is done takes no more labels
    let (code, text) = http(web, "POST", "/api/jobs/web-1/labels", &[&auth, JSON], good);
    assert_eq!(code, 409, "{text}");
}
