//! The Defuse coordinator: accepts jobs, runs their central steps (models, then
//! distill/label/correct/report), shards the identify step across workers through
//! leases, and keeps all job, shard and worker state in a [`store::StateStore`]
//! (Redis, or memory in the embedded mode). Artifacts (models, shard outputs,
//! reports) live in an [`defuse_core::artifacts::ArtifactStore`].
//!
//! One driver loop owns the job life cycle (`lifecycle.rs`) and is the single reaper
//! of expired leases; the gRPC handlers only make fenced, atomic store transitions.
//!
//! Layers, each using only those below it: `store` and `keys`; `state` (settings,
//! stores, the process-local caches behind one lock); `folder` and `rounds`;
//! `driver` (the life cycle); `api` (the job API, one error type); the adapters
//! `service` (gRPC) and `http`; `server` (wiring and graceful shutdown).
//!
//! Nothing that matters lives only on the coordinator's disk: job and shard state and
//! the labels are in the state store; plans, models, shard outputs, checkpoints and a
//! durable copy of each job folder (`folder.rs`) are in the artifact store. The work
//! dir is a cache a restarted coordinator refills.
pub mod http;
pub mod keys;
pub mod lifecycle;
pub mod metrics;
pub mod store;

mod api;
mod driver;
mod error;
mod folder;
mod paths;
mod rounds;
mod server;
mod service;
mod state;

pub use api::{job_json, DEFAULT_PAGE, MAX_PAGE, MODEL_DIR, RESULT_FILES};
pub use error::CoordinatorError;
pub use server::{serve, ServeError};
pub use state::{random_secret, Coordinator, CoordinatorConfig, HttpLimits};
