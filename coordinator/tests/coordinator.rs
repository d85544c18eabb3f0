//! The coordinator in process, over a real Redis: bad configs are refused at submit,
//! and a Redis that lost its data fails the job loudly instead of hanging.
use std::sync::Arc;
use std::time::Duration;

use defuse_coordinator::store::redis::RedisStore;
use defuse_coordinator::store::{JobState, StateStore};
use defuse_coordinator::{Coordinator, CoordinatorConfig};
use defuse_core::artifacts::LocalStore;
use defuse_testkit::Redis;

fn config(data: &std::path::Path) -> String {
    format!(
        "name = \"t\"\n[data]\npath = \"{}\"\n[train]\nclassifier_epochs = 1\nvae_epochs = 1\n",
        data.display()
    )
}

#[tokio::test]
async fn submit_refuses_bad_configs_and_lost_state_fails_the_job() {
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StateStore> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let cfg = CoordinatorConfig {
        tick_ms: 50,
        work_dir: dir.path().join("work"),
        // the jobs read temporary folders (tests/security.rs checks the roots)
        allowed_roots: None,
        ..Default::default()
    };
    let coord = Coordinator::new(
        cfg,
        store.clone(),
        Arc::new(LocalStore::new(dir.path().join("artifacts"))),
    );

    // refused before anything is stored
    for (bad, expect) in [
        ("not toml [".to_string(), "job config"),
        (
            "[data]\npath = \"/nonexistent\"\n".to_string(),
            "not a folder",
        ),
        (
            config(dir.path()).replace("[train]", "[identify]\nsamples = 0\n[train]"),
            "identify.samples",
        ),
        (
            config(dir.path()).replace("[train]", "[bogus]\n[train]"),
            "unknown field",
        ),
        ("x".repeat(5 * 1024 * 1024), "4 MiB"),
    ] {
        let e = coord.submit(&bad, None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains(expect), "{expect}: {e}");
    }
    assert!(store.list_jobs().await.unwrap().is_empty());
    let e = coord
        .submit(&config(dir.path()), Some("bad id!".into()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // a job is accepted; then Redis loses everything. Its data is real (MNIST), so
    // its models step is still training when that happens: a job that had already
    // failed (on an empty folder, fast on a busy machine) would leave nothing to lose
    let mnist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    let id = coord
        .submit(&config(&mnist), Some("job-1".into()))
        .await
        .unwrap();
    assert_eq!(
        store.get_job(&id).await.unwrap().unwrap().state,
        JobState::Queued
    );
    // the same job again under its id is the job already there (a retried
    // `submit --wait`, a restarted runner pod); another config under it is refused
    assert_eq!(
        coord
            .submit(&config(&mnist), Some("job-1".into()))
            .await
            .unwrap(),
        id
    );
    let e = coord
        .submit(
            &config(&mnist).replace("[train]", "[identify]\nsamples = 3\n[train]"),
            Some("job-1".into()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    assert!(e.to_string().contains("another config"), "{e}");
    assert_eq!(store.list_jobs().await.unwrap().len(), 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(defuse_coordinator::serve(
        coord.clone(),
        listener,
        None,
        std::future::pending(),
    ));

    // absurd message sizes are refused by the server's decoding limit (4 MiB), and
    // it goes on serving
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut jobs = defuse_proto::job_service_client::JobServiceClient::new(ch.clone())
        .max_encoding_message_size(64 << 20);
    let e = jobs
        .submit(defuse_proto::SubmitRequest {
            config_toml: "#".repeat(6 << 20),
            job_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    let mut workers = defuse_proto::worker_service_client::WorkerServiceClient::new(ch)
        .max_encoding_message_size(64 << 20);
    let e = workers
        .lease(defuse_proto::LeaseRequest {
            worker_id: "w".repeat(5 << 20),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    let listed = jobs
        .list(defuse_proto::ListRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.into_inner().jobs.len(), 1, "still serving");
    let mut c = ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // the driver has taken the job up (so it knows the job was active) before its
    // state goes; flushed earlier, the job would just be gone, with nothing to record
    let mut taken_up = false;
    for _ in 0..1200 {
        if store
            .get_job(&id)
            .await
            .unwrap()
            .is_some_and(|r| r.state == JobState::Running)
        {
            taken_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taken_up, "the driver never started the job");
    let _: () = ::redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    // up to 60 s: on a loaded machine (the suite in parallel, this job training on
    // every core) the driver's next tick can be seconds away
    let (mut rec, mut seen) = (None, None);
    for _ in 0..1200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(r) = store.get_job(&id).await.unwrap() {
            if r.state == JobState::Failed {
                rec = Some(r);
                break;
            }
            seen = Some((r.state, r.error));
        }
    }
    let rec = rec.unwrap_or_else(|| {
        panic!("the lost job is recorded as failed; last seen after the flush: {seen:?}")
    });
    assert!(
        rec.error.contains("state is gone from the state store"),
        "{}",
        rec.error
    );
    server.abort();
}
