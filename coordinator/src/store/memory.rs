//! The in-memory state store of the embedded mode: one lock, the same semantics as
//! the Redis scripts.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<String, MemJob>,
    /// Jobs not yet retired (the Redis set `defuse:jobs:active`).
    active: std::collections::BTreeSet<String>,
    /// Retired jobs by the time they finished (the sorted set `defuse:jobs:finished`).
    finished: BTreeMap<String, u64>,
    workers: HashMap<String, (String, u64)>,
    /// (node, token, lease end).
    leader: Option<(String, u64, u64)>,
    tokens: u64,
}

#[derive(Debug)]
struct MemJob {
    rec: JobRecord,
    labels: Option<String>,
    /// The SHA-256 of each fine-tune round's starting checkpoint.
    checkpoints: BTreeMap<u32, String>,
    /// The newest leader token that wrote to the job.
    fence: u64,
    /// The job's shard sets, once planned.
    sets: BTreeMap<Stage, ShardSet>,
}

#[derive(Debug, Default)]
struct ShardSet {
    pending: VecDeque<u32>,
    shards: Vec<ShardInfo>,
    deadlines: BTreeMap<u32, u64>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn job<'a>(i: &'a mut Inner, id: &str) -> StoreResult<&'a mut MemJob> {
    i.jobs
        .get_mut(id)
        .ok_or_else(|| StoreError::Lost(id.into()))
}

/// Refuses a leader token older than the newest this job has seen.
fn fence(j: &mut MemJob, token: u64) -> StoreResult<()> {
    if token < j.fence {
        return Err(StoreError::Fenced(j.rec.id.clone()));
    }
    j.fence = token;
    Ok(())
}

/// Whether `a` holds its shard's lease now.
fn fenced(set: &ShardSet, a: &Attempt) -> bool {
    set.shards.get(a.shard as usize).is_some_and(|s| {
        s.state == ShardState::Leased && s.owner == a.worker && s.attempt == a.attempt
    })
}

/// The job's record and its set `stage` (a set not planned has no shard to
/// hold: `None`).
fn set_of(j: &mut MemJob, stage: Stage) -> (&mut JobRecord, Option<&mut ShardSet>) {
    (&mut j.rec, j.sets.get_mut(&stage))
}

