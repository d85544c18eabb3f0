//! The coordinator owns nothing on its disk: a coordinator SIGKILLed and started again
//! on an **empty** work dir, at each phase of a job (identify, awaiting labels, between
//! fine-tune rounds), carries on from the state store (Redis) and the artifact store
//! (s3s-fs) alone. The job ends with the same failures and report as an uninterrupted
//! embedded run given the same labels, the labels a person gave through the CLI are
//! final, and the models the job trained are trained once.
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// A job that trains its own (tiny) models on the coordinator, waits for a person's
/// labels, and fine-tunes in 2 parts (several rounds).
fn config(out: &Path) -> String {
    format!(
        r#"
name = "restart"
seed = 17
out = "{out}"
[data]
path = "{data}"
limit_train = 3000
[train]
classifier_epochs = 1
classifier_width = 8
vae_epochs = 2
vae_latent = 6
vae_width = 16
vae_hidden = 64
[identify]
samples = 96
keep = 2
limit = 2000
shard_size = 100
perturbation = {{ kind = "gaussian", sigma = 0.5 }}
[distill]
max_components = 12
[label]
mode = "manual"
[correct]
samples_per_scenario = 40
parts = 2
local_steps = 8
"#,
        out = out.display(),
        data = repo().join("data/mnist").display(),
    )
}

/// The labels a person would give: each scenario's majority source class.
fn labels_for(scenarios_json: &Path) -> serde_json::Value {
    let scen: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(scenarios_json).unwrap()).unwrap();
    let mut out = serde_json::Map::new();
    for s in &scen {
        let sources = s["source_labels"].as_object().unwrap();
        let (class, _) = sources
            .iter()
            .max_by_key(|(c, n)| (n.as_u64().unwrap(), std::cmp::Reverse(c.to_string())))
            .unwrap();
        out.insert(s["id"].to_string(), serde_json::json!(class));
    }
    serde_json::Value::Object(out)
}

fn restart_on_empty_disk(c: &mut Cluster, job: &str, why: &str) {
    let s = c.status(job).expect("status");
    eprintln!(
        "restarting the coordinator on an empty work dir: {why} (state {}, step {}, identify {})",
        s["state"],
        s["step"],
        identify(&s)["shards"]["done"]
    );
    c.coordinator.as_ref().unwrap().signal("KILL");
    std::thread::sleep(Duration::from_millis(300));
    let work = c.dir.join("coordinator-work");
    if work.exists() {
        std::fs::remove_dir_all(&work).unwrap();
    }
    c.start_coordinator();
}

fn label(c: &Cluster, job: &str, file: &Path) -> std::process::Output {
    defuse()
        .args(["label", job, "--coordinator", &c.url(), "--file"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn a_coordinator_restarted_on_an_empty_disk_at_every_phase_finishes_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // the reference: embedded, uninterrupted, labelled with the same file
    let emb = dir.join("embedded");
    let cfg_emb = dir.join("embedded.toml");
    std::fs::write(&cfg_emb, config(&emb)).unwrap();
    let run = |code: i32| {
        let st = defuse()
            .args(["run", cfg_emb.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(code));
    };
    run(3); // waits for labels
    let labels = labels_for(&emb.join("distill/scenarios.json"));
    let labels_file = dir.join("labels.json");
    std::fs::write(&labels_file, labels.to_string()).unwrap();
    let st = defuse()
        .arg("label")
        .arg(&emb)
        .arg("--file")
        .arg(&labels_file)
        .status()
        .unwrap();
    assert!(st.success());
    run(0);

    // the cluster, its coordinator restarted on an empty disk at every phase
    let cfg = dir.join("cluster.toml");
    std::fs::write(&cfg, config(&dir.join("unused"))).unwrap();
    let mut c = Cluster::start(dir);
    c.start_worker(&[]);
    c.start_worker(&[]);
    let job = c.submit(&cfg);
    c.wait_for(&job, "identify under way", Duration::from_secs(300), |s| {
        s["state"] == "awaiting_labels" || identify(s)["shards"]["done"].as_u64().unwrap_or(0) >= 2
    });
    restart_on_empty_disk(&mut c, &job, "during identify");
    c.wait_for(&job, "awaiting labels", Duration::from_secs(300), |s| {
        s["state"] == "awaiting_labels"
    });
    restart_on_empty_disk(&mut c, &job, "while the job waits for labels");
    // the page of the new coordinator shows the scenarios (from the artifact store)
    let out = label(&c, &job, &labels_file);
    assert!(
        out.status.success(),
        "labels refused after a restart on an empty disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // labels are final, across restarts too
    restart_on_empty_disk(&mut c, &job, "after labels, before correction");
    let again = label(&c, &job, &labels_file);
    assert!(!again.status.success(), "a second labelling was accepted");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("labelled already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    c.wait_for(&job, "round 2", Duration::from_secs(300), |s| {
        s["step"]
            .as_str()
            .and_then(|st| st.strip_prefix("finetune:"))
            .and_then(|r| r.parse::<u32>().ok())
            .is_some_and(|r| r >= 1)
            || s["state"] == "done"
    });
    restart_on_empty_disk(&mut c, &job, "between fine-tune rounds");
    c.wait_for(&job, "done", Duration::from_secs(300), |s| {
        s["state"] == "done"
    });

    // the same failures and report as the uninterrupted run, with the labels given
    let work = dir.join("coordinator-work").join(&job);
    assert_same_result(&emb, &work, 20);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("report/summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        summary["n_labelled"].as_u64().unwrap() as usize,
        labels.as_object().unwrap().len(),
        "every scenario labelled as given"
    );
    // the models were trained once, and distilled once, over four coordinators
    let logs = coordinator_logs(dir);
    let done_lines = |step: &str| {
        logs.lines()
            .filter(|l| l.contains("step done") && l.contains(step))
            .count()
    };
    assert_eq!(done_lines("models"), 1, "models trained more than once");
    assert_eq!(done_lines("distill"), 1, "distilled more than once");
    assert!(
        logs.contains("folder restored"),
        "the restarted coordinators restored the job folder"
    );
}
