//! The paper's lambda sweep: one correction per lambda from the same scenarios, labels
//! and scenario samples.
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{finish, hash_of, prepare, step_correct, Done, RunOutcome};
use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::identify::Failures;
use crate::layout::{self, read_json, write_json};
use crate::report;
use crate::scenarios::{self, Scenario};

/// What `sweep` measured: the classifier before correction, and one correction per lambda.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    pub test_accuracy_before: f64,
    pub scenario_accuracy_before: f64,
    pub scenario_test_samples: usize,
    pub points: Vec<crate::plots::SweepPoint>,
}

/// The paper's lambda sweep: runs the job up to its report (reusing every step already
/// done), then corrects the classifier once per lambda from the same scenarios, labels
/// and scenario samples, each from the original classifier. Writes
/// `sweep/lambda-<l>/` (model, evaluation), `sweep/sweep.json`, `sweep/sweep.md` and
/// the figure `sweep/sweep.svg` (test accuracy against scenario accuracy).
pub fn sweep(cfg: &JobConfig, lambdas: &[f64]) -> Result<Sweep> {
    if lambdas.is_empty() {
        return Err(Error::invalid("lambdas", "give at least one lambda"));
    }
    if let Some(l) = lambdas.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
        return Err(Error::invalid(
            "lambdas",
            format!("{l} is not >= 0 (the loss is CE(train) + lambda * CE(scenario))"),
        ));
    }
    let mut p = prepare(cfg)?;
    p.identify_here()?;
    if let RunOutcome::AwaitingLabels { scenarios } = finish(&mut p)? {
        return Err(Error::invalid(
            "label",
            format!("the job waits for labels on its {scenarios} scenarios: label them first (defuse label)"),
        ));
    }
    let (ds, clf, vae) = (&p.ds, &p.clf, &p.vae);
    let job = &mut p.job;
    let scenarios: Vec<Scenario> = read_json(&job.out.join(layout::SCENARIOS))?;
    let labels =
        scenarios::read_labels(&job.out.join(layout::LABELS), &scenarios, &ds.class_names)?;
    let (failures, _) = Failures::read(&job.out.join(layout::FAILURES))?;
    let h_label = std::fs::read_to_string(job.out.join(layout::done("label")))
        .ok()
        .and_then(|t| serde_json::from_str::<Done>(&t).ok())
        .map(|d| d.hash)
        .unwrap_or_default();
    let mut points = Vec::new();
    let mut rows = Vec::new();
    let mut before = None;
    // where the scenarios lie and the training images inside them: the same for every
    // point, found once (and only when a point is computed)
    let mut placed = None;
    for &lambda in lambdas {
        let mut o = cfg.correct.clone();
        o.lambda = lambda;
        let step = format!("sweep/lambda-{lambda}");
        let h = hash_of(&[&h_label, &o]);
        let eval_path = job.out.join(&step).join("evaluation.json");
        let started = Instant::now();
        let ev: report::Evaluation = if job.done(&step, &h) {
            job.reuse(&step);
            read_json(&eval_path)?
        } else {
            let dir = job.dir(&step)?;
            let tuned = dir.join(format!("classifier.{}", clf.extension()));
            let input = step_correct::Input {
                ds,
                clf,
                vae,
                scenarios: &scenarios,
                labels: &labels,
                failures: &failures,
            };
            if placed.is_none() {
                placed = Some(step_correct::place(job, &input)?);
            }
            let p = placed.as_ref().expect("placed above");
            let ev = step_correct::correct_and_evaluate(job, &input, p, &o, &tuned)?;
            write_json(&eval_path, &ev)?;
            job.mark(&step, &h, started)?;
            ev
        };
        tracing::info!(
            lambda,
            test = ev.test_accuracy_after,
            scenarios = ev.scenario_accuracy_after,
            "sweep point"
        );
        before.get_or_insert((
            ev.test_accuracy_before,
            ev.scenario_accuracy_before,
            ev.scenario_test_samples,
        ));
        rows.push((lambda, ev.real_labelled(&labels).0, ev.unsearched_test));
        points.push(crate::plots::SweepPoint {
            lambda,
            test_accuracy: ev.test_accuracy_after,
            scenario_accuracy: ev.scenario_accuracy_after,
        });
    }
    let (tb, sb, n) = before.expect("at least one lambda");
    let sweep = Sweep {
        test_accuracy_before: tb,
        scenario_accuracy_before: sb,
        scenario_test_samples: n,
        points,
    };
    let dir = job.dir("sweep")?;
    write_json(&dir.join("sweep.json"), &sweep)?;
    let pct = |x: Option<f64>| x.map_or("–".into(), |v| format!("{:.2}%", 100.0 * v));
    let (real0, unsearched0) = rows
        .first()
        .map(|r| (r.1.accuracy_before, r.2.and_then(|u| u.accuracy_before)))
        .unwrap_or_default();
    let mut md = format!(
        "| lambda | test accuracy | test images not searched | real images in the labelled scenarios | scenario samples ({n} held out) |\n|---:|---:|---:|---:|---:|\n| before | {:.2}% | {} | {} | {:.2}% |\n",
        100.0 * tb,
        pct(unsearched0),
        pct(real0),
        100.0 * sb
    );
    for (pt, (_, real, unsearched)) in sweep.points.iter().zip(&rows) {
        md.push_str(&format!(
            "| {} | {:.2}% | {} | {} | {:.2}% |\n",
            pt.lambda,
            100.0 * pt.test_accuracy,
            pct(unsearched.and_then(|u| u.accuracy_after)),
            pct(real.accuracy_after),
            100.0 * pt.scenario_accuracy
        ));
    }
    let md_path = dir.join("sweep.md");
    std::fs::write(&md_path, &md).map_err(|e| Error::io(&md_path, e))?;
    crate::plots::sweep_svg(
        &dir.join("sweep.svg"),
        &format!("{}: correction by lambda", ds.name),
        &sweep.points,
        (tb, sb),
    )?;
    Ok(sweep)
}
