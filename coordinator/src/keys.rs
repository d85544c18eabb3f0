//! Every artifact key of a job, in one place. A job's objects all live under
//! `jobs/<job>/`, so deleting a job is deleting that prefix.
//!
//! | key | what |
//! | --- | --- |
//! | `plan.json` | identify's plan: shard ranges, model keys, the data's digest |
//! | `data-manifest.json` | the data's files, sizes and hashes when the job was planned |
//! | `inputs/<sha256>/<name>` | a file the client uploaded with the job (`defuse submit`) |
//! | `models/<name>.<ext>` | the models workers load (trained or given) |
//! | `identify/shard-<n>/attempt-<a>.safetensors` | a shard attempt's output |
//! | `finetune/plan.json`, `finetune/scenario-train.safetensors` | the fine-tune's plan and samples |
//! | `finetune/round-<r>/model.<ext>` | round `r`'s starting checkpoint |
//! | `finetune/round-<r>/stats.json` | round `r`'s merged losses |
//! | `<part output>.stats.json` | a round part's losses, beside its checkpoint |
//! | `folder/<path>` + `folder.json` | the durable copy of the job folder (see `folder.rs`) |
//! | `report/summary.json`, `report/index.html`, `model/<file>` | the results |

/// Everything of a job: `jobs/<job>/`.
pub fn job_prefix(job: &str) -> String {
    format!("jobs/{job}/")
}

pub fn plan(job: &str) -> String {
    format!("jobs/{job}/plan.json")
}

/// The manifest of the job's data when it was planned (`DataManifest`).
pub fn data_manifest(job: &str) -> String {
    format!("jobs/{job}/data-manifest.json")
}

/// A file the client uploaded with the job (`upload://<sha256>/<name>`).
pub fn upload(job: &str, u: &defuse_core::sources::Upload) -> String {
    format!("jobs/{job}/inputs/{}/{}", u.sha256, u.name)
}

/// A model workers load; `file` is its name with the extension it came with.
pub fn model(job: &str, file: &str) -> String {
    format!("jobs/{job}/models/{file}")
}

/// Output of a shard attempt: a dead attempt's output is never under the key a
/// completion of another attempt names.
pub fn shard_output(job: &str, shard: u32, attempt: u32) -> String {
    format!("jobs/{job}/identify/shard-{shard:05}/attempt-{attempt}.safetensors")
}

/// Output of a fine-tune part attempt (round `round`, part `part`): a checkpoint in
/// the classifier's format `ext`.
pub fn part_output(job: &str, round: usize, part: u32, attempt: u32, ext: &str) -> String {
    format!("jobs/{job}/finetune/round-{round:04}/part-{part:03}/attempt-{attempt}.{ext}")
}

/// The losses a part reported, stored beside its output before it is accepted.
pub fn part_stats(output: &str) -> String {
    format!("{output}.stats.json")
}

pub fn finetune_plan(job: &str) -> String {
    format!("jobs/{job}/finetune/plan.json")
}

pub fn scenario_train(job: &str) -> String {
    format!("jobs/{job}/finetune/scenario-train.safetensors")
}

/// Round `round`'s starting checkpoint (round 0: the classifier under test).
pub fn checkpoint(job: &str, round: usize, ext: &str) -> String {
    format!("jobs/{job}/finetune/round-{round:04}/model.{ext}")
}

/// Round `round`'s losses, averaged over its parts (`correct::CorrectEpoch`).
pub fn round_stats(job: &str, round: usize) -> String {
    format!("jobs/{job}/finetune/round-{round:04}/stats.json")
}

/// A file of the job folder, by its path relative to the folder.
pub fn folder_file(job: &str, rel: &str) -> String {
    format!("jobs/{job}/folder/{rel}")
}

/// The manifest of the job folder's durable copy (written last).
pub fn folder_manifest(job: &str) -> String {
    format!("jobs/{job}/folder.json")
}

/// A published result (`report/summary.json`, `report/index.html`).
pub fn result(job: &str, rel: &str) -> String {
    format!("jobs/{job}/{rel}")
}

/// The fine-tuned classifier, under its file name.
pub fn final_model(job: &str, file: &str) -> String {
    format!("jobs/{job}/model/{file}")
}

/// The job folder's file names (`defuse_core::layout`), for the coordinator's readers.
pub use defuse_core::layout as files;
