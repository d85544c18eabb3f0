//! `defuse run` and `defuse label`: a whole job in one process, and labelling its
//! scenarios by hand.
use std::path::{Path, PathBuf};

use anyhow::Context;
use defuse_core::config::JobConfig;
use defuse_core::layout;
use defuse_core::pipeline::{self, RunOutcome};
use defuse_core::scenarios::{self, Scenario};

/// Exit code of a run that stopped to wait for labels.
pub const EXIT_AWAITING_LABELS: u8 = 3;

pub fn run(
    config: &Path,
    out: Option<PathBuf>,
    workers: usize,
    sets: &[String],
) -> anyhow::Result<Option<u8>> {
    let cfg = load_here(config, sets, out)?;
    if !cfg.data.in_bucket() && !cfg.data.path.is_dir() {
        return Err(defuse_core::Error::invalid(
            "data.path",
            format!(
                "{}: {} is not a folder",
                config.display(),
                cfg.data.path.display()
            ),
        )
        .into());
    }
    let out_dir = cfg.out_dir();
    // an `out` in a bucket: this machine's working copy starts from what is there (a
    // run begun elsewhere carries on); every step copies its files back
    let bucket_out = cfg.out_in_bucket();
    if let Some(u) = &bucket_out {
        let n = defuse_core::sources::restore_out(u, &out_dir)?;
        if n > 0 {
            println!(
                "defuse run: {n} files of {} copied to {}",
                u.url(),
                out_dir.display()
            );
        }
    }
    // where the user finds the results
    let shown = |rel: &str| match &bucket_out {
        Some(u) => format!("{}/{rel}", u.url()),
        None => out_dir.join(rel).display().to_string(),
    };
    let started = std::time::Instant::now();
    let outcome = match crate::cluster::embedded(&cfg, workers)? {
        crate::cluster::Embedded::Done => {
            RunOutcome::Finished(Box::new(layout::read_json(&out_dir.join(layout::SUMMARY))?))
        }
        crate::cluster::Embedded::AwaitingLabels => {
            let scenarios: Vec<Scenario> = layout::read_json(&out_dir.join(layout::SCENARIOS))?;
            RunOutcome::AwaitingLabels {
                scenarios: scenarios.len(),
            }
        }
    };
    match outcome {
        RunOutcome::Finished(s) => {
            println!(
                "defuse run: {} finished in {:.0} s",
                s.job,
                started.elapsed().as_secs_f64()
            );
            println!(
                "  {} images searched, {} failures from {} images ({:.1}% of them), {} scenarios ({} labelled)",
                s.n_images_searched, s.n_failures, s.n_images_with_failure, 100.0 * s.failure_rate_per_image, s.n_scenarios, s.n_labelled
            );
            println!(
                "  test accuracy      {:6.2}% -> {:6.2}%",
                100.0 * s.test_accuracy_before,
                100.0 * s.test_accuracy_after
            );
            let pct = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
            if let Some(u) = &s.test_unsearched {
                println!(
                    "  test accuracy on the {} test images not searched  {} -> {}",
                    u.images,
                    pct(u.accuracy_before),
                    pct(u.accuracy_after)
                );
            }
            let r = &s.real_members_labelled;
            println!(
                "  real images inside the labelled scenarios ({})  {} -> {}",
                r.images,
                pct(r.accuracy_before),
                pct(r.accuracy_after)
            );
            let t = &s.train_members_labelled;
            if t.conflicting > 0 {
                println!(
                    "  training images labelled against their scenario  {} of {} inside the labelled scenarios ({} relabelled, {} left out; correct.conflicting_labels)",
                    t.conflicting, t.images, t.relabelled, t.dropped
                );
            }
            println!(
                "  scenario samples held out (synthetic)  {:6.2}% -> {:6.2}%",
                100.0 * s.scenario_accuracy_before,
                100.0 * s.scenario_accuracy_after
            );
            let steps: Vec<String> = s
                .step_seconds
                .iter()
                .map(|(n, t)| format!("{n} {t:.0}s"))
                .collect();
            println!("  steps: {}", steps.join(", "));
            println!("  report: {}", shown(layout::REPORT));
            Ok(None)
        }
        RunOutcome::AwaitingLabels { scenarios } => {
            println!(
                "defuse run: {scenarios} scenarios are waiting for labels (label.mode = \"manual\").\n  look at {}/distill/failures-<id>.png (its own failures) and scenario-<id>.png (samples), then\n  defuse label {} <id>=<class>|discard ...   (or --file labels.json)\n  and run `defuse run {}` again to correct.",
                out_dir.display(),
                out_dir.display(),
                config.display()
            );
            Ok(Some(EXIT_AWAITING_LABELS))
        }
        RunOutcome::FineTune(_) => {
            anyhow::bail!("the embedded run ended in the middle of its fine-tune")
        }
    }
}

