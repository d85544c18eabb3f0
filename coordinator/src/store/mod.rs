//! Job, shard and worker state: one trait, two implementations with the same
//! semantics (Redis for clusters, memory for the embedded mode), checked by one shared
//! test suite (`tests/store.rs`).
//!
//! A job's shards come in sets ([`Stage`]): the identify shards, and the parts of each
//! fine-tune round. Shards of every set follow
//! `pending -> leased(attempt k, owner, deadline) -> done | failed`; a shard that
//! fails for good fails its job.
//! Every transition is atomic (a Lua script in Redis, one lock in memory), and every
//! completion, failure or renewal is fenced by owner and attempt. Times are
//! milliseconds since the Unix epoch, passed in by the caller (one clock: the
//! coordinator's), so tests can move time without sleeping.
//!
//! Coordinators on one store elect a leader ([`StateStore::lead`]): only the leader
//! drives jobs. Its writes to a job (`set_job_state`, `plan_shards`, `reap`) carry
//! the fencing token of its leadership; a job refuses a token older than the newest
//! it has seen ([`StoreError::Fenced`]), so a leader that lost its lease (paused,
//! partitioned) cannot undo what its successor did.
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod memory;
pub mod redis;

pub use crate::lifecycle::{ErrorKind, JobState, Phase, Stage};

/// What the store keeps of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub state: JobState,
    /// The phase the job is in (see `lifecycle.rs`).
    pub step: Phase,
    pub config_toml: String,
    /// Shards of the identify step (0 until planned; a round's parts are counted in
    /// its set).
    pub n_shards: u32,
    pub error: String,
    /// Why it failed (set with `error`; none while it has not).
    #[serde(default)]
    pub error_kind: Option<ErrorKind>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The job's trace context (W3C `traceparent`, set at submit): its central steps
    /// and every worker's tasks are spans of this trace. Empty for records stored
    /// before traces (they get none).
    #[serde(default)]
    pub trace_parent: String,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub shard: u32,
    pub attempt: u32,
    pub deadline_ms: u64,
}

/// One attempt at one shard of one set of one job, held by one worker, as its lease
/// granted it: what every renewal, completion and failure is fenced by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt<'a> {
    pub job: &'a str,
    pub stage: Stage,
    pub shard: u32,
    pub attempt: u32,
    pub worker: &'a str,
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

/// Why a task attempt ended without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Worth another attempt: requeued while attempts are left (`max_attempts`).
    Retryable,
    /// Fails the shard, and with it the job, at once.
    Fatal,
    /// The worker hands the task back (it is shutting down): requeued, and the attempt
    /// does not count toward `max_attempts`.
    HandBack,
}

impl Failure {
    /// The form the Redis script takes.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Failure::Retryable => "retry",
            Failure::Fatal => "fatal",
            Failure::HandBack => "handback",
        }
    }
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
            match s.state {
                ShardState::Pending => c.pending += 1,
                ShardState::Leased => c.leased += 1,
                ShardState::Done => c.done += 1,
                ShardState::Failed | ShardState::Cancelled => c.failed += 1,
            }
        }
        c
    }
}

