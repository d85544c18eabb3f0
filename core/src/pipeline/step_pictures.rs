//! Pictures: the 8 real training images nearest each scenario's mean, and a t-SNE map
//! of the failure codes (`crate::pictures`).
use std::time::Instant;

use super::{hash_of, Job};
use crate::data::Dataset;
use crate::error::Result;
use crate::identify::Failures;
use crate::layout::{self, read_json};
use crate::models::Vae;
use crate::scenarios::Scenario;

pub(super) fn run(
    job: &mut Job,
    h_distill: &str,
    vae: &Vae,
    ds: &Dataset,
    scenarios: &[Scenario],
    failures: &Failures,
) -> Result<()> {
    let h_pictures = hash_of(&[&h_distill]);
    if job.done("pictures", &h_pictures) {
        job.reuse("pictures");
        return Ok(());
    }
    let started = Instant::now();
    job.dir("pictures")?;
    let assign: Vec<i64> = read_json(&job.out.join(layout::ASSIGNMENTS))?;
    crate::pictures::write(&job.out, vae, ds, scenarios, &failures.codes, &assign)?;
    job.mark("pictures", &h_pictures, started)
}
