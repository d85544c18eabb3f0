//! The distributed mode with real processes: a coordinator (Redis state, S3 artifacts
//! in s3s-fs), worker processes, SIGKILLs of a worker mid-shard and of the
//! coordinator mid-job; the result must equal the embedded run's, byte for byte.
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::*;

#[test]
fn distributed_run_survives_kills_and_equals_the_embedded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);

    // the reference: the embedded run
    let emb = dir.join("embedded");
    let cfg_path = dir.join("job.toml");
    std::fs::write(&cfg_path, config(&emb, &clf, &vae)).unwrap();
    let started = Instant::now();
    let st = defuse()
        .args(["run", cfg_path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());
    eprintln!("embedded run: {:.1} s", started.elapsed().as_secs_f64());

    // the cluster: 3 workers
    let started = Instant::now();
    let mut c = Cluster::start(dir);
    for _ in 0..3 {
        c.start_worker(&[]);
    }
    let job = c.submit(&cfg_path);

    // SIGKILL worker 0 while it holds a shard
    let w0_id = c.worker_id(0);
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let log = c.coordinator.as_ref().unwrap().log_text();
        if log
            .lines()
            .any(|l| l.contains("shard leased") && l.contains(&w0_id))
        {
            break;
        }
        assert!(Instant::now() < end, "worker 0 never leased a shard");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    c.workers[0].signal("KILL");
    eprintln!("killed worker 0 ({w0_id}) mid-shard");

    // SIGKILL the coordinator after a few shards, and start it again
    c.wait_for(&job, "5 shards done", Duration::from_secs(180), |s| {
        identify(s)["shards"]["done"].as_u64().unwrap_or(0) >= 5
    });
    c.coordinator.as_ref().unwrap().signal("KILL");
    eprintln!("killed the coordinator");
    std::thread::sleep(Duration::from_millis(500));
    c.start_coordinator();

    let s = c.wait_for(&job, "done", Duration::from_secs(300), |s| {
        s["state"] == "done"
    });
    eprintln!("distributed run: {:.1} s", started.elapsed().as_secs_f64());
    // 8,000 images searched (the last 20% of the test split is held out) in 500s
    assert_eq!(identify(&s)["shards"]["done"], 16);

    // the same failures, byte for byte, and the same report
    assert_same_result(&emb, &dir.join("coordinator-work").join(&job), 100);

    // every shard accepted exactly once, and what was used is the accepted attempt's output
    let fields = redis_shards(&c.redis.url(), &job);
    let get = |k: String| field(&fields, &k);
    let mut retried = 0;
    for n in 0..16 {
        assert_eq!(get(format!("{n}:accepted")), "1", "shard {n} accepted once");
        let attempt = get(format!("{n}:attempt"));
        assert_eq!(
            get(format!("{n}:output")),
            format!("jobs/{job}/identify/shard-{n:05}/attempt-{attempt}.safetensors")
        );
        if attempt != "1" {
            retried += 1;
        }
    }
    assert!(retried >= 1, "the killed worker's shard was redone");
    let coord_logs = coordinator_logs(dir);
    assert!(
        coord_logs.contains("lease expired"),
        "the reaper requeued the dead worker's shard"
    );
}

