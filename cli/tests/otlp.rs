//! The OTLP exporter (`--features otlp`): a command's spans reach an OTLP/HTTP
//! endpoint. The endpoint here is a small HTTP server in the test that keeps what it
//! receives and answers 200, as a collector would.
#![cfg(feature = "otlp")]
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
