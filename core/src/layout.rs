//! The job folder: every file name the steps write and the coordinator, the CLI and
//! the pages read, in one place, and the JSON helpers they share.
//!
//! ```text
//! <out>/job.toml, classes.json, labels.json, .defuse-folder.json (in a bucket)
//!       inputs/        copies of the job's models and labels in buckets, inputs.json
//!       models/        classifier.*, vae.*, done.json
//!       identify/      failures.safetensors, shard-*.safetensors, done.json
//!       distill/       scenarios.json, gmm.json, assignments.json, failures.parquet,
//!                      scenario-<id>.png, failures-<id>.png
//!       pictures/      nearest-<id>.png, projection.svg
//!       correct/       classifier.*, evaluation.json, train-members.json, rounds-final.*,
//!                      rounds-done.json
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
/// The failures as one flat table with their scenarios (`table.rs`).
pub const FAILURES_TABLE: &str = "distill/failures.parquet";
pub const EVALUATION: &str = "correct/evaluation.json";
/// The training images inside the scenarios, with what the fine-tune trained them as.
pub const TRAIN_MEMBERS: &str = "correct/train-members.json";
/// Written by the coordinator after the last fine-tune round.
pub const ROUNDS_DONE: &str = "correct/rounds-done.json";
pub const SUMMARY: &str = "report/summary.json";
/// The map of the failure codes (`pictures::map`).
pub const PROJECTION: &str = "pictures/projection.svg";
pub const REPORT: &str = "report/index.html";
/// Copies of the job's inputs that are in buckets (`sources.rs`), and their record.
pub const INPUTS: &str = "inputs";
pub const INPUTS_RECORD: &str = "inputs/inputs.json";
/// What a folder's copy in a bucket holds (`folder_copy.rs`), beside its files.
pub const FOLDER_MANIFEST: &str = ".defuse-folder.json";

/// The sample grid of scenario `id`.
pub fn scenario_grid(id: usize) -> String {
    format!("distill/scenario-{id}.png")
}

/// Scenario `id`'s own failures: searched images above, their failures below.
pub fn scenario_failures(id: usize) -> String {
    format!("distill/failures-{id}.png")
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

/// The embedded run's artifact store, inside its job folder.
pub const EMBEDDED_ARTIFACTS: &str = "artifacts";

/// Scratch folders of a coordinator (downloads of objects that are in the artifact
/// store already) and the embedded run's artifact store: never part of a job folder's
/// copy in a store.
pub const SCRATCH: &[&str] = &["identify/accepted/", "correct/rounds/", "artifacts/"];

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A job resumed after distill reads its scenarios back from JSON: the means and
    /// covariances must be the very numbers it wrote, or the resumed correction draws
    /// other samples than a run that never stopped (serde_json's default float parser
    /// may be one ulp off; the workspace turns on `float_roundtrip`).
    #[test]
    fn floats_read_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let mut v = vec![
            0.10416666666666667,
            1.0 / 3.0,
            2.0f64.sqrt(),
            1e-300,
            5e-324,
        ];
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..10_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = f64::from_bits(s);
            if x.is_finite() {
                v.push(x);
            }
        }
        write_json(&path, &v).unwrap();
        let back: Vec<f64> = read_json(&path).unwrap();
        let off = v
            .iter()
            .zip(&back)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!((back.len(), off), (v.len(), 0));
    }
}
