//! Job, shard and worker state: one trait, two implementations with the same
//! semantics (Redis for clusters, memory for the embedded mode), checked by one shared
//! test suite (`tests/store.rs`).
//!
//! Shards follow `pending -> leased(attempt k, owner, deadline) -> done | failed`.
//! Every transition is atomic (a Lua script in Redis, one lock in memory), and every
//! completion, failure or renewal is fenced by owner and attempt. Times are
//! milliseconds since the Unix epoch, passed in by the caller (one clock: the
//! coordinator's), so tests can move time without sleeping.
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod memory;
pub mod redis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    AwaitingLabels,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::AwaitingLabels => "awaiting_labels",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::AwaitingLabels,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What the store keeps of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub state: JobState,
    /// The step the job is in (`models`, `identify`, `finish`).
    pub step: String,
    pub config_toml: String,
    /// Shards of the identify step (0 until planned).
    pub n_shards: u32,
    pub error: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub shard: u32,
    pub attempt: u32,
    pub deadline_ms: u64,
}

/// Answer to a fenced update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    Accepted,
    /// Not the current owner and attempt (or the shard is no longer leased): ignored.
    Stale,
}

/// Answer to a failure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// The shard went back to pending for another attempt.
    Requeued,
    /// Not retryable or out of attempts: the shard, and with it the job, failed.
    JobFailed,
    Stale,
}

/// An expired lease the reaper handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub shard: u32,
    pub attempt: u32,
    pub owner: String,
    /// false: out of attempts, the job failed.
    pub requeued: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShardCounts {
    pub total: u32,
    pub pending: u32,
    pub leased: u32,
    pub done: u32,
    pub failed: u32,
}

impl ShardCounts {
    pub fn of(shards: &[ShardInfo]) -> ShardCounts {
        let mut c = ShardCounts {
            total: shards.len() as u32,
            ..Default::default()
        };
        for s in shards {
            match s.state.as_str() {
                "pending" => c.pending += 1,
                "leased" => c.leased += 1,
                "done" => c.done += 1,
                _ => c.failed += 1,
            }
        }
        c
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShardInfo {
    pub shard: u32,
    pub state: String,
    pub attempt: u32,
    pub owner: String,
    pub output: String,
    /// How many completions were accepted (never more than 1).
    pub accepted: u32,
    pub error: String,
}

/// Errors of a state store. `Lost` means the store no longer has the job: it was
/// restarted without persistence or flushed; the job cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {0}: its state is gone from the state store (restarted without persistence, or flushed)")]
    Lost(String),
    #[error("job {0} already exists")]
    Exists(String),
    #[error("state store: {0}")]
    Backend(String),
}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        StoreError::Backend(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Creates a job (state as given, no shards yet).
    async fn create_job(&self, job: &JobRecord) -> StoreResult<()>;
    async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>>;
    async fn list_jobs(&self) -> StoreResult<Vec<JobRecord>>;
    /// Moves a job to `state`/`step` (with an error message when failing). A final
    /// state is never left.
    async fn set_job_state(
        &self,
        id: &str,
        state: JobState,
        step: &str,
        error: &str,
        now_ms: u64,
    ) -> StoreResult<()>;
    /// Plans `n` pending shards (idempotent: does nothing when shards exist).
    async fn plan_shards(&self, id: &str, n: u32, now_ms: u64) -> StoreResult<()>;
    /// Leases the next pending shard of a running job to `worker`.
    async fn lease(
        &self,
        id: &str,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> StoreResult<Option<Lease>>;
    async fn renew(
        &self,
        id: &str,
        shard: u32,
        worker: &str,
        attempt: u32,
        now_ms: u64,
        lease_ms: u64,
    ) -> StoreResult<Fenced>;
    async fn complete(
        &self,
        id: &str,
        shard: u32,
        worker: &str,
        attempt: u32,
        output: &str,
    ) -> StoreResult<Fenced>;
    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        id: &str,
        shard: u32,
        worker: &str,
        attempt: u32,
        retryable: bool,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome>;
    /// Requeues (or fails, after `max_attempts`) every lease past its deadline.
    async fn reap(&self, id: &str, now_ms: u64, max_attempts: u32) -> StoreResult<Vec<Expired>>;
    async fn shards(&self, id: &str) -> StoreResult<Vec<ShardInfo>>;
    async fn counts(&self, id: &str) -> StoreResult<ShardCounts> {
        Ok(ShardCounts::of(&self.shards(id).await?))
    }
    /// Marks every pending and leased shard cancelled and the job cancelled.
    async fn cancel(&self, id: &str, now_ms: u64) -> StoreResult<()>;
    async fn register_worker(&self, worker: &str, info_json: &str, now_ms: u64) -> StoreResult<()>;
    /// Records a heartbeat; false when the worker is unknown (register again).
    async fn touch_worker(&self, worker: &str, now_ms: u64) -> StoreResult<bool>;
    /// Known workers: (id, info JSON, last heartbeat).
    async fn workers(&self) -> StoreResult<Vec<(String, String, u64)>>;
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