#[test]
fn broken_model_fails_the_job_after_the_retries_and_bad_workers_and_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);
    let mut c = Cluster::start(dir);

    // a worker of another protocol version is refused with a clear message
    let i = c.start_worker(&["--protocol-version", "99"]);
    let code = c.workers[i].wait_timeout(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{}", c.workers[i].tail(10));
    let log = c.workers[i].log_text();
    assert!(
        log.contains("protocol version 99")
            && log.contains(&format!("speaks {}", defuse_proto::PROTOCOL_VERSION)),
        "{log}"
    );

    // a bad config is refused before any work starts
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        config(&dir.join("o"), &clf, &vae).replace("keep = 2", "keep = 0"),
    )
    .unwrap();
    let out = defuse()
        .args(["submit", bad.to_str().unwrap(), "--coordinator", &c.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("identify.keep"));
    let list = defuse()
        .args(["status", "--json", "--coordinator", &c.url()])
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&list.stdout).unwrap(),
        serde_json::json!([])
    );

    // models in a folder the coordinator may not read (a user's laptop): sent as paths
    // they are refused, uploaded with the job (what submit does) they reach it
    let laptop = tempfile::tempdir().unwrap();
    let (clf_here, vae_here) = (
        laptop.path().join("clf.safetensors"),
        laptop.path().join("vae.safetensors"),
    );
    std::fs::copy(&clf, &clf_here).unwrap();
    std::fs::copy(&vae, &vae_here).unwrap();
    let cfg = dir.join("job.toml");
    std::fs::write(&cfg, config(&dir.join("o"), &clf_here, &vae_here)).unwrap();
    let out = defuse()
        .args(["submit", cfg.to_str().unwrap(), "--no-upload"])
        .args(["--coordinator", &c.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("models.classifier") && stderr.contains("is outside the folders"),
        "{stderr}"
    );
    // the classifier object gets corrupted in the store after the coordinator checked it
    let job = c.submit(&cfg);
    c.wait_for(&job, "identify planned", Duration::from_secs(60), |s| {
        s["step"] == "identify"
    });
    let key = format!("jobs/{job}/models/classifier.safetensors");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use defuse_core::artifacts::ArtifactStore;
        for (k, v) in c.s3.env() {
            std::env::set_var(k, v);
        }
        let store = defuse_core::artifacts::S3Store::from_env("defuse", "test").await;
        // the uploads, under the job, by content
        let sha = defuse_core::artifacts::sha256_file(&clf_here).unwrap();
        let uploaded = store.list(&format!("jobs/{job}/inputs/")).await.unwrap();
        assert!(
            uploaded.contains(&format!("jobs/{job}/inputs/{sha}/clf.safetensors"))
                && uploaded.len() == 2,
            "{uploaded:?}"
        );
        assert!(store.exists(&key).await.unwrap(), "{key} missing");
        store
            .put(&key, bytes::Bytes::from_static(b"not a model any more"))
            .await
            .unwrap();
    });
    c.start_worker(&[]);
    let s = c.wait_for(&job, "failed", Duration::from_secs(120), |s| {
        s["state"] == "failed"
    });
    let err = s["error"].as_str().unwrap();
    assert!(
        err.contains("attempt 3")
            && err.contains("classifier.safetensors")
            && err.contains("not a safetensors file"),
        "{err}"
    );
    // scripts can gate on it: `status --watch` exits 4 for a failed job, with its error
    let out = defuse()
        .args(["status", &job, "--watch", "--coordinator", &c.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("job {job} failed")) && stderr.contains("attempt 3"),
        "{stderr}"
    );
}

