//! The coordinator as an attacker meets it: a real server (gRPC and HTTP on loopback,
//! state in memory) started with two tokens, allowed folders and tight HTTP limits.
//! Each block tries one attack from issue "Access, sessions and limits" and checks it
//! is refused, and that the legitimate request beside it still works:
//! a worker token on the job API, a job reading `/etc`, the session cookie's flags and
//! signature, a cross-site POST, a form without its CSRF token, a non-JSON body,
//! guessing the token at `/login`, a client that sends its headers slowly, tokens that
//! are too short or shared.
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use defuse_coordinator::store::memory::MemoryStore;
use defuse_coordinator::{Coordinator, CoordinatorConfig, HttpLimits};
use defuse_core::artifacts::LocalStore;
use defuse_proto::auth::Secret;
use defuse_proto::job_service_client::JobServiceClient;
use defuse_proto::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;

const USER: &str = "user-token-0123456789abcdef0123456789abcdef";
const WORKER: &str = "worker-token-0123456789abcdef0123456789abcd";
const METRICS: &str = "metrics-token-0123456789abcdef0123456789abc";

fn coordinator(dir: &std::path::Path, user: &str, worker: &str) -> Coordinator {
    let cfg = CoordinatorConfig {
        work_dir: dir.join("work"),
        token: Some(Secret::new(user)),
        worker_token: Some(Secret::new(worker)),
        metrics_token: Some(Secret::new(METRICS)),
        allowed_roots: Some(vec![dir.join("allowed")]),
        http_limits: HttpLimits {
            header_timeout: Duration::from_secs(1),
            logins_per_minute: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    Coordinator::new(
        cfg,
        Arc::new(MemoryStore::new()),
        Arc::new(LocalStore::new(dir.join("artifacts"))),
    )
}

/// One HTTP/1.1 request on its own connection: (status, headers, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

async fn http_async(
    port: u16,
    method: &'static str,
    path: String,
    headers: Vec<String>,
    body: String,
) -> (u16, String, String) {
    tokio::task::spawn_blocking(move || {
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        http(port, method, &path, &h, &body)
    })
    .await
    .unwrap()
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, defuse_proto::auth::Bearer>;

fn authed(ch: &Channel, token: &str) -> Authed {
    defuse_proto::auth::AuthChannel::new(
        ch.clone(),
        defuse_proto::auth::Bearer::new(Some(token)).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_on_a_running_coordinator_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("allowed/data")).unwrap();

    // tokens that are too short, shared or half-set: the coordinator does not start
    for (user, worker, says) in [
        ("short", WORKER, "at least 32"),
        (USER, "short", "at least 32"),
        (USER, USER, "the same"),
        (METRICS, WORKER, "the same"),
    ] {
        let c = coordinator(dir, user, worker);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = defuse_coordinator::serve(c, l, None, std::future::pending())
            .await
            .unwrap_err();
        assert!(e.to_string().contains(says), "{says}: {e}");
    }

    let coord = coordinator(dir, USER, WORKER);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, port) = (grpc.local_addr().unwrap(), web.local_addr().unwrap().port());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(defuse_coordinator::serve(
        coord,
        grpc,
        Some((
            web,
            defuse_coordinator::http::HttpOptions {
                metrics: Some(Arc::new(|| "defuse_up 1\n".to_string())),
            },
        )),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // ---- roles: a worker's token opens only the worker API ----
    let mut as_worker = JobServiceClient::new(authed(&ch, WORKER));
    let submit = defuse_proto::SubmitRequest {
        config_toml: format!(
            "[data]\npath = \"{}\"\n",
            dir.join("allowed/data").display()
        ),
        job_id: "j1".into(),
    };
    let refusals = [
        as_worker.submit(submit.clone()).await.map(|_| ()),
        as_worker
            .label(defuse_proto::LabelRequest {
                job_id: "j1".into(),
                labels: [("0".to_string(), "discard".to_string())].into(),
            })
            .await
            .map(|_| ()),
        as_worker
            .cancel(defuse_proto::CancelRequest {
                job_id: "j1".into(),
            })
            .await
            .map(|_| ()),
        as_worker
            .delete(defuse_proto::DeleteRequest {
                job_id: "j1".into(),
            })
            .await
            .map(|_| ()),
    ];
    for r in refusals {
        let e = r.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(
            e.message()
                .contains("a worker token cannot call the job API"),
            "{e:?}"
        );
    }
    let mut as_user_on_workers = WorkerServiceClient::new(authed(&ch, USER));
    let e = as_user_on_workers
        .lease(defuse_proto::LeaseRequest {
            worker_id: "w".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message()
            .contains("a user token cannot call the worker API"),
        "{e:?}"
    );
    // the right tokens get in (an unregistered worker is told so, not unauthenticated)
    let mut as_user = JobServiceClient::new(authed(&ch, USER));
    assert!(as_user
        .list(defuse_proto::ListRequest::default())
        .await
        .is_ok());
    let r = WorkerServiceClient::new(authed(&ch, WORKER))
        .lease(defuse_proto::LeaseRequest {
            worker_id: "w".into(),
        })
        .await;
    assert!(
        !matches!(&r, Err(e) if e.code() == tonic::Code::Unauthenticated),
        "{r:?}"
    );

    // ---- paths: a job reads only the allowed folders; nothing stored when refused ----
    let auth = format!("Authorization: Bearer {USER}");
    let json = "Content-Type: application/json".to_string();
    for (path, field) in [
        ("/etc".to_string(), "data.path"),
        (format!("{}/allowed/../outside", dir.display()), "data.path"),
    ] {
        let body =
            serde_json::json!({"config": format!("[data]\npath = \"{path}\"\n")}).to_string();
        let (code, _, text) = http_async(
            port,
            "POST",
            "/api/jobs".into(),
            vec![auth.clone(), json.clone()],
            body,
        )
        .await;
        assert_eq!(code, 400, "{path}: {text}");
        assert!(text.contains(field) && text.contains("outside"), "{text}");
    }
    let body = serde_json::json!({"config": format!(
        "[data]\npath = \"{}\"\n[models]\nclassifier = \"/etc/passwd\"\n",
        dir.join("allowed/data").display()
    )})
    .to_string();
    let (code, _, text) = http_async(
        port,
        "POST",
        "/api/jobs".into(),
        vec![auth.clone(), json.clone()],
        body,
    )
    .await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("models.classifier"), "{text}");
    let (_, _, listed) = http_async(
        port,
        "GET",
        "/api/jobs".into(),
        vec![auth.clone()],
        String::new(),
    )
    .await;
    assert_eq!(listed.trim(), "[]", "a refused job was stored");
    let body = serde_json::json!({"config": submit.config_toml, "job_id": "j1"}).to_string();
    let (code, _, text) = http_async(
        port,
        "POST",
        "/api/jobs".into(),
        vec![auth.clone(), json.clone()],
        body,
    )
    .await;
    assert_eq!(code, 201, "a job inside the allowed folder: {text}");

    // ---- JSON APIs take JSON only; other sites' pages are refused ----
    let (code, _, text) = http_async(
        port,
        "POST",
        "/api/jobs/j1/labels".into(),
        vec![auth.clone(), "Content-Type: text/plain".into()],
        r#"{"0": "discard"}"#.into(),
    )
    .await;
    assert_eq!(code, 415, "{text}");
    let (code, _, _) = http_async(
        port,
        "POST",
        "/api/jobs/j1/cancel".into(),
        vec![auth.clone(), "Origin: https://evil.example".into()],
        String::new(),
    )
    .await;
    assert_eq!(code, 403, "a cross-site POST");

    // ---- sessions: signing in gives a signed, expiring cookie that is not the token ----
    let form = "Content-Type: application/x-www-form-urlencoded".to_string();
    let (code, _, _) = http_async(
        port,
        "POST",
        "/login".into(),
        vec![form.clone()],
        "token=wrong&next=/".into(),
    )
    .await;
    assert_eq!(code, 401);
    let (code, head, _) = http_async(
        port,
        "POST",
        "/login".into(),
        vec![form.clone()],
        format!("token={USER}&next=/"),
    )
    .await;
    assert_eq!(code, 303, "{head}");
    let set_cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .unwrap_or_else(|| panic!("no cookie: {head}"))
        .to_string();
    assert!(
        !set_cookie.contains(USER),
        "the cookie carries the token: {set_cookie}"
    );
    for flag in ["HttpOnly", "SameSite=Strict", "Max-Age=43200", "Path=/"] {
        assert!(set_cookie.contains(flag), "{flag}: {set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let pair = set_cookie.split(';').next().unwrap().to_string();
    let cookie = format!("Cookie: {pair}");
    let (code, head, page) =
        http_async(port, "GET", "/".into(), vec![cookie.clone()], String::new()).await;
    assert_eq!(code, 200);
    // the page runs no script and cannot be framed or sniffed
    let head_lc = head.to_ascii_lowercase();
    for h in [
        "content-security-policy: default-src 'none'",
        "frame-ancestors 'none'",
        "x-content-type-options: nosniff",
    ] {
        assert!(head_lc.contains(h), "{h}: {head}");
    }
    // sign-in sends the browser back only to a path of this site
    let (code, head, _) = http_async(
        port,
        "POST",
        "/login".into(),
        vec![form.clone()],
        format!("token={USER}&next=/%09/evil.example"),
    )
    .await;
    assert_eq!(code, 303, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("location: /\r\n"),
        "{head:?}"
    );
    // a cookie altered by hand (a later expiry) is refused
    let value = pair.split_once('=').unwrap().1;
    let mut parts: Vec<&str> = value.split('.').collect();
    let later = (parts[1].parse::<u64>().unwrap() + 86_400).to_string();
    parts[1] = &later;
    let forged = format!("Cookie: defuse_session={}", parts.join("."));
    let (code, _, _) = http_async(port, "GET", "/".into(), vec![forged], String::new()).await;
    assert_eq!(code, 401, "a forged session cookie");

    // ---- CSRF: a form posted with the cookie needs the session's token ----
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the signed-in page carries its CSRF token")
        .to_string();
    assert_eq!(csrf.len(), 64);
    for body in [
        "scenario-0=discard".to_string(),
        "scenario-0=discard&csrf=00".to_string(),
    ] {
        let (code, _, text) = http_async(
            port,
            "POST",
            "/jobs/j1/labels".into(),
            vec![cookie.clone(), form.clone()],
            body,
        )
        .await;
        assert_eq!(code, 403, "a forged form: {text}");
        assert!(text.contains("CSRF"), "{text}");
    }
    let (code, _, text) = http_async(
        port,
        "POST",
        "/jobs/j1/labels".into(),
        vec![cookie.clone(), form.clone()],
        format!("scenario-0=discard&csrf={csrf}"),
    )
    .await;
    assert_ne!(
        code, 403,
        "the page's own form passes the CSRF check: {text}"
    );
    assert!(!text.contains("CSRF"), "{text}");
    // the JSON API with the cookie: the token in a header
    let (code, _, _) = http_async(
        port,
        "POST",
        "/api/jobs/j1/cancel".into(),
        vec![cookie.clone()],
        String::new(),
    )
    .await;
    assert_eq!(code, 403, "the API with a cookie and no X-CSRF-Token");
    let (code, _, text) = http_async(
        port,
        "POST",
        "/api/jobs/j1/cancel".into(),
        vec![cookie.clone(), format!("X-CSRF-Token: {csrf}")],
        String::new(),
    )
    .await;
    assert_ne!(code, 403, "{text}");
    assert!(!text.contains("CSRF"), "{text}");

    // ---- /login is rate limited per address (4 a minute here; 3 used above) ----
    let mut codes = Vec::new();
    for _ in 0..3 {
        let (code, head, _) = http_async(
            port,
            "POST",
            "/login".into(),
            vec![form.clone()],
            "token=guess&next=/".into(),
        )
        .await;
        if code == 429 {
            assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
        }
        codes.push(code);
    }
    assert_eq!(codes, [401, 429, 429]);

    // ---- a client that sends its request head slowly is cut off ----
    let slow = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let t = Instant::now();
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        (
            r.is_ok(),
            t.elapsed(),
            String::from_utf8_lossy(&buf).to_string(),
        )
    });
    // and one that connects and says nothing at all
    let silent = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).is_ok()
    });
    // meanwhile others are served
    let (code, _, _) = http_async(port, "GET", "/healthz".into(), vec![], String::new()).await;
    assert_eq!(code, 200);
    let (closed, after, answer) = slow.await.unwrap();
    assert!(
        closed,
        "the server closed the slow connection (the client's 30 s read timeout did not fire)"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "the slow client got an answer: {answer:?} after {after:?}"
    );
    assert!(
        silent.await.unwrap(),
        "the server closed the silent connection (the client's 30 s read timeout did not fire)"
    );

    // ---- the metrics token opens /metrics and nothing else ----
    let scrape = format!("Authorization: Bearer {METRICS}");
    let (code, _, body) = http(port, "GET", "/metrics", &[&scrape], "");
    assert_eq!((code, body.as_str()), (200, "defuse_up 1\n"));
    let user = format!("Authorization: Bearer {USER}");
    assert_eq!(http(port, "GET", "/metrics", &[&user], "").0, 200);
    assert_eq!(http(port, "GET", "/metrics", &[], "").0, 401);
    for path in ["/api/jobs", "/"] {
        let (code, _, _) = http(port, "GET", path, &[&scrape], "");
        assert_eq!(code, 401, "the metrics token opened {path}");
    }
    let e = JobServiceClient::new(authed(&ch, METRICS))
        .list(defuse_proto::ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // ---- gRPC health and reflection: open without a token, and reveal no job ----
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut health = HealthClient::new(ch.clone());
    for service in ["", "defuse.v1.JobService", "defuse.v1.WorkerService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "health of {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "defuse.v1.NoSuchService".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut answers = ServerReflectionClient::new(ch.clone())
        .server_reflection_info(tokio_stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "defuse.v1.JobService".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let listed = match answers.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("list services answered {other:?}"),
    };
    for want in [
        "defuse.v1.JobService",
        "defuse.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(listed.iter().any(|n| n == want), "{want} not in {listed:?}");
    }
    match answers.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(f)) => {
            assert!(!f.file_descriptor_proto.is_empty());
            let raw = f.file_descriptor_proto.concat();
            assert!(
                raw.windows(b"SubmitRequest".len())
                    .any(|w| w == b"SubmitRequest"),
                "the descriptor of JobService lacks SubmitRequest"
            );
        }
        other => panic!("file containing JobService answered {other:?}"),
    }
    // the job API itself still wants the token
    let e = JobServiceClient::new(ch.clone())
        .list(defuse_proto::ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
