//! Report: the numbers before and after, per scenario, with the grids, the nearest
//! images and the projection, as `summary.json` and one self-contained page.
use std::time::Instant;

use super::{hash_of, Job};
use crate::data::Dataset;
use crate::error::Result;
use crate::identify::{Failures, IdentifyStats};
use crate::report;
use crate::scenarios::{Labels, Scenario};

/// What the report is made of.
pub(super) struct Input<'a> {
    pub ds: &'a Dataset,
    pub istats: &'a IdentifyStats,
    pub failures: &'a Failures,
    pub scenarios: &'a [Scenario],
    pub labels: &'a Labels,
    pub evaluation: &'a report::Evaluation,
}

pub(super) fn run(job: &mut Job, h_correct: &str, input: Input) -> Result<report::Summary> {
    let cfg = job.cfg;
    let started = Instant::now();
    let h_report = hash_of(&[&h_correct]);
    let mut timings = job.timings.clone();
    timings.push(("report".into(), 0.0));
    let summary = report::Summary::new(
        cfg,
        input.ds,
        input.istats,
        input.failures,
        input.scenarios,
        input.labels,
        input.evaluation,
        timings,
    );
    job.dir("report")?;
    report::write(&job.out, &summary)?;
    job.mark("report", &h_report, started)?;
    Ok(summary)
}