#[test]
fn metrics_add_up_and_json_logs_carry_job_and_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);
    let mut c = Cluster::start(dir);
    let cfg = dir.join("job.toml");
    std::fs::write(&cfg, config(&dir.join("o"), &clf, &vae)).unwrap();
    // `submit --wait` follows the job and exits with its outcome; the workers leave
    // once the coordinator has had no unfinished job for 3 s (a Kubernetes Job's pods
    // complete). 8 shards: the --set overrides reach the coordinator
    let mut submit = defuse()
        .args(["submit", cfg.to_str().unwrap(), "--wait"])
        .args([
            "--set",
            "identify.shard_size=250",
            "--set",
            "identify.limit=2000",
        ])
        .args(["--coordinator", &c.url()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let job = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(submit.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().to_string()
    };
    assert!(!job.is_empty(), "submit --wait printed no job id");
    c.start_worker(&["--log-json", "--exit-when-idle", "3"]);
    c.start_worker(&["--log-json", "--exit-when-idle", "3"]);
    let jl = format!("job=\"{job}\"");
    // mid-run: the shard gauges add up to the number of shards
    c.wait_for(&job, "a shard done", Duration::from_secs(120), |s| {
        identify(s)["shards"]["done"].as_u64().unwrap_or(0) >= 1
    });
    std::thread::sleep(Duration::from_millis(600));
    let mid: f64 = scrape(c.metrics_port, "defuse_shards", &[&jl]).iter().sum();
    assert_eq!(mid, 8.0, "shard gauges mid-run");
    c.wait_for(&job, "done", Duration::from_secs(300), |s| {
        s["state"] == "done"
    });
    std::thread::sleep(Duration::from_millis(600));
    let done = scrape(c.metrics_port, "defuse_shards", &[&jl, "state=\"done\""]);
    assert_eq!(done, vec![8.0]);
    let all: f64 = scrape(c.metrics_port, "defuse_shards", &[&jl]).iter().sum();
    assert_eq!(all, 8.0);
    // the failure counter matches the job's output
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            dir.join("coordinator-work")
                .join(&job)
                .join("report/summary.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let found = scrape(c.metrics_port, "defuse_failures_found_total", &[&jl]);
    assert_eq!(found, vec![summary["n_failures"].as_f64().unwrap()]);
    assert_eq!(
        scrape(c.metrics_port, "defuse_shard_leases_total", &[&jl])
            .iter()
            .sum::<f64>(),
        8.0
    );
    assert_eq!(scrape(c.metrics_port, "defuse_workers", &[]), vec![2.0]);
    let waited = submit.wait_with_output().unwrap();
    assert_eq!(
        waited.status.code(),
        Some(0),
        "submit --wait: {}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert!(String::from_utf8_lossy(&waited.stderr).contains("done"));
    for (i, w) in c.workers.iter_mut().enumerate() {
        let code = w.wait_timeout(Duration::from_secs(30));
        assert_eq!(code, Some(0), "worker {i} did not leave when idle");
    }
    // `defuse results` downloads what the job produced, as a `defuse run` folder
    let got = dir.join("results");
    let out = defuse()
        .args(["results", &job, "--coordinator", &c.url(), "--out"])
        .arg(&got)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = dir.join("coordinator-work").join(&job);
    for rel in [
        "report/summary.json",
        "report/index.html",
        "identify/failures.safetensors",
    ] {
        assert_eq!(
            std::fs::read(got.join(rel)).unwrap(),
            std::fs::read(work.join(rel)).unwrap(),
            "{rel}"
        );
    }
    let models: Vec<_> = std::fs::read_dir(got.join("model")).unwrap().collect();
    assert_eq!(models.len(), 1, "the fine-tuned model");
    // every worker log line is JSON; task lines carry the job and shard of their span
    let mut with_fields = 0;
    for w in &c.workers {
        for line in w.log_text().lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let span = &v["span"];
            if span["job"] == job.as_str()
                && span["shard"].is_number()
                && span["attempt"].is_number()
            {
                with_fields += 1;
            }
        }
    }
    assert!(
        with_fields >= 8,
        "{with_fields} task log lines with job and shard"
    );
}

#[test]
fn sigterm_hands_the_task_back_and_cancel_leaves_nothing_leased() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);
    let mut c = Cluster::start(dir);
    let w = c.start_worker(&[]);
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        config(&dir.join("o"), &clf, &vae).replace("samples = 24", "samples = 200"),
    )
    .unwrap();
    let job = c.submit(&cfg);
    c.wait_for(&job, "a shard leased", Duration::from_secs(120), |s| {
        identify(s)["shards"]["leased"].as_u64().unwrap_or(0) >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    c.workers[w].signal("TERM");
    let code = c.workers[w].wait_timeout(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(0),
        "the worker stops on SIGTERM:\n{}",
        c.workers[w].tail(10)
    );
    // handed back: the shard is pending again at once, not after the lease expires
    let s = c.wait_for(&job, "the shard handed back", Duration::from_secs(2), |s| {
        identify(s)["shards"]["leased"] == 0
    });
    assert_eq!(identify(&s)["shards"]["done"], 0);
    let log = c.coordinator.as_ref().unwrap().log_text();
    assert!(
        log.contains("task failed") && log.contains("handed back"),
        "{}",
        c.coordinator.as_ref().unwrap().tail(10)
    );

    // a new worker takes over; cancelling mid-run leaves no shard leased or pending
    c.start_worker(&[]);
    c.wait_for(&job, "a shard leased again", Duration::from_secs(60), |s| {
        identify(s)["shards"]["leased"].as_u64().unwrap_or(0) >= 1
    });
    let out = defuse()
        .args(["cancel", &job, "--coordinator", &c.url()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = c.status(&job).unwrap();
    assert_eq!(s["state"], "cancelled");
    assert_eq!(
        (
            identify(&s)["shards"]["leased"].as_u64(),
            identify(&s)["shards"]["pending"].as_u64()
        ),
        (Some(0), Some(0))
    );
    // the running task is abandoned on the next heartbeat; its late completion is ignored
    std::thread::sleep(Duration::from_secs(2));
    let s = c.status(&job).unwrap();
    assert_eq!(s["state"], "cancelled");
    assert_eq!(identify(&s)["shards"]["done"], 0);
}

/// SIGKILLs worker `i` while it trains a part of `job`'s fine-tune: stops it when it
/// leases one, and kills it only if Redis says it still holds that part (else lets it
/// go on and tries again). The round and the part.
fn kill_holding_a_part(c: &mut Cluster, job: &str, i: usize) -> (u32, String) {
    let id = c.worker_id(i);
    let end = Instant::now() + Duration::from_secs(240);
    let mut tried = 0;
    loop {
        assert!(
            Instant::now() < end,
            "never caught worker {i} holding a round part"
        );
        let log = c.coordinator.as_ref().unwrap().log_text();
        let leases: Vec<String> = log
            .lines()
            .filter(|l| l.contains("shard leased") && l.contains("unit=round ") && l.contains(&id))
            .map(str::to_string)
            .collect();
        if leases.len() <= tried {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        tried = leases.len();
        c.workers[i].signal("STOP");
        let round: u32 = leases[tried - 1]
            .split("unit=round ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|r| r.parse().ok())
            .unwrap();
        let fields = redis_round_parts(&c.redis.url(), job, round);
        let held = fields.iter().find_map(|(k, v)| {
            let part = k.strip_suffix(":owner")?;
            let leased = fields
                .iter()
                .any(|(k2, v2)| *k2 == format!("{part}:state") && v2 == "leased");
            (*v == id && leased).then(|| part.to_string())
        });
        match held {
            Some(part) => {
                c.workers[i].signal("KILL");
                return (round, part);
            }
            None => c.workers[i].signal("CONT"),
        }
    }
}

/// A small job whose correction runs in `parts` data-parallel parts.
fn finetune_config(out: &Path, clf: &Path, vae: &Path, parts: usize) -> String {
    format!(
        r#"
name = "finetune"
seed = 13
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
limit = 2000
shard_size = 500
perturbation = {{ kind = "gaussian", sigma = 0.5 }}
[distill]
max_components = 12
[label]
discard_non_failures = false
[correct]
samples_per_scenario = 60
parts = {parts}
local_steps = 8
"#,
        out = out.display(),
        data = repo().join("data/mnist").display(),
        clf = clf.display(),
        vae = vae.display()
    )
}

#[test]
fn distributed_fine_tune_survives_killed_workers_and_a_restarted_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);

    // the reference: the single-process fine-tune, same samples seen
    let one = dir.join("one");
    let cfg_one = dir.join("one.toml");
    std::fs::write(&cfg_one, finetune_config(&one, &clf, &vae, 1)).unwrap();
    let st = defuse()
        .args(["run", cfg_one.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());

    // the cluster: 2 parts on 2 worker processes (63 steps: 4 rounds of 2 x 8 steps)
    let cfg_two = dir.join("two.toml");
    std::fs::write(
        &cfg_two,
        finetune_config(&dir.join("unused"), &clf, &vae, 2),
    )
    .unwrap();
    let mut c = Cluster::start(dir);
    c.start_worker(&[]);
    c.start_worker(&[]);
    let job = c.submit(&cfg_two);
    let (killed_round, killed_part) = kill_holding_a_part(&mut c, &job, 0);
    eprintln!("killed worker 0 holding {killed_round} part {killed_part}");
    c.start_worker(&[]);
    // restart the coordinator once a round has been averaged
    let s = c.wait_for(&job, "round 2", Duration::from_secs(240), |s| {
        s["step"]
            .as_str()
            .and_then(|st| st.strip_prefix("finetune:"))
            .and_then(|r| r.parse::<u32>().ok())
            .is_some_and(|r| r >= 1)
    });
    let round = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["step"] == "finetune")
        .cloned()
        .unwrap();
    assert!(
        round["detail"].as_str().unwrap_or("").contains("/4"),
        "status shows the round: {round}"
    );
    c.coordinator.as_ref().unwrap().signal("KILL");
    std::thread::sleep(Duration::from_millis(300));
    c.start_coordinator();
    // and SIGKILL a second worker holding a part, in a later round
    let second = kill_holding_a_part(&mut c, &job, 1);
    eprintln!("killed worker 1 holding {} part {}", second.0, second.1);
    assert_ne!(second.0, killed_round, "a later round");
    c.start_worker(&[]);
    c.wait_for(&job, "done", Duration::from_secs(300), |s| {
        s["state"] == "done"
    });

    let work = dir.join("coordinator-work").join(&job);
    let summary = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("report/summary.json")).unwrap())
            .unwrap()
    };
    let (a, b) = (summary(&one), summary(&work));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    eprintln!(
        "single process: test {:.4} -> {:.4}, scenarios {:.4} -> {:.4}; 2 parts: test {:.4} -> {:.4}, scenarios {:.4} -> {:.4}",
        f(&a, "test_accuracy_before"), f(&a, "test_accuracy_after"),
        f(&a, "scenario_accuracy_before"), f(&a, "scenario_accuracy_after"),
        f(&b, "test_accuracy_before"), f(&b, "test_accuracy_after"),
        f(&b, "scenario_accuracy_before"), f(&b, "scenario_accuracy_after"),
    );
    // `defuse status` shows the evaluation once the job is done
    let out = defuse()
        .args(["status", &job, "--coordinator", &c.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "test accuracy {:.2}% -> {:.2}%",
            100.0 * f(&b, "test_accuracy_before"),
            100.0 * f(&b, "test_accuracy_after")
        )),
        "{text}"
    );
    // same job up to correction: the same starting point
    assert_eq!(a["n_failures"], b["n_failures"]);
    assert_eq!(a["scenario_accuracy_before"], b["scenario_accuracy_before"]);
    // the correction worked in both, and the two agree
    for v in [&a, &b] {
        assert!(
            f(v, "scenario_accuracy_after") > f(v, "scenario_accuracy_before") + 0.2,
            "the fine-tune must fix the scenarios: {v}"
        );
    }
    // 2 parts restart momentum every round and draw their own seeds, so they are the
    // single process to first order only (this 80%-accurate model moves by several
    // points in one fine-tune): on one machine the gap was under 0.02, on another (the
    // same code, other float paths) 0.0210 (0.7824 vs 0.7614), and with the
    // counter-based identify noise (other failures, other scenarios) 0.0328 (0.7916 vs
    // 0.7588)
    assert!(
        (f(&a, "test_accuracy_after") - f(&b, "test_accuracy_after")).abs() < 0.05,
        "test accuracy: single process vs 2 parts"
    );
    assert!(
        (f(&a, "scenario_accuracy_after") - f(&b, "scenario_accuracy_after")).abs() < 0.1,
        "scenario accuracy: single process vs 2 parts"
    );
    // the fine-tuned model is in the format it came in, and loads
    let model = work.join("correct/classifier.safetensors");
    let ds = defuse_core::data::DataSpec::from_path(repo().join("data/mnist"))
        .load()
        .unwrap();
    let tuned =
        defuse_core::models::Classifier::load(&model, ds.image_shape(), 10, tch::Device::Cpu)
            .unwrap();
    let acc = defuse_core::train::accuracy(&tuned, &ds.test, tch::Device::Cpu).unwrap();
    assert!((acc - f(&b, "test_accuracy_after")).abs() < 1e-9, "{acc}");
    // the killed workers' parts were trained again, by other workers
    for (round, part) in [(killed_round, &killed_part), (second.0, &second.1)] {
        let fields = redis_round_parts(&c.redis.url(), &job, round);
        let get = |k: String| fields.iter().find(|(f, _)| *f == k).map(|(_, v)| v.clone());
        assert_eq!(get(format!("{part}:state")).as_deref(), Some("done"));
        assert!(
            get(format!("{part}:attempt"))
                .and_then(|a| a.parse::<u32>().ok())
                .is_some_and(|a| a >= 2),
            "the killed part was retried: {fields:?}"
        );
    }
    // every round's parts accepted once
    for r in 0..4 {
        let fields = redis_round_parts(&c.redis.url(), &job, r);
        for p in 0..2 {
            assert!(
                fields
                    .iter()
                    .any(|(k, v)| *k == format!("{p}:accepted") && v == "1"),
                "round {r} part {p}: {fields:?}"
            );
        }
    }
}

