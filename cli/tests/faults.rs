//! The fault matrix, with real processes: one job lives through workers SIGKILLed
//! twice, a worker hung (SIGSTOP) past its lease that wakes up, Redis restarted (its
//! append-only file on) and then unreachable for 10 s, the S3 server down for 10 s, and
//! the coordinator SIGKILLed and restarted twice. The job's *result* must equal the
//! embedded run's: the same failure codes byte for byte and the same report. A second
//! test deletes an accepted shard output under the job's feet, then replaces one with
//! other bytes: each job fails, naming the object (and, for the replaced one, that its
//! content changed after it was accepted).
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Waits until worker `id` holds a leased shard (read from Redis); the shard.
fn wait_lease_of(c: &Cluster, job: &str, id: &str, timeout: Duration) -> Option<String> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let f = redis_shards(&c.redis.url(), job);
        for (k, v) in &f {
            if let Some(shard) = k.strip_suffix(":owner") {
                let leased = f
                    .iter()
                    .any(|(k2, v2)| *k2 == format!("{shard}:state") && v2 == "leased");
                if v == id && leased {
                    return Some(shard.to_string());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn done(c: &Cluster, job: &str) -> u64 {
    c.status(job)
        .map(|s| identify(&s)["shards"]["done"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

#[test]
fn a_job_survives_the_fault_matrix_with_the_embedded_result() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);
    // 32 shards of 250 images (8,000: the last 20% is held out), Q = 75: long enough to
    // take every fault mid-identify
    let cfg_text = config(&dir.join("embedded"), &clf, &vae)
        .replace("shard_size = 500", "shard_size = 250")
        .replace("samples = 24", "samples = 75");
    let cfg_path = dir.join("job.toml");
    std::fs::write(&cfg_path, &cfg_text).unwrap();
    let started = Instant::now();
    let st = defuse()
        .args(["run", cfg_path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());
    eprintln!("embedded run: {:.1} s", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let mut c = Cluster::start(dir);
    for _ in 0..3 {
        c.start_worker(&[]);
    }
    let job = c.submit(&cfg_path);
    let ids: Vec<String> = (0..3).map(|i| c.worker_id(i)).collect();
    let mut log = Vec::new();

    // 1. SIGKILL worker 0 while it holds a shard; a new worker joins
    wait_lease_of(&c, &job, &ids[0], Duration::from_secs(120)).expect("worker 0 leased");
    c.workers[0].signal("KILL");
    c.start_worker(&[]);
    log.push(format!("killed worker 0 at {} shards done", done(&c, &job)));

    // 2. SIGSTOP worker 1 holding a shard, past its 3 s lease; then it wakes up
    let shard = wait_lease_of(&c, &job, &ids[1], Duration::from_secs(60)).expect("worker 1");
    c.workers[1].signal("STOP");
    std::thread::sleep(Duration::from_secs(6));
    c.workers[1].signal("CONT");
    log.push(format!("hung worker 1 for 6 s on shard {shard}"));

    // 3. Redis restarted (append-only file on)
    c.redis.restart();
    log.push(format!("restarted redis at {} shards done", done(&c, &job)));

    // 4. the coordinator SIGKILLed and restarted (first time)
    std::thread::sleep(Duration::from_secs(1));
    c.coordinator.as_ref().unwrap().signal("KILL");
    std::thread::sleep(Duration::from_millis(300));
    c.start_coordinator();
    log.push(format!(
        "restarted the coordinator at {} shards done",
        done(&c, &job)
    ));

    // 5. Redis unreachable for 10 s (stopped, connections hang)
    c.redis.proc.as_ref().unwrap().signal("STOP");
    std::thread::sleep(Duration::from_secs(10));
    c.redis.proc.as_ref().unwrap().signal("CONT");
    log.push(format!(
        "redis back after 10 s at {} shards done",
        done(&c, &job)
    ));

    // 6. SIGKILL another worker mid-shard
    wait_lease_of(&c, &job, &ids[2], Duration::from_secs(60)).expect("worker 2 leased");
    c.workers[2].signal("KILL");
    c.start_worker(&[]);
    log.push(format!("killed worker 2 at {} shards done", done(&c, &job)));

    // 7. the S3 server down for 10 s
    c.s3.stop();
    std::thread::sleep(Duration::from_secs(10));
    c.s3.restart();
    log.push(format!(
        "s3 back after 10 s at {} shards done",
        done(&c, &job)
    ));

    // 8. the coordinator SIGKILLed and restarted (second time)
    c.coordinator.as_ref().unwrap().signal("KILL");
    std::thread::sleep(Duration::from_millis(300));
    c.start_coordinator();
    let at_last_fault = done(&c, &job);
    log.push(format!(
        "restarted the coordinator again at {at_last_fault} shards done"
    ));
    for l in &log {
        eprintln!("{l}");
    }

    let s = c.wait_for(&job, "done", Duration::from_secs(600), |s| {
        s["state"] == "done"
    });
    eprintln!(
        "distributed run with faults: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // 8,000 images searched (the last 20% of the test split is held out) in 250s
    assert_eq!(identify(&s)["shards"]["done"], 32);

    // the same failures, byte for byte, and the same report
    assert_same_result(
        &dir.join("embedded"),
        &dir.join("coordinator-work").join(&job),
        100,
    );

    // exactly-once acceptance, although attempts were lost and redone
    let fields = redis_shards(&c.redis.url(), &job);
    let mut redone = 0;
    for n in 0..32 {
        assert_eq!(
            field(&fields, &format!("{n}:accepted")),
            "1",
            "shard {n} accepted once"
        );
        if field(&fields, &format!("{n}:attempt")) != "1" {
            redone += 1;
        }
    }
    eprintln!("{redone} shards needed more than one attempt");
    assert!(
        at_last_fault < 40,
        "every fault hit the identify step (make the job bigger on a faster machine)"
    );
    assert!(redone >= 2, "the killed workers' shards were redone");
    let coord_logs = coordinator_logs(dir);
    assert!(coord_logs.contains("lease expired"), "the reaper requeued");
    // the S3 outage was ridden out by retries, not by failed attempts
    let worker_logs: String = c.workers.iter().map(|w| w.log_text()).collect();
    assert!(
        worker_logs.contains("artifact call failed, retrying")
            || coord_logs.contains("artifact call failed, retrying"),
        "no artifact call met the S3 outage"
    );
    assert!(
        !coord_logs
            .lines()
            .any(|l| l.contains("task failed") && l.contains("artifact store")),
        "an attempt failed on the artifact store"
    );
}

#[test]
fn an_accepted_output_deleted_or_replaced_under_the_job_fails_it_naming_the_object() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);
    let cfg_path = dir.join("job.toml");
    std::fs::write(
        &cfg_path,
        config(&dir.join("o"), &clf, &vae).replace("samples = 24", "samples = 60"),
    )
    .unwrap();
    let mut c = Cluster::start(dir);
    c.start_worker(&[]);
    let job = c.submit(&cfg_path);
    c.wait_for(&job, "a shard done", Duration::from_secs(120), |s| {
        identify(s)["shards"]["done"].as_u64().unwrap_or(0) >= 1
    });
    let key = redis_shards(&c.redis.url(), &job)
        .into_iter()
        .find(|(k, v)| k.ends_with(":output") && !v.is_empty())
        .map(|(_, v)| v)
        .expect("an accepted output");
    // s3s-fs keeps an object as a file: <root>/<bucket>/<prefix>/<key>
    let file = c.s3.root.path().join("defuse/test").join(&key);
    assert!(file.exists(), "{} should exist", file.display());
    std::fs::remove_file(&file).unwrap();
    let s = c.wait_for(&job, "failed", Duration::from_secs(300), |s| {
        s["state"] == "failed"
    });
    let err = s["error"].as_str().unwrap_or_default();
    assert!(err.contains(&key), "the error names the object: {err}");

    // a second job: one accepted output replaced by someone with the S3 credentials
    std::fs::write(
        &cfg_path,
        config(&dir.join("o2"), &clf, &vae)
            .replace("samples = 24", "samples = 60")
            .replace("name = \"dist\"", "name = \"dist-2\""),
    )
    .unwrap();
    let job = c.submit(&cfg_path);
    c.wait_for(&job, "a shard done", Duration::from_secs(120), |s| {
        identify(s)["shards"]["done"].as_u64().unwrap_or(0) >= 1
    });
    let f = redis_shards(&c.redis.url(), &job);
    let (shard, key) = f
        .iter()
        .find_map(|(k, v)| Some((k.strip_suffix(":output")?, v)).filter(|(_, v)| !v.is_empty()))
        .expect("an accepted output");
    let recorded = f
        .iter()
        .find(|(k, _)| *k == format!("{shard}:sha256"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert_eq!(recorded.len(), 64, "the output's hash is recorded: {f:?}");
    // through the S3 API, as such a person would (the server's stored checksums then
    // match the new bytes: only the recorded hash can tell)
    for (k, v) in c.s3.env() {
        std::env::set_var(k, v);
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = defuse_core::artifacts::open("s3://defuse/test")
            .await
            .unwrap();
        let mut forged = store.get(key).await.unwrap().to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 0xff;
        store.put(key, forged.into()).await.unwrap();
    });
    let s = c.wait_for(&job, "failed", Duration::from_secs(300), |s| {
        s["state"] == "failed"
    });
    let err = s["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(key.as_str()) && err.contains("changed after it was accepted"),
        "the error names the object and says it changed: {err}"
    );
}