/// Where a shard is: `pending -> leased -> done | failed` (back to pending on a retry
/// or an expired lease), or `cancelled` with its job. The Redis scripts keep it as the
/// text of [`ShardState::as_str`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    #[default]
    Pending,
    Leased,
    Done,
    Failed,
    Cancelled,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Pending => "pending",
            ShardState::Leased => "leased",
            ShardState::Done => "done",
            ShardState::Failed => "failed",
            ShardState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<ShardState> {
        [
            ShardState::Pending,
            ShardState::Leased,
            ShardState::Done,
            ShardState::Failed,
            ShardState::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for ShardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShardInfo {
    pub shard: u32,
    pub state: ShardState,
    pub attempt: u32,
    pub owner: String,
    pub output: String,
    /// The SHA-256 of the output recorded at acceptance (hex; empty before).
    pub output_sha256: String,
    /// How many completions were accepted (never more than 1).
    pub accepted: u32,
    /// Attempts handed back by workers shutting down (they do not count as tries).
    pub handbacks: u32,
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
    #[error("job {0}: write refused: a newer leader has written to it (this coordinator is no longer the leader)")]
    Fenced(String),
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
    /// Every job kept (tests and small tools: the driver and the API use the calls
    /// below, whose cost does not grow with finished jobs).
    async fn list_jobs(&self) -> StoreResult<Vec<JobRecord>>;
    /// The ids of every job kept, sorted (for paging through them).
    async fn job_ids(&self) -> StoreResult<Vec<String>>;
    /// The jobs not yet retired: every job that is not final, and final ones the
    /// driver has not retired yet.
    async fn active_jobs(&self) -> StoreResult<Vec<JobRecord>>;
    /// Moves a final job out of the active set and, given the time it finished, into
    /// the finished index, where retention finds it.
    async fn retire(&self, id: &str, finished_ms: Option<u64>) -> StoreResult<()>;
    /// Retired jobs to delete: those finished before `before_ms`, and the oldest beyond
    /// the newest `keep`.
    async fn expired_jobs(&self, before_ms: u64, keep: usize) -> StoreResult<Vec<String>>;
    /// How many retired jobs are kept.
    async fn finished_count(&self) -> StoreResult<u64>;
    /// Removes everything the store keeps of a job (record, every shard set, labels,
    /// indexes).
    async fn delete_job(&self, id: &str) -> StoreResult<()>;
    /// Moves a job to `state`/`step` (with an error message and its kind when
    /// failing). A final state is never left.
    /// Fenced by the leader's token `fence`.
    #[allow(clippy::too_many_arguments)]
    async fn set_job_state(
        &self,
        id: &str,
        state: JobState,
        step: Phase,
        error: &str,
        kind: Option<ErrorKind>,
        now_ms: u64,
        fence: u64,
    ) -> StoreResult<()>;
    /// Plans `n` pending shards in the set `stage` (idempotent: does nothing when the
    /// set has shards, or when the job is not running: a job cancelled meanwhile gets
    /// none; a round's parts only while the job is in that round).
    /// Fenced by the leader's token `fence`.
    async fn plan_shards(
        &self,
        id: &str,
        stage: Stage,
        n: u32,
        now_ms: u64,
        fence: u64,
    ) -> StoreResult<()>;
    /// Leases the next pending shard of the set `stage` to `worker`, if the job is
    /// running in that stage's phase.
    async fn lease(
        &self,
        id: &str,
        stage: Stage,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> StoreResult<Option<Lease>>;
    /// Extends the lease of `a` to `now_ms + lease_ms` (stale once the job has ended).
    async fn renew(&self, a: &Attempt<'_>, now_ms: u64, lease_ms: u64) -> StoreResult<Fenced>;
    /// Accepts the output of the current owner and attempt. Idempotent: the same owner,
    /// attempt and output completing again (a retry after a lost reply) is accepted
    /// again without counting twice.
    async fn complete(&self, a: &Attempt<'_>, output: &str, sha256: &str) -> StoreResult<Fenced>;
    /// Ends the current attempt without a result; see [`Failure`].
    async fn fail(
        &self,
        a: &Attempt<'_>,
        failure: Failure,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome>;
    /// Requeues (or fails, after `max_attempts` tries not handed back) every lease of
    /// the set `stage` past its deadline.
    /// Fenced by the leader's token `fence`.
    async fn reap(
        &self,
        id: &str,
        stage: Stage,
        now_ms: u64,
        max_attempts: u32,
        fence: u64,
    ) -> StoreResult<Vec<Expired>>;
    /// The shards of the set `stage` (none before it is planned).
    async fn shards(&self, id: &str, stage: Stage) -> StoreResult<Vec<ShardInfo>>;
    async fn counts(&self, id: &str, stage: Stage) -> StoreResult<ShardCounts> {
        Ok(ShardCounts::of(&self.shards(id, stage).await?))
    }
    /// Stores a job's labels (JSON) once, atomically: `false` when the job has labels
    /// already (labels are final).
    async fn put_labels(&self, id: &str, labels_json: &str) -> StoreResult<bool>;
    /// The labels a job was given, if any.
    async fn labels(&self, id: &str) -> StoreResult<Option<String>>;
    /// Records the SHA-256 of the checkpoint fine-tune round `round` starts from (the
    /// coordinator publishes it; workers and the round's merge check it against this).
    /// The same round always gets the same bytes (the merge is deterministic), so a
    /// step run again records the same value.
    async fn put_checkpoint_sha256(&self, id: &str, round: u32, sha256: &str) -> StoreResult<()>;
    /// The SHA-256 recorded for round `round`'s checkpoint (none: not recorded, a
    /// fine-tune planned by an older release).
    async fn checkpoint_sha256(&self, id: &str, round: u32) -> StoreResult<Option<String>>;
    /// Marks every pending and leased shard of the job's identify set and of the round
    /// it is in cancelled, and the job cancelled.
    async fn cancel(&self, id: &str, now_ms: u64) -> StoreResult<()>;
    /// Takes or renews the leader lease for `node` until `now_ms + ttl_ms`. Returns the
    /// fencing token of its leadership (it grows with every new leader), or `None`
    /// while another node holds a lease that has not expired.
    async fn lead(&self, node: &str, now_ms: u64, ttl_ms: u64) -> StoreResult<Option<u64>>;
    /// Raises a job's fence to the leader token `fence` without changing the job (a
    /// new leader claims the active jobs); refused like any fenced write.
    async fn claim(&self, id: &str, fence: u64) -> StoreResult<()>;
    /// Gives up the leader lease if `node` holds it (a coordinator shutting down), so
    /// another takes over at once instead of after the lease; the token keeps growing.
    async fn resign(&self, node: &str) -> StoreResult<()>;
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