/// A worker whose files at `data.path` are not the ones the job was planned with (a
/// volume mounted from another copy, a file rewritten since) refuses the task, for
/// good, naming the file: the job fails instead of searching other images.
#[test]
fn a_worker_with_other_data_refuses_the_job_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);
    // the job's own copy of the data, inside the folder the coordinator allows
    let data = dir.join("data-copy");
    std::fs::create_dir_all(&data).unwrap();
    for e in std::fs::read_dir(repo().join("data/mnist")).unwrap() {
        let e = e.unwrap();
        if !e.file_name().to_string_lossy().starts_with('.') {
            std::fs::copy(e.path(), data.join(e.file_name())).unwrap();
        }
    }
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        config(&dir.join("o"), &clf, &vae).replace(
            &repo().join("data/mnist").display().to_string(),
            &data.display().to_string(),
        ),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&cfg).unwrap().contains("data-copy"));
    let mut c = Cluster::start(dir);
    let job = c.submit(&cfg);
    c.wait_for(&job, "identify planned", Duration::from_secs(120), |s| {
        s["step"] == "identify"
    });
    // the data changes between the plan and the worker
    let labels = data.join("t10k-labels-idx1-ubyte");
    let mut b = std::fs::read(&labels).unwrap();
    let last = b.len() - 1;
    b[last] = (b[last] + 1) % 10;
    std::fs::write(&labels, b).unwrap();
    c.start_worker(&[]);
    let s = c.wait_for(&job, "failed", Duration::from_secs(120), |s| {
        s["state"] == "failed"
    });
    let err = s["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("t10k-labels-idx1-ubyte")
            && err.contains("not the data the job was planned with"),
        "{err}"
    );
    // refused for good: one attempt, not --max-attempts of them
    assert!(err.contains("attempt 1"), "{err}");
}

