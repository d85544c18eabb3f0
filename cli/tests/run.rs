//! `defuse run` end to end on a small MNIST subset: the summary, determinism, resume,
//! manual labelling, and config errors. Real data, real (small) models, the real binary.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn config(out: &Path, extra_label: &str) -> String {
    format!(
        r#"
name = "mnist-small"
seed = 3
out = "{out}"
[data]
path = "{data}"
limit_train = 3000
limit_test = 500
[train]
classifier_epochs = 1
classifier_width = 16
vae_epochs = 2
vae_width = 16
vae_hidden = 64
vae_latent = 6
[identify]
limit = 120
samples = 40
keep = 3
shard_size = 50
perturbation = {{ kind = "gaussian", sigma = 0.5 }}
[distill]
max_components = 15
[label]
{extra_label}
[correct]
samples_per_scenario = 40
epochs = 1
"#,
        out = out.display(),
        data = repo().join("data/mnist").display()
    )
}

fn defuse(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_defuse"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    eprintln!(
        "defuse {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn summary(out: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report/summary.json")).unwrap())
            .unwrap();
    // what legitimately differs between two runs
    let o = v.as_object_mut().unwrap();
    o.remove("step_seconds");
    o.remove("model");
    v
}

/// Runs `defuse <args>` in the folder `cwd` (at the default log level) and returns its
/// log; it must succeed.
fn log_of(args: &[&str], cwd: &Path) -> String {
    let r = Command::new(env!("CARGO_BIN_EXE_defuse"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(r.status.success(), "{log}");
    log
}

/// Runs a job and returns its log ([`log_of`]).
fn run_log(cfg: &Path) -> String {
    log_of(&["run", cfg.to_str().unwrap()], Path::new("."))
}

/// The steps a run's log says it reused.
fn reused(log: &str) -> Vec<String> {
    let mut v: Vec<String> = log
        .lines()
        .filter(|l| l.contains("step already done"))
        // the field of the message, not the `central{step=..}` span around it
        .filter_map(|l| l.rsplit("step=").next())
        .map(|s| s.trim().trim_matches('"').to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn small_run_is_complete_deterministic_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let cfg = dir.path().join(format!(
            "{}.toml",
            out.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(
            &cfg,
            config(
                out,
                "mode = \"source-majority\"\ndiscard_non_failures = false",
            ),
        )
        .unwrap();
        let r = defuse(&["run", cfg.to_str().unwrap()]);
        assert!(r.status.success());
    }
    let s = summary(&a);
    for key in [
        "dataset",
        "n_images_searched",
        "n_failures",
        "n_scenarios",
        "test_accuracy_before",
        "test_accuracy_after",
        "scenario_accuracy_before",
        "scenario_accuracy_after",
        "scenarios",
    ] {
        assert!(s.get(key).is_some(), "summary.json lacks {key}");
    }
    assert_eq!(s["dataset"], "mnist");
    assert!(s["n_failures"].as_u64().unwrap() > 0);
    // coverage per class adds up to the split's counts
    let cov = s["coverage"].as_array().unwrap();
    assert_eq!(cov.len(), 10, "every digit is in the searched images");
    for (key, total) in [
        ("images", "n_images_in_split"),
        ("searched", "n_images_searched"),
        ("wrong", "n_images_wrong"),
        ("reconstruction_wrong", "n_reconstructions_wrong"),
        ("reconstruction_differs", "n_reconstructions_differ"),
    ] {
        let sum: u64 = cov.iter().map(|c| c[key].as_u64().unwrap()).sum();
        assert_eq!(sum, s[total].as_u64().unwrap(), "{key}");
    }
    // the default rule (all) skips nothing
    for c in cov {
        assert_eq!(c["searched"], c["images"], "{c}");
    }
    assert!(s["n_scenarios"].as_u64().unwrap() >= 1);
    for key in [
        "test_accuracy_before",
        "test_accuracy_after",
        "scenario_accuracy_before",
        "scenario_accuracy_after",
    ] {
        let v = s[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    for sc in s["scenarios"].as_array().unwrap() {
        for key in [
            "id",
            "weight",
            "size",
            "predicted",
            "label",
            "accuracy_before",
            "accuracy_after",
        ] {
            assert!(sc.get(key).is_some(), "scenario lacks {key}: {sc}");
        }
    }
    // the real-image figures: 120 of the 500 test images searched, the other 380 steered
    // nothing; every searched image is in at most one scenario; the images whose
    // failures formed a scenario may be real failures (the default rule, all)
    assert_eq!(s["search"], "all");
    let unsearched = &s["test_unsearched"];
    assert_eq!(unsearched["images"], 380, "{unsearched}");
    let (mut members, mut labelled_sources) = (0, 0);
    for sc in s["scenarios"].as_array().unwrap() {
        let (m, src) = (&sc["real_members"], &sc["real_sources"]);
        members += m["images"].as_u64().unwrap();
        assert!(m["right_after"].as_u64().unwrap() <= m["images"].as_u64().unwrap());
        assert!(src["right_before"].as_u64().unwrap() <= src["images"].as_u64().unwrap());
        if !sc["label"].is_null() {
            labelled_sources += src["images"].as_u64().unwrap();
            assert_eq!(sc["held_out_curve"].as_array().unwrap().len(), 3, "{sc}");
        }
    }
    assert!(members <= 120, "{members} members of 120 searched images");
    // the confusions on the test split: every misclassified test image in one pair,
    // before and after; the summary shows the most frequent ones, in order
    let ev: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("correct/evaluation.json")).unwrap()).unwrap();
    let pairs = ev["confusions"].as_array().unwrap();
    for (key, acc) in [
        ("before", "test_accuracy_before"),
        ("after", "test_accuracy_after"),
    ] {
        let wrong: u64 = pairs.iter().map(|c| c[key].as_u64().unwrap()).sum();
        let expected = ((1.0 - s[acc].as_f64().unwrap()) * 500.0).round() as u64;
        assert_eq!(wrong, expected, "{key}");
    }
    assert!(pairs.iter().all(|c| c["true_class"] != c["predicted"]));
    let top = s["confusions"].as_array().unwrap();
    assert_eq!(top.len(), pairs.len().min(10));
    for (t, p) in top.iter().zip(pairs) {
        assert_eq!((&t["before"], &t["after"]), (&p["before"], &p["after"]));
    }
    assert!(top
        .windows(2)
        .all(|w| w[0]["before"].as_u64() >= w[1]["before"].as_u64()));
    // the training images inside the scenarios: listed one by one, counted per scenario
    // and for the labelled ones; those labelled against their scenario were left out of
    // the fine-tune (conflicting_labels defaults to drop), the others trained as labelled
    let members: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(a.join("correct/train-members.json")).unwrap())
            .unwrap();
    let mut labelled_members = 0;
    for sc in s["scenarios"].as_array().unwrap() {
        let mine: Vec<&serde_json::Value> = members
            .iter()
            .filter(|m| m["scenario"] == sc["id"])
            .collect();
        let t = &sc["train_members"];
        assert_eq!(t["images"], mine.len(), "{sc}");
        if !sc["label"].is_null() {
            labelled_members += mine.len();
            let conflicting = mine.iter().filter(|m| m["label"] != sc["label"]).count();
            assert_eq!(t["conflicting"], conflicting, "{sc}");
            assert_eq!(t["dropped"], conflicting, "{sc}");
            for m in &mine {
                let want = if m["label"] != sc["label"] {
                    &serde_json::Value::Null
                } else {
                    &m["label"]
                };
                assert_eq!(&m["trained_as"], want, "{m}");
            }
        } else {
            assert!(mine.iter().all(|m| m["trained_as"] == m["label"]), "{sc}");
        }
    }
    assert_eq!(s["train_members_labelled"]["images"], labelled_members);
    assert_eq!(s["real_sources_labelled"]["images"], labelled_sources);
    let curve = s["held_out_curve"].as_array().unwrap();
    let taus: Vec<f64> = curve.iter().map(|c| c["tau"].as_f64().unwrap()).collect();
    assert_eq!(taus, [0.01, 0.05, 0.1]);
    assert_eq!(curve[0]["accuracy_after"], s["scenario_accuracy_after"]);
    let html = std::fs::read_to_string(a.join("report/index.html")).unwrap();
    assert!(html.contains("Scenario 0") && html.contains("data:image/png;base64,"));
    assert!(html.contains("380 test images identify did not search"));
    // the map of the failure codes: t-SNE, every failure drawn (fewer than 5,000)
    let map = std::fs::read_to_string(a.join("pictures/projection.svg")).unwrap();
    let title = format!("{} failure codes, t-SNE (perplexity ", s["n_failures"]);
    assert!(map.contains(&title), "no '{title}' in the map");
    assert!(a.join("correct/classifier.safetensors").exists());
    assert!(
        a.join("identify/accepted/shard-00002.safetensors").exists(),
        "120 images in shards of 50"
    );

    // same config and seed, another folder: the same summary
    assert_eq!(s, summary(&b));

    // run again: every step is reused, same summary
    let cfg_a = dir.path().join("a.toml");
    let log = run_log(&cfg_a);
    assert_eq!(
        reused(&log),
        ["correct", "distill", "identify", "label", "models", "pictures"],
        "{log}"
    );
    assert_eq!(s, summary(&a));

    // the same job spelled with relative paths and run from the job file's folder:
    // the steps' hashes cover where the data are, not how the path was written
    let data = repo().join("data/mnist");
    let up: PathBuf = dir.path().components().skip(1).map(|_| "..").collect();
    let rel_data = up.join(data.strip_prefix("/").unwrap());
    let rel = config(
        Path::new("a"),
        "mode = \"source-majority\"\ndiscard_non_failures = false",
    )
    .replace(&data.display().to_string(), &rel_data.display().to_string());
    assert!(rel.contains("path = \"../"), "{rel}");
    std::fs::write(dir.path().join("rel.toml"), rel).unwrap();
    let log = log_of(&["run", "rel.toml"], dir.path());
    assert_eq!(
        reused(&log),
        ["correct", "distill", "identify", "label", "models", "pictures"],
        "{log}"
    );

    // a change in [correct] redoes only correct and report
    let changed = config(
        &a,
        "mode = \"source-majority\"\ndiscard_non_failures = false",
    )
    .replace("samples_per_scenario = 40", "samples_per_scenario = 30");
    std::fs::write(&cfg_a, changed).unwrap();
    let log = run_log(&cfg_a);
    assert_eq!(
        reused(&log),
        ["distill", "identify", "label", "models", "pictures"],
        "{log}"
    );
    assert_eq!(summary(&a)["n_failures"], s["n_failures"]);

    // the lambda sweep corrects from the same outputs: nothing before correct is redone
    let sweep = ["sweep", cfg_a.to_str().unwrap(), "--lambdas", "0,5"];
    let log = log_of(&sweep, Path::new("."));
    assert_eq!(
        reused(&log),
        ["correct", "distill", "identify", "label", "models", "pictures"],
        "{log}"
    );
    let sw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("sweep/sweep.json")).unwrap())
            .unwrap();
    let pts = sw["points"].as_array().unwrap();
    assert_eq!(pts.len(), 2);
    assert_eq!(
        sw["scenario_accuracy_before"],
        summary(&a)["scenario_accuracy_before"]
    );
    let scen = |i: usize| pts[i]["scenario_accuracy"].as_f64().unwrap();
    assert!(
        scen(1) > scen(0),
        "lambda 5 must fix more scenario samples than lambda 0: {sw}"
    );
    let svg = std::fs::read_to_string(a.join("sweep/sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("λ=5") && svg.contains("before"));
    assert!(std::fs::read_to_string(a.join("sweep/sweep.md"))
        .unwrap()
        .contains("| 5 |"));
    assert!(a.join("sweep/lambda-5/classifier.safetensors").exists());
    // again: every point is reused
    let log = log_of(&sweep, Path::new("."));
    assert!(
        reused(&log).contains(&"sweep/lambda-5".to_string()),
        "{log}"
    );
    // a negative lambda is refused with a clear message
    let r = defuse(&["sweep", cfg_a.to_str().unwrap(), "--lambdas", "0,-1"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("-1 is not >= 0"));
}

#[test]
fn manual_labels_wait_then_correct() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let cfg = dir.path().join("m.toml");
    std::fs::write(&cfg, config(&out, "mode = \"manual\"")).unwrap();
    let r = defuse(&["run", cfg.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(3), "waits for labels");
    assert!(!out.join("report/summary.json").exists());
    let scenarios: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("distill/scenarios.json")).unwrap())
            .unwrap();
    assert!(!scenarios.is_empty());
    // what a person is shown: some of each scenario's own failures, one per searched
    // image, drawn as the images above and the failures below (28 px at scale 3, 2 px
    // gaps), read otherwise than labelled; a heavy component with no failure assigned
    // to it (the fit is on a subsample) is no scenario, so every scenario shows some
    let (mut shown, mut wrong) = (0, 0);
    for s in &scenarios {
        let ex = s["examples"].as_array().unwrap();
        let size = s["size"].as_u64().unwrap() as usize;
        assert!(size > 0, "a scenario without failures: {s}");
        assert!(!ex.is_empty() && ex.len() <= size.min(8), "{s}");
        let sources: std::collections::HashSet<u64> =
            ex.iter().map(|e| e["source"].as_u64().unwrap()).collect();
        assert_eq!(sources.len(), ex.len(), "one failure per image: {s}");
        for e in ex {
            let label = e["label"].to_string();
            assert!(
                s["source_labels"].get(&label).is_some(),
                "{e} not a source of {s}"
            );
            wrong += (e["label"] != e["predicted"]) as usize;
        }
        shown += ex.len();
        let png = std::fs::read(out.join(format!("distill/failures-{}.png", s["id"]))).unwrap();
        let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!((dim(16), dim(20)), (ex.len() * 86 + 2, 2 * 86 + 2), "{s}");
    }
    assert!(
        2 * wrong > shown,
        "{wrong} of {shown} shown failures are failures"
    );

    // bad labels are refused and nothing is stored
    let job = out.to_str().unwrap();
    let r = defuse(&["label", job, "0=4", "999=1"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("scenario 999 does not exist"));
    let r = defuse(&["label", job, "0=12"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("out of range"));
    assert!(!out.join("labels.json").exists());

    // label everything: scenario 0 by name-or-id, the rest discarded except one
    let mut args = vec!["label".to_string(), job.to_string(), "0=7".to_string()];
    for s in scenarios.iter().skip(1) {
        args.push(format!("{}=discard", s["id"]));
    }
    let r = defuse(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success());
    let r = defuse(&["run", cfg.to_str().unwrap()]);
    assert!(r.status.success());
    let s = summary(&out);
    assert_eq!(s["n_labelled"], 1);
    assert_eq!(
        s["n_discarded"].as_u64().unwrap() as usize,
        scenarios.len() - 1
    );
    assert_eq!(s["scenarios"][0]["label"], 7);
    assert!(s["scenarios"][1].get("label").unwrap().is_null() || scenarios.len() == 1);
}

#[test]
fn config_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let good = config(&dir.path().join("o"), "");
    for (bad, expect) in [
        (
            good.replace("keep = 3", "keep = 3\nkeeep = 4"),
            "unknown field `keeep`",
        ),
        (good.replace("samples = 40", "samples = -40"), "samples"),
        (
            good.replace(
                "samples_per_scenario = 40",
                "samples_per_scenario = 40\nregion_scale = 0",
            ),
            "correct.region_scale",
        ),
        (good.replace("keep = 3", "keep = 0"), "identify.keep"),
        (
            good.replace(
                &repo().join("data/mnist").display().to_string(),
                "/nonexistent/data",
            ),
            "/nonexistent/data",
        ),
        (good.replace("sigma = 0.5", "sigma = -1.0"), "sigma"),
    ] {
        std::fs::write(&cfg, bad).unwrap();
        let r = defuse(&["run", cfg.to_str().unwrap()]);
        assert_eq!(r.status.code(), Some(2), "{expect}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(expect), "expected '{expect}' in: {err}");
        if expect != "/nonexistent/data" {
            assert!(err.contains("bad.toml"), "names the file: {err}");
        }
    }
    let r = defuse(&["run", "/nonexistent.toml"]);
    assert_ne!(r.status.code(), Some(0));
}

/// A model that cannot serve the job fails its models step inside the embedded
/// coordinator; the run still exits 2 (bad input), naming the file, as a bad config does.
#[test]
fn a_bad_model_in_an_embedded_run_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let fx = repo().join("core/tests/fixtures");
    for (classifier, expect) in [
        ("garbage.pt", "garbage.pt"),
        ("classifier_5_classes.pt", "classifier_5_classes.pt"),
    ] {
        let cfg = dir.path().join("bad-model.toml");
        let text = config(&dir.path().join("o"), "").replace(
            "[train]",
            &format!(
                "[models]\nclassifier = \"{fx}/{classifier}\"\nvae = \"{fx}/encoder_ok.pt\"\nvae_decoder = \"{fx}/decoder_ok.pt\"\n[train]",
                fx = fx.display()
            ),
        );
        std::fs::write(&cfg, text).unwrap();
        let r = defuse(&["run", cfg.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{classifier}: {err}");
        assert!(err.contains(expect), "{classifier}: {err}");
    }
}

/// `defuse run` serves its in-process workers on a loopback port: another user of the
/// machine who finds the port gets nothing from it without the run's own tokens.
#[test]
fn the_embedded_coordinator_takes_no_call_without_its_token() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&out, "mode = \"manual\"")).unwrap();
    let mut run = Command::new(env!("CARGO_BIN_EXE_defuse"))
        .arg("run")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the address is in the log; the tokens are not
    let mut lines = std::io::BufReader::new(run.stderr.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.contains("embedded coordinator listening").then(|| {
                l.split("url=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .map(|u| u.trim_matches('"').to_string())
            })?
        })
        .expect("the run logs its coordinator's address");
    // keep reading the log so the run never blocks on a full pipe
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).count());
    let call = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_defuse"));
        c.args(args)
            .args(["--coordinator", &url])
            .env_remove("DEFUSE_TOKEN")
            .env_remove("DEFUSE_WORKER_TOKEN");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let guess = "0".repeat(64);
    for (env, says) in [
        (vec![], "needs a token"),
        (vec![("DEFUSE_TOKEN", guess.as_str())], "wrong token"),
    ] {
        let (code, err) = call(&["status"], &env);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(says), "{says}: {err}");
        let (code, err) = call(&["cancel", "mnist-small"], &env);
        assert_ne!(code, Some(0), "{err}");
        assert!(err.contains(says), "{says}: {err}");
    }
    // nor can it pose as a worker (and take the run's shards)
    let (code, err) = call(
        &[
            "worker",
            "--cache-dir",
            tmp.path().join("intruder").to_str().unwrap(),
        ],
        &[
            ("DEFUSE_WORKER_TOKEN", guess.as_str()),
            ("RUST_LOG", "info"),
        ],
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("wrong token"), "{err}");
    let _ = run.kill();
    let _ = run.wait();
    let _ = drain.join();
}

/// `defuse completions <shell>` and `defuse man` print what shells and `man` read.
#[test]
fn completions_and_the_man_page_are_generated() {
    let out = defuse(&["completions", "bash"]);
    assert!(out.status.success());
    let bash = String::from_utf8_lossy(&out.stdout);
    assert!(
        bash.contains("_defuse") && bash.contains("--allow-path"),
        "{bash}"
    );
    let out = defuse(&["completions", "zsh"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("#compdef defuse"));
    let out = defuse(&["man"]);
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.contains(".TH defuse") && man.contains("coordinator"),
        "{man}"
    );
    // an unknown shell is a usage error naming the choices
    let out = defuse(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bash"));
}
