//! Distill: the DP-GMM over the failure codes; its components above the weight
//! cutoff are the scenarios, each with a grid of samples decoded and classified (the
//! paper's picture) and a few of its own failures beside the images they came from.
use std::time::Instant;

use super::{hash_of, Job};
use crate::data::Dataset;
use crate::error::Result;
use crate::identify::Failures;
use crate::layout::{self, read_json, write_json};
use crate::models::{Classifier, Vae};
use crate::scenarios::{self, Example, Scenario};

/// The scenarios and the step's hash.
pub(super) fn run(
    job: &mut Job,
    h_identify: &str,
    failures: &Failures,
    vae: &Vae,
    clf: &Classifier,
    ds: &Dataset,
) -> Result<(Vec<Scenario>, String)> {
    let cfg = job.cfg;
    let h_distill = hash_of(&[&h_identify, &cfg.distill]);
    let started = Instant::now();
    let scen_path = job.out.join(layout::SCENARIOS);
    let scenarios: Vec<Scenario> = if job.done("distill", &h_distill) {
        job.reuse("distill");
        read_json(&scen_path)?
    } else {
        job.dir("distill")?;
        let (gmm, mut scenarios, assign) = scenarios::distill(failures, &cfg.distill, cfg.seed)?;
        for s in &mut scenarios {
            let codes = s.sample_codes(
                cfg.distill.grid_samples,
                cfg.distill.tau,
                cfg.seed,
                scenarios::Stream::Grid,
            )?;
            let (imgs, preds) = scenarios::decode_and_classify(vae, clf, &codes)?;
            // rows of 8: a block a person can take in at a glance
            let rows = imgs.split(8, 0);
            crate::images::write_grid(&job.out.join(layout::scenario_grid(s.id)), &rows, 3)?;
            s.sample_predictions = preds;
            write_examples(job, s, failures, &assign, vae, clf, ds)?;
        }
        write_json(&job.out.join(layout::GMM), &gmm)?;
        write_json(&job.out.join(layout::ASSIGNMENTS), &assign)?;
        crate::table::write_failures(
            &job.out.join(layout::FAILURES_TABLE),
            failures,
            &assign,
            &scenarios,
            &|c| ds.class_name(c),
        )?;
        write_json(&scen_path, &scenarios)?;
        job.mark("distill", &h_distill, started)?;
        scenarios
    };
    tracing::info!(scenarios = scenarios.len(), "distill");
    Ok((scenarios, h_distill))
}

/// Writes `distill/failures-<id>.png` (up to [`scenarios::EXAMPLES`] searched images
/// above, one failure of each below) and records them on the scenario: what a person
/// labelling should see, since the Gaussian grid's samples near the mean are often
/// classified right.
fn write_examples(
    job: &Job,
    s: &mut Scenario,
    failures: &Failures,
    assign: &[i64],
    vae: &Vae,
    clf: &Classifier,
    ds: &Dataset,
) -> Result<()> {
    let cfg = job.cfg;
    let picked = scenarios::example_failures(
        failures,
        assign,
        s.component,
        s.id,
        scenarios::EXAMPLES,
        cfg.seed,
    );
    if picked.is_empty() {
        s.examples = vec![];
        return Ok(());
    }
    let idx = tch::Tensor::from_slice(&picked.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let codes = failures.codes.index_select(0, &idx);
    let (decoded, preds) = scenarios::decode_and_classify(vae, clf, &codes)?;
    let rows: Vec<usize> = picked
        .iter()
        .map(|&i| failures.source_index[i] as usize)
        .collect();
    let split = ds.split(cfg.identify.split);
    let held = split.read_rows(&rows)?;
    let images = held.gather(&rows, tch::Device::Cpu);
    crate::images::write_grid(
        &job.out.join(layout::scenario_failures(s.id)),
        &[images, decoded],
        3,
    )?;
    s.examples = picked
        .iter()
        .zip(&preds)
        .map(|(&i, &p)| Example {
            source: failures.source_index[i] as usize,
            label: failures.true_label[i],
            predicted: p,
        })
        .collect();
    Ok(())
}