/// The first `n` images of an MNIST split as WebDataset shards of `per_shard` samples
/// (`<split>-<k>.tar`: `<key>.png` + `<key>.cls`), the layout large corpora come in.
/// Copies the files of a job folder's copy in a bucket (its manifest names them) into `to`.
fn bucket_folder(url: &str, to: &Path) {
    let u = defuse_core::sources::S3Url::parse("out", Path::new(url))
        .unwrap()
        .unwrap();
    let n = defuse_core::sources::restore_out(&u, to).unwrap();
    assert!(n > 10, "{n} files in {url}");
}

fn webdataset_shards(
    split: &defuse_core::data::Split,
    name: &str,
    n: usize,
    per_shard: usize,
    dir: &Path,
) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut files = Vec::new();
    for (k, start) in (0..n).step_by(per_shard).enumerate() {
        let path = dir.join(format!("{name}-{k:06}.tar"));
        let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for i in start..(start + per_shard).min(n) {
            let mut png = Vec::new();
            image::GrayImage::from_raw(28, 28, split.images[i * 784..(i + 1) * 784].to_vec())
                .unwrap()
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            let cls = split.labels[i].to_string();
            for (ext, data) in [("png", png.as_slice()), ("cls", cls.as_bytes())] {
                let mut h = tar::Header::new_ustar();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                tar.append_data(&mut h, format!("{i:07}.{ext}"), data)
                    .unwrap();
            }
        }
        tar.finish().unwrap();
        files.push(path);
    }
    files
}