fn fail_job(rec: &mut JobRecord, msg: String, now_ms: u64) {
    if !rec.state.is_final() {
        rec.state = JobState::Failed;
        rec.error = msg;
        rec.error_kind = Some(ErrorKind::Runtime);
        rec.updated_ms = now_ms;
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn create_job(&self, rec: &JobRecord) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        if i.jobs.contains_key(&rec.id) {
            return Err(StoreError::Exists(rec.id.clone()));
        }
        let j = MemJob {
            rec: JobRecord {
                n_shards: 0,
                ..rec.clone()
            },
            labels: None,
            checkpoints: BTreeMap::new(),
            fence: 0,
            sets: BTreeMap::new(),
        };
        i.jobs.insert(rec.id.clone(), j);
        i.active.insert(rec.id.clone());
        Ok(())
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .jobs
            .get(id)
            .map(|j| j.rec.clone()))
    }

    async fn list_jobs(&self) -> StoreResult<Vec<JobRecord>> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .jobs
            .values()
            .map(|j| j.rec.clone())
            .collect())
    }

    async fn job_ids(&self) -> StoreResult<Vec<String>> {
        Ok(self.inner.lock().unwrap().jobs.keys().cloned().collect())
    }

    async fn active_jobs(&self) -> StoreResult<Vec<JobRecord>> {
        let i = self.inner.lock().unwrap();
        Ok(i.active
            .iter()
            .filter_map(|id| i.jobs.get(id).map(|j| j.rec.clone()))
            .collect())
    }

    async fn retire(&self, id: &str, finished_ms: Option<u64>) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        i.active.remove(id);
        if let Some(t) = finished_ms.filter(|_| i.jobs.contains_key(id)) {
            i.finished.insert(id.into(), t);
        }
        Ok(())
    }

    async fn expired_jobs(&self, before_ms: u64, keep: usize) -> StoreResult<Vec<String>> {
        let i = self.inner.lock().unwrap();
        let mut by_time: Vec<(u64, &String)> = i.finished.iter().map(|(k, t)| (*t, k)).collect();
        by_time.sort();
        let beyond = by_time.len().saturating_sub(keep);
        Ok(by_time
            .iter()
            .enumerate()
            .filter(|(n, (t, _))| *n < beyond || *t < before_ms)
            .map(|(_, (_, id))| (*id).clone())
            .collect())
    }

    async fn finished_count(&self) -> StoreResult<u64> {
        Ok(self.inner.lock().unwrap().finished.len() as u64)
    }

    async fn delete_job(&self, id: &str) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        i.jobs.remove(id);
        i.active.remove(id);
        i.finished.remove(id);
        Ok(())
    }

    async fn set_job_state(
        &self,
        id: &str,
        state: JobState,
        step: Phase,
        error: &str,
        kind: Option<ErrorKind>,
        now_ms: u64,
        token: u64,
    ) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        let j = job(&mut i, id)?;
        fence(j, token)?;
        if j.rec.state.is_final() {
            return Ok(());
        }
        j.rec.state = state;
        j.rec.step = step;
        j.rec.error = error.into();
        j.rec.error_kind = kind;
        j.rec.updated_ms = now_ms;
        Ok(())
    }

    async fn plan_shards(
        &self,
        id: &str,
        stage: Stage,
        n: u32,
        now_ms: u64,
        token: u64,
    ) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        let j = job(&mut i, id)?;
        fence(j, token)?;
        let in_round = matches!(stage, Stage::Round(_)) && j.rec.step != stage.phase();
        if j.sets.contains_key(&stage) || j.rec.state != JobState::Running || in_round {
            return Ok(());
        }
        let set = ShardSet {
            shards: (0..n)
                .map(|s| ShardInfo {
                    shard: s,
                    state: ShardState::Pending,
                    ..Default::default()
                })
                .collect(),
            pending: (0..n).collect(),
            deadlines: BTreeMap::new(),
        };
        j.sets.insert(stage, set);
        if stage == Stage::Identify {
            j.rec.n_shards = n;
        }
        j.rec.updated_ms = now_ms;
        Ok(())
    }

    async fn lease(
        &self,
        id: &str,
        stage: Stage,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> StoreResult<Option<Lease>> {
        let mut i = self.inner.lock().unwrap();
        let j = job(&mut i, id)?;
        if j.rec.state != JobState::Running || j.rec.step != stage.phase() {
            return Ok(None);
        }
        let Some(set) = j.sets.get_mut(&stage) else {
            return Ok(None);
        };
        let Some(shard) = set.pending.pop_front() else {
            return Ok(None);
        };
        let s = &mut set.shards[shard as usize];
        s.attempt += 1;
        s.state = ShardState::Leased;
        s.owner = worker.into();
        let deadline_ms = now_ms + lease_ms;
        set.deadlines.insert(shard, deadline_ms);
        Ok(Some(Lease {
            shard,
            attempt: s.attempt,
            deadline_ms,
        }))
    }

    async fn renew(&self, a: &Attempt<'_>, now_ms: u64, lease_ms: u64) -> StoreResult<Fenced> {
        let mut i = self.inner.lock().unwrap();
        let (rec, set) = set_of(job(&mut i, a.job)?, a.stage);
        match set {
            Some(set) if rec.state == JobState::Running && fenced(set, a) => {
                set.deadlines.insert(a.shard, now_ms + lease_ms);
                Ok(Fenced::Accepted)
            }
            _ => Ok(Fenced::Stale),
        }
    }

    async fn complete(&self, a: &Attempt<'_>, output: &str, sha256: &str) -> StoreResult<Fenced> {
        let mut i = self.inner.lock().unwrap();
        let (_, set) = set_of(job(&mut i, a.job)?, a.stage);
        let Some(set) = set else {
            return Ok(Fenced::Stale);
        };
        let again = set.shards.get(a.shard as usize).is_some_and(|s| {
            s.state == ShardState::Done
                && s.owner == a.worker
                && s.attempt == a.attempt
                && s.output == output
        });
        if again {
            return Ok(Fenced::Accepted);
        }
        if !fenced(set, a) {
            return Ok(Fenced::Stale);
        }
        let s = &mut set.shards[a.shard as usize];
        s.state = ShardState::Done;
        s.output = output.into();
        s.output_sha256 = sha256.into();
        s.accepted += 1;
        set.deadlines.remove(&a.shard);
        Ok(Fenced::Accepted)
    }

    async fn fail(
        &self,
        a: &Attempt<'_>,
        failure: Failure,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome> {
        let (shard, attempt) = (a.shard, a.attempt);
        let mut i = self.inner.lock().unwrap();
        let (rec, set) = set_of(job(&mut i, a.job)?, a.stage);
        let Some(set) = set.filter(|set| fenced(set, a)) else {
            return Ok(FailOutcome::Stale);
        };
        set.deadlines.remove(&shard);
        let s = &mut set.shards[shard as usize];
        if failure == Failure::HandBack {
            s.handbacks += 1;
            s.state = ShardState::Pending;
            s.owner.clear();
            set.pending.push_back(shard);
            return Ok(FailOutcome::Requeued);
        }
        s.error = message.into();
        let tries = attempt.saturating_sub(s.handbacks);
        if failure == Failure::Retryable && tries < max_attempts {
            s.state = ShardState::Pending;
            s.owner.clear();
            set.pending.push_back(shard);
            Ok(FailOutcome::Requeued)
        } else {
            s.state = ShardState::Failed;
            let msg = format!(
                "{} failed on attempt {attempt}: {message}",
                a.stage.unit(shard)
            );
            fail_job(rec, msg, now_ms());
            Ok(FailOutcome::JobFailed)
        }
    }

    async fn reap(
        &self,
        id: &str,
        stage: Stage,
        now_ms: u64,
        max_attempts: u32,
        token: u64,
    ) -> StoreResult<Vec<Expired>> {
        let mut i = self.inner.lock().unwrap();
        let j = job(&mut i, id)?;
        fence(j, token)?;
        let (rec, set) = set_of(j, stage);
        let Some(set) = set else {
            return Ok(vec![]);
        };
        let expired: Vec<u32> = set
            .deadlines
            .iter()
            .filter(|(_, &d)| d <= now_ms)
            .map(|(&s, _)| s)
            .collect();
        let mut out = Vec::new();
        for shard in expired {
            set.deadlines.remove(&shard);
            let s = &mut set.shards[shard as usize];
            let (attempt, owner) = (s.attempt, std::mem::take(&mut s.owner));
            let requeued = attempt.saturating_sub(s.handbacks) < max_attempts;
            if requeued {
                s.state = ShardState::Pending;
                set.pending.push_back(shard);
            } else {
                s.state = ShardState::Failed;
                s.error = format!("lease expired {attempt} times (workers lost or hung)");
                let msg = format!("{} failed: {}", stage.unit(shard), s.error);
                fail_job(rec, msg, now_ms);
            }
            out.push(Expired {
                shard,
                attempt,
                owner,
                requeued,
            });
        }
        Ok(out)
    }

    async fn shards(&self, id: &str, stage: Stage) -> StoreResult<Vec<ShardInfo>> {
        let mut i = self.inner.lock().unwrap();
        Ok(job(&mut i, id)?
            .sets
            .get(&stage)
            .map(|s| s.shards.clone())
            .unwrap_or_default())
    }

    async fn put_labels(&self, id: &str, labels_json: &str) -> StoreResult<bool> {
        let mut i = self.inner.lock().unwrap();
        let j = job(&mut i, id)?;
        if j.labels.is_some() {
            return Ok(false);
        }
        j.labels = Some(labels_json.into());
        Ok(true)
    }

    async fn labels(&self, id: &str) -> StoreResult<Option<String>> {
        let i = self.inner.lock().unwrap();
        Ok(i.jobs.get(id).and_then(|j| j.labels.clone()))
    }

    async fn put_checkpoint_sha256(&self, id: &str, round: u32, sha256: &str) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        job(&mut i, id)?.checkpoints.insert(round, sha256.into());
        Ok(())
    }

    async fn checkpoint_sha256(&self, id: &str, round: u32) -> StoreResult<Option<String>> {
        let i = self.inner.lock().unwrap();
        Ok(i.jobs
            .get(id)
            .and_then(|j| j.checkpoints.get(&round).cloned()))
    }

    async fn cancel(&self, id: &str, now_ms: u64) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        let j = job(&mut i, id)?;
        if j.rec.state.is_final() {
            return Ok(());
        }
        // every set: the identify shards and the rounds'
        for set in j.sets.values_mut() {
            for s in &mut set.shards {
                if s.state == ShardState::Pending || s.state == ShardState::Leased {
                    s.state = ShardState::Cancelled;
                    s.owner.clear();
                }
            }
            set.pending.clear();
            set.deadlines.clear();
        }
        j.rec.state = JobState::Cancelled;
        j.rec.updated_ms = now_ms;
        Ok(())
    }

    async fn lead(&self, node: &str, now_ms: u64, ttl_ms: u64) -> StoreResult<Option<u64>> {
        let mut i = self.inner.lock().unwrap();
        match &mut i.leader {
            Some((n, token, until)) if n == node && *until >= now_ms => {
                *until = now_ms + ttl_ms;
                return Ok(Some(*token));
            }
            Some((_, _, until)) if *until >= now_ms => return Ok(None),
            _ => {}
        }
        i.tokens += 1;
        let token = i.tokens;
        i.leader = Some((node.into(), token, now_ms + ttl_ms));
        Ok(Some(token))
    }

    async fn claim(&self, id: &str, token: u64) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        fence(job(&mut i, id)?, token)
    }

    async fn resign(&self, node: &str) -> StoreResult<()> {
        let mut i = self.inner.lock().unwrap();
        if let Some((n, _, until)) = &mut i.leader {
            if n == node {
                *until = 0;
            }
        }
        Ok(())
    }

    async fn register_worker(&self, worker: &str, info_json: &str, now_ms: u64) -> StoreResult<()> {
        self.inner
            .lock()
            .unwrap()
            .workers
            .insert(worker.into(), (info_json.into(), now_ms));
        Ok(())
    }

    async fn touch_worker(&self, worker: &str, now_ms: u64) -> StoreResult<bool> {
        let mut i = self.inner.lock().unwrap();
        match i.workers.get_mut(worker) {
            Some(w) => {
                w.1 = now_ms;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn workers(&self) -> StoreResult<Vec<(String, String, u64)>> {
        let mut v: Vec<_> = self
            .inner
            .lock()
            .unwrap()
            .workers
            .iter()
            .map(|(k, (i, t))| (k.clone(), i.clone(), *t))
            .collect();
        v.sort();
        Ok(v)
    }
}
