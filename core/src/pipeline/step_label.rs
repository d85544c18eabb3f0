//! Label: one label per scenario, from the `source-majority` oracle, a file, or a
//! person (`manual`: the run stops until `labels.json` is there).
use std::time::Instant;

use super::{hash_of, Job};
use crate::config::LabelMode;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::layout;
use crate::scenarios::{self, Labels, Scenario};

/// The labels and the step's hash; `None` while a person's labels are awaited.
pub(super) fn run(
    job: &mut Job,
    h_distill: &str,
    scenarios: &[Scenario],
    ds: &Dataset,
) -> Result<Option<(Labels, String)>> {
    let cfg = job.cfg;
    let labels_path = job.out.join(layout::LABELS);
    let label_input = match cfg.label.mode {
        LabelMode::File => std::fs::read_to_string(cfg.label.file.as_ref().expect("validated"))
            .map_err(|e| Error::io(cfg.label.file.as_ref().expect("validated"), e))?,
        LabelMode::Manual => std::fs::read_to_string(&labels_path).unwrap_or_default(),
        LabelMode::SourceMajority => String::new(),
    };
    let h_label = hash_of(&[&h_distill, &job.label_id(), &label_input]);
    let started = Instant::now();
    let labels: Labels = match cfg.label.mode {
        LabelMode::SourceMajority => scenarios::source_majority_labels(
            scenarios,
            cfg.label.min_purity,
            cfg.label.discard_non_failures,
        ),
        LabelMode::File => scenarios::read_labels(
            cfg.label.file.as_ref().expect("validated"),
            scenarios,
            &ds.class_names,
        )?,
        LabelMode::Manual => {
            if !labels_path.exists() {
                tracing::info!(
                    scenarios = scenarios.len(),
                    "waiting for labels: run `defuse label`"
                );
                return Ok(None);
            }
            scenarios::read_labels(&labels_path, scenarios, &ds.class_names)?
        }
    };
    if cfg.label.mode != LabelMode::Manual {
        scenarios::write_labels(&labels_path, &labels)?;
    }
    if job.done("label", &h_label) {
        job.reuse("label")
    } else {
        job.mark("label", &h_label, started)?
    }
    Ok(Some((labels, h_label)))
}
