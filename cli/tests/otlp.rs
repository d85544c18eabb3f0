//! The OTLP exporter (`--features otlp`): a command's spans reach an OTLP/HTTP
//! endpoint, and a job is one trace across processes (submit, the coordinator, a
//! worker's task). The endpoint here is a small HTTP server in the test that keeps what
//! it receives and answers 200, as a collector would.
#![cfg(feature = "otlp")]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

/// Accepts requests until the test ends; sends (path, body) of each.
fn collector() -> (u16, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            let _ = tx.send((path, body));
        }
    });
    (port, rx)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn spans_of_a_command_reach_the_otlp_endpoint() {
    let (port, rx) = collector();
    let dir = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    let out = Command::new(env!("CARGO_BIN_EXE_defuse"))
        .args(["train", "classifier", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("c.safetensors"))
        .args([
            "--epochs",
            "1",
            "--limit-train",
            "256",
            "--max-batches",
            "2",
        ])
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_SERVICE_NAME", "defuse-otlp-test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (path, body) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no OTLP export arrived");
    assert_eq!(path, "/v1/traces");
    // protobuf keeps strings as they are: the service and the command's span
    assert!(contains(&body, b"defuse-otlp-test"), "service name missing");
    assert!(contains(&body, b"command"), "span 'command' missing");
    assert!(contains(&body, b"train"), "the command's name missing");
}

/// The 16 bytes of a trace id given as 32 hex digits.
fn trace_bytes(hex: &str) -> Vec<u8> {
    assert_eq!(hex.len(), 32, "trace id {hex:?}");
    (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_job_is_one_trace_from_submit_to_every_worker_task() {
    let (port, rx) = collector();
    let endpoint = format!("http://127.0.0.1:{port}");
    // every process this test starts exports to the collector (named by service)
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    std::env::set_var("OTEL_SERVICE_NAME", "defuse-coordinator");
    let dir = tempfile::tempdir().unwrap();
    let (clf, vae) = common::train_models(dir.path());
    let mut cluster = common::Cluster::start(dir.path());
    // each process names its service by the variable it inherits when started
    std::env::set_var("OTEL_SERVICE_NAME", "defuse-worker");
    cluster.start_worker(&[]);
    let cfg = dir.path().join("job.toml");
    let text = common::config(&dir.path().join("out"), &clf, &vae).replace(
        "limit_train = 4000",
        "limit_train = 4000\nlimit_test = 1000",
    );
    std::fs::write(&cfg, text).unwrap();

    // submit with a trace of the caller's own: the command's span
    std::env::set_var("OTEL_SERVICE_NAME", "defuse-submit");
    let job = cluster.submit(&cfg);
    let trace = cluster.status(&job).unwrap()["trace_id"]
        .as_str()
        .unwrap()
        .to_string();
    let id = trace_bytes(&trace);

    // what each process exported, until the worker has sent a task span
    let (mut submit, mut coordinator, mut worker_task) = (false, false, false);
    let end = std::time::Instant::now() + Duration::from_secs(240);
    while !(submit && coordinator && worker_task) && std::time::Instant::now() < end {
        let Ok((path, body)) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        assert_eq!(path, "/v1/traces");
        if !contains(&body, &id) {
            continue;
        }
        // the submit's own span carries the job's trace id: the coordinator took the
        // caller's context, not a new trace
        submit |= contains(&body, b"defuse-submit") && contains(&body, b"command");
        coordinator |= contains(&body, b"defuse-coordinator") && contains(&body, b"grpc");
        worker_task |= contains(&body, b"defuse-worker") && contains(&body, b"task");
    }
    assert!(
        submit && coordinator && worker_task,
        "spans in trace {trace}: submit's {submit}, the coordinator's {coordinator}, a worker task's {worker_task}\n{}",
        cluster.workers[0].tail(20)
    );
    // the worker's own log names the trace on its task span too
    assert!(
        cluster.workers[0]
            .log_text()
            .contains(&format!("trace_id={trace}")),
        "{}",
        cluster.workers[0].tail(20)
    );
}
