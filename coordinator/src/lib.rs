//! The Defuse coordinator: accepts jobs, runs their central steps (models, then
//! distill/label/correct/report), shards the identify step across workers through
//! leases, and keeps all job, shard and worker state in a [`store::StateStore`]
//! (Redis, or memory in the embedded mode). Artifacts (models, shard outputs,
//! reports) live in an [`defuse_core::artifacts::ArtifactStore`].
//!
//! One driver loop owns the job life cycle (`queued -> running(models) ->
//! running(identify) -> running(finish) -> done | failed | awaiting_labels |
//! cancelled`) and is the single reaper of expired leases; the gRPC handlers only
//! make fenced, atomic store transitions.
pub mod http;
pub mod metrics;
pub mod store;

mod driver;
mod rounds;
mod service;

pub use service::{read_scenarios, serve, Coordinator, CoordinatorConfig, ServeError};

/// Artifact key of a shard attempt's output: a dead attempt's output is never under
/// the key a completion of another attempt names.
pub fn shard_output_key(job: &str, shard: u32, attempt: u32) -> String {
    format!("jobs/{job}/identify/shard-{shard:05}/attempt-{attempt}.safetensors")
}