/// Labels a job's scenarios: `pairs` like `3=8` or `5=discard`, or a labels file.
pub fn label(job_dir: &Path, file: Option<&Path>, pairs: &[String]) -> anyhow::Result<()> {
    let scen_path = job_dir.join(layout::SCENARIOS);
    let scenarios: Vec<Scenario> = layout::read_json(&scen_path).with_context(|| {
        format!(
            "{} has no distilled scenarios yet (run `defuse run` first)",
            job_dir.display()
        )
    })?;
    let class_names = class_names(job_dir)?;
    let labels = match (file, pairs.is_empty()) {
        (Some(f), true) => scenarios::read_labels(f, &scenarios, &class_names)?,
        (None, false) => {
            let invalid = |m| defuse_core::Error::invalid("label", m);
            let kv = scenarios::label_pairs_from_args(pairs).map_err(invalid)?;
            scenarios::validate_labels(
                kv.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                &scenarios,
                &class_names,
            )
            .map_err(invalid)?
        }
        _ => anyhow::bail!(defuse_core::Error::invalid(
            "label",
            "give either --file or <scenario>=<class> pairs"
        )),
    };
    // merge with labels given before
    let path = job_dir.join(layout::LABELS);
    let mut all = if path.exists() {
        scenarios::read_labels(&path, &scenarios, &class_names)?
    } else {
        Default::default()
    };
    all.extend(labels);
    scenarios::write_labels(&path, &all)?;
    let missing: Vec<usize> = scenarios
        .iter()
        .map(|s| s.id)
        .filter(|id| !all.contains_key(id))
        .collect();
    println!(
        "labels: {} of {} scenarios labelled; wrote {}",
        all.len(),
        scenarios.len(),
        path.display()
    );
    if !missing.is_empty() {
        println!("  not labelled yet (they are left out of the correction): {missing:?}");
    }
    Ok(())
}

/// A job file for this process (`--out` over its `out`), every local path absolute: the
/// steps' hashes cover the data's and the models' paths, so the same job file reached
/// another way (`defuse run mnist.toml` in `examples/` after `defuse run
/// examples/mnist.toml`) finds its finished steps instead of training the models again.
fn load_here(config: &Path, sets: &[String], out: Option<PathBuf>) -> anyhow::Result<JobConfig> {
    let mut cfg = JobConfig::load_with(config, sets)?;
    if out.is_some() {
        cfg.out = out;
    }
    cfg.resolve_paths(&std::env::current_dir()?);
    Ok(cfg)
}

/// Class names of a job (written by `defuse run`).
fn class_names(job_dir: &Path) -> anyhow::Result<Vec<String>> {
    Ok(layout::read_json(&job_dir.join(layout::CLASSES))?)
}

/// `defuse sweep`: corrections for several lambdas from the same job outputs.
pub fn sweep(config: &Path, out: Option<PathBuf>, lambdas: &[f64]) -> anyhow::Result<()> {
    let cfg = load_here(config, &[], out)?;
    let s = pipeline::sweep(&cfg, lambdas)?;
    let dir = cfg.out_dir().join("sweep");
    println!(
        "lambda sweep ({} held-out scenario samples):\n  before      test {:6.2}%  scenarios {:6.2}%",
        s.scenario_test_samples,
        100.0 * s.test_accuracy_before,
        100.0 * s.scenario_accuracy_before
    );
    for p in &s.points {
        println!(
            "  lambda {:<5} test {:6.2}%  scenarios {:6.2}%",
            p.lambda,
            100.0 * p.test_accuracy,
            100.0 * p.scenario_accuracy
        );
    }
    println!(
        "  table {}, figure {}",
        dir.join("sweep.md").display(),
        dir.join("sweep.svg").display()
    );
    Ok(())
}
