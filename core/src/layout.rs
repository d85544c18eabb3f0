//! The job folder: every file name the steps write and the coordinator, the CLI and
//! the pages read, in one place, and the JSON helpers they share.
//!
//! ```text
//! <out>/job.toml, classes.json, labels.json
//!       models/        classifier.*, vae.*, done.json
//!       identify/      failures.safetensors, shard-*.safetensors, done.json
//!       distill/       scenarios.json, gmm.json, assignments.json, scenario-<id>.png
//!       pictures/      nearest-<id>.png, projection.svg
//!       correct/       classifier.*, evaluation.json, rounds-final.*, rounds-done.json
//!       report/        summary.json, index.html
//! ```
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

pub const JOB_TOML: &str = "job.toml";
pub const CLASSES: &str = "classes.json";
pub const LABELS: &str = "labels.json";
pub const FAILURES: &str = "identify/failures.safetensors";
pub const SCENARIOS: &str = "distill/scenarios.json";
pub const GMM: &str = "distill/gmm.json";
pub const ASSIGNMENTS: &str = "distill/assignments.json";
pub const EVALUATION: &str = "correct/evaluation.json";
/// Written by the coordinator after the last fine-tune round.
pub const ROUNDS_DONE: &str = "correct/rounds-done.json";
pub const SUMMARY: &str = "report/summary.json";
pub const REPORT: &str = "report/index.html";

/// The sample grid of scenario `id`.
pub fn scenario_grid(id: usize) -> String {
    format!("distill/scenario-{id}.png")
}

/// The training images nearest scenario `id`.
pub fn nearest(id: usize) -> String {
    format!("pictures/nearest-{id}.png")
}

/// The classifier after the last fine-tune round, in its format `ext`.
pub fn rounds_final(ext: &str) -> String {
    format!("correct/rounds-final.{ext}")
}

/// A step's marker: `<step>/done.json`.
pub fn done(step: &str) -> String {
    format!("{step}/done.json")
}

/// Scratch folders of a coordinator (downloads of objects that are in the artifact
/// store already): never part of a job folder's durable copy.
pub const SCRATCH: &[&str] = &["identify/accepted/", "correct/rounds/"];

pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).expect("serialisable"))
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}