/// Data in a bucket, as WebDataset shards: the coordinator and two workers read it from
/// S3 (each into its own cache folder; no folder is shared), and find exactly the
/// failures the embedded run finds on the same images read from the local IDX files.
/// A worker that lists the bucket after an object was replaced refuses the job, naming
/// the object.
#[test]
fn data_in_a_bucket_equals_the_embedded_run_on_local_idx() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (clf, vae) = train_models(dir);
    let local = config(&dir.join("embedded"), &clf, &vae).replace(
        "limit_train = 4000",
        "limit_train = 4000\nlimit_test = 2000",
    );
    let cfg_local = dir.join("local.toml");
    std::fs::write(&cfg_local, &local).unwrap();
    let st = defuse()
        .args(["run", cfg_local.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(st.success());

    // the same images as WebDataset shards in the bucket
    let mnist = defuse_core::data::DataSpec::from_path(repo().join("data/mnist"))
        .load()
        .unwrap();
    let wds = dir.join("wds");
    let mut shards = webdataset_shards(&mnist.train, "train", 4000, 1000, &wds);
    shards.extend(webdataset_shards(&mnist.test, "test", 2000, 500, &wds));
    let mut c = Cluster::start(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (k, v) in c.s3.env() {
        std::env::set_var(k, v);
    }
    let store = rt.block_on(defuse_core::artifacts::S3Store::from_env(
        "defuse",
        "sets/mnist",
    ));
    rt.block_on(async {
        use defuse_core::artifacts::ArtifactStore;
        for s in &shards {
            let name = s.file_name().unwrap().to_str().unwrap();
            store.put_file(name, s).await.unwrap();
        }
    });
    // the models too, and the results go to the bucket: no file of the job is on a
    // disk the coordinator and the workers share
    let models = rt.block_on(defuse_core::artifacts::S3Store::from_env(
        "defuse", "models",
    ));
    rt.block_on(async {
        use defuse_core::artifacts::ArtifactStore;
        models.put_file("clf.safetensors", &clf).await.unwrap();
        models.put_file("vae.safetensors", &vae).await.unwrap();
    });
    let in_bucket = local
        .replace(
            &format!("path = \"{}\"", repo().join("data/mnist").display()),
            "path = \"s3://defuse/sets/mnist\"",
        )
        .replace(
            &format!("classifier = \"{}\"", clf.display()),
            "classifier = \"s3://defuse/models/clf.safetensors\"",
        )
        .replace(
            &format!("vae = \"{}\"", vae.display()),
            "vae = \"s3://defuse/models/vae.safetensors\"",
        )
        .replace(
            &format!("out = \"{}\"", dir.join("embedded").display()),
            "out = \"s3://defuse/results/dist\"",
        );
    assert_eq!(in_bucket.matches("s3://defuse/").count(), 4, "{in_bucket}");
    let cfg_bucket = dir.join("bucket.toml");
    std::fs::write(&cfg_bucket, &in_bucket).unwrap();
    c.start_worker(&[]);
    c.start_worker(&[]);
    let job = c.submit(&cfg_bucket);
    let s = c.wait_for(&job, "done", Duration::from_secs(300), |s| {
        s["state"] == "done"
    });
    assert_eq!(identify(&s)["shards"]["done"], 4);
    assert_same_result(
        &dir.join("embedded"),
        &dir.join("coordinator-work").join(&job),
        10,
    );
    // the job's folder is in `out`: the same results, the models it read pinned
    let results = dir.join("results");
    bucket_folder("s3://defuse/results/dist", &results);
    assert_same_result(&dir.join("embedded"), &results, 10);
    for f in ["distill/failures.parquet", "report/index.html", "job.toml"] {
        assert!(results.join(f).is_file(), "{f} is not in out");
    }
    let pinned: Vec<_> = std::fs::read_dir(results.join("inputs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let clf_copy = pinned
        .iter()
        .find(|n| n.starts_with("models.classifier-") && n.ends_with(".safetensors"))
        .unwrap_or_else(|| panic!("{pinned:?}"));
    assert_eq!(
        std::fs::read(results.join("inputs").join(clf_copy)).unwrap(),
        std::fs::read(&clf).unwrap()
    );
    // each process read the bucket into a folder of its own; a worker copied only the
    // objects of the shards it searched (500 test images a tar, one tar a shard here),
    // never the training shards; the coordinator's central steps read everything
    let copied = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.retain(|n| !n.starts_with('.'));
        v.sort();
        v
    };
    let mut searched = Vec::new();
    for w in ["worker-0", "worker-1"] {
        let names = copied(&dir.join(w).join("data/s3/defuse/sets/mnist"));
        assert!(
            names.iter().all(|n| n.starts_with("test-")),
            "{w} copied {names:?}"
        );
        searched.extend(names);
    }
    searched.sort();
    searched.dedup();
    assert_eq!(
        searched,
        [
            "test-000000.tar",
            "test-000001.tar",
            "test-000002.tar",
            "test-000003.tar"
        ]
    );
    assert_eq!(
        copied(&dir.join("coordinator-work/.data/s3/defuse/sets/mnist")).len(),
        8
    );

    // an object replaced between the plan and a worker's listing
    for w in &mut c.workers {
        w.kill();
    }
    let cfg2 = dir.join("bucket2.toml");
    std::fs::write(
        &cfg2,
        in_bucket
            .replace("name = \"dist\"", "name = \"dist2\"")
            .replace("results/dist\"", "results/dist2\""),
    )
    .unwrap();
    let job2 = c.submit(&cfg2);
    c.wait_for(&job2, "identify planned", Duration::from_secs(120), |s| {
        s["step"] == "identify"
    });
    rt.block_on(async {
        use defuse_core::artifacts::ArtifactStore;
        store.put_file("test-000001.tar", &shards[4]).await.unwrap();
    });
    c.start_worker(&[]);
    let s = c.wait_for(&job2, "failed", Duration::from_secs(120), |s| {
        s["state"] == "failed"
    });
    let err = s["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("test-000001.tar") && err.contains("not the data the job was planned with"),
        "{err}"
    );

    // `defuse run` takes a job file whose data, models and out are in buckets too: its
    // folder is a working copy of `out`
    rt.block_on(async {
        use defuse_core::artifacts::ArtifactStore;
        store.put_file("test-000001.tar", &shards[5]).await.unwrap();
    });
    let emb_cfg = dir.join("bucket-embedded.toml");
    std::fs::write(
        &emb_cfg,
        in_bucket.replace("results/dist\"", "results/embedded\""),
    )
    .unwrap();
    let run = |cache: &str| {
        let out = defuse()
            .args(["run", emb_cfg.to_str().unwrap()])
            .env("DEFUSE_CACHE", dir.join(cache))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        text
    };
    let first = run("cache-a");
    assert!(
        first.contains("report: s3://defuse/results/embedded/report/index.html"),
        "{first}"
    );
    let results = dir.join("results-embedded");
    bucket_folder("s3://defuse/results/embedded", &results);
    assert_same_result(&dir.join("embedded"), &results, 10);
    // on another machine (an empty cache) it carries on from the bucket: no step runs again
    let again = run("cache-b");
    assert!(
        again.contains("copied to") && again.contains("identify already done"),
        "{again}"
    );
    // (the report is written again: it names the steps' times)
    let redone: Vec<&str> = again
        .lines()
        .filter(|l| l.contains("step done") && !l.contains("report"))
        .collect();
    assert!(redone.is_empty(), "{redone:?}");
}
