//! The driver loop: the one place that moves jobs through their steps and reaps
//! expired leases. Central steps (models, finish) run on blocking threads; the loop
//! only starts them and records their outcome.
//!
//! A central step restores the job folder from its durable copy first and publishes
//! it when it ends (`folder.rs`), so it can run on any coordinator, on any disk. A
//! step that fails with a retryable error (a store unreachable) is tried again with
//! backoff, up to [`CENTRAL_TRIES`] times; a fatal one fails the job.
use std::sync::Arc;
use std::time::{Duration, Instant};

use defuse_core::config::JobConfig;
use defuse_core::identify::{Failures, IdentifyStats};
use defuse_core::pipeline::{self, RunOutcome};
use defuse_core::sources::{self, Refresh};

use tracing::Instrument;

use crate::error::StepError;
use crate::keys::{self, files};
use crate::lifecycle::{self, ErrorKind, JobState, Phase};
use crate::state::{Coordinator, Plan};
use crate::store::{now_ms, JobRecord, ShardState, Stage, StoreError};

/// Tries of a central step that fails with retryable errors before the job fails
/// (backoff 1 s doubling to 60 s: about 4 minutes in all).
pub(crate) const CENTRAL_TRIES: u32 = 8;

/// Ticks until `stop` resolves; returns after the tick under way (central steps it
/// started go on: see `serve`).
pub(crate) async fn run(c: Coordinator, stop: impl std::future::Future<Output = ()>) {
    let mut every = tokio::time::interval(Duration::from_millis(c.inner.cfg.tick_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = every.tick() => {}
        }
        if let Err(e) = tick(&c).await {
            tracing::warn!(error = %e, "driver: state store unavailable, will retry");
        }
    }
}

/// One pass of the driver: take or renew the leader lease; as the leader, move every
/// job on; as a follower, only refresh what workers may lease (any coordinator serves
/// workers and clients). Returns whether this coordinator leads.
pub(crate) async fn tick(c: &Coordinator) -> Result<bool, StoreError> {
    let fence = c
        .inner
        .store
        .lead(&c.inner.node, now_ms(), c.inner.cfg.leader_ms)
        .await?;
    let was = c
        .inner
        .leading
        .swap(fence.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
    match fence {
        Some(f) if was != f => {
            tracing::info!(node = %c.inner.node, fence = f, "leading: this coordinator drives the jobs")
        }
        None if was != 0 => {
            tracing::warn!(node = %c.inner.node, "following: another coordinator holds the leader lease")
        }
        _ => {}
    }
    crate::metrics::leader(fence.is_some());
    if fence != Some(was) {
        // not the leader, or a new leadership: what this process ran or learnt under
        // another is stopped and forgotten (the leader runs it again)
        // stopped, not awaited: the tick goes on (each ends at its next await)
        drop(stop_central_steps(c, "not the leader any more"));
        c.inner.local().known.clear();
    }
    match fence {
        Some(f) => {
            if was != f {
                claim_active_jobs(c, f).await?;
            }
            step_all(c, f).await?
        }
        None => refresh_leasable(c).await?,
    }
    Ok(fence.is_some())
}

/// Stops every central step this process runs; returns their tasks, to await.
pub(crate) fn stop_central_steps(c: &Coordinator, why: &str) -> Vec<tokio::task::JoinHandle<()>> {
    let tasks: Vec<_> = c.inner.local().in_flight.drain().collect();
    tasks
        .into_iter()
        .map(|(job, task)| {
            task.abort();
            tracing::info!(job = %job, why, "central step stopped");
            task
        })
        .collect()
}

/// A new leader raises the fence of every active job first, so a former leader that
/// wakes up cannot move any of them (not only those this one has written to).
async fn claim_active_jobs(c: &Coordinator, fence: u64) -> Result<(), StoreError> {
    for rec in c.inner.store.active_jobs().await? {
        match c.inner.store.claim(&rec.id, fence).await {
            Ok(()) | Err(StoreError::Lost(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What workers may lease until the next tick, and whether any job is unfinished.
async fn refresh_leasable(c: &Coordinator) -> Result<(), StoreError> {
    let active = c.inner.store.active_jobs().await?;
    let unfinished = crate::state::unfinished(&active);
    let now_leasable: Vec<JobRecord> = active
        .into_iter()
        .filter(crate::state::is_leasable)
        .collect();
    let mut local = c.inner.local();
    local.leasable = Some(Arc::new(now_leasable));
    local.unfinished = Some(unfinished);
    Ok(())
}

async fn step_all(c: &Coordinator, fence: u64) -> Result<(), StoreError> {
    // the active jobs only: a tick costs the same however many jobs have finished
    let jobs = c.inner.store.active_jobs().await?;
    crate::metrics::jobs(&jobs, c.inner.store.finished_count().await?);
    crate::metrics::rounds(
        jobs.iter()
            .filter(|j| !j.state.is_final() && j.step.round().is_some())
            .count(),
    );
    let workers = c.inner.store.workers().await?;
    let now = now_ms();
    let ages: Vec<(String, f64)> = workers
        .iter()
        .map(|(w, _, t)| (w.clone(), now.saturating_sub(*t) as f64 / 1000.0))
        .collect();
    crate::metrics::workers(workers.len(), &ages);
    // a job this process has seen active that the store no longer has: its state was
    // lost (one retired or deleted by another leader is simply forgotten)
    let listed: std::collections::HashSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let known: Vec<String> = c.inner.local().known.iter().cloned().collect();
    for id in known.into_iter().filter(|id| !listed.contains(id)) {
        match c.inner.store.get_job(&id).await? {
            None => lost(c, &id).await,
            Some(_) => {
                c.inner.local().known.remove(&id);
            }
        }
    }
    for rec in jobs {
        if rec.state.is_final() {
            // retired: out of the active set, into the finished index
            c.inner.store.retire(&rec.id, Some(rec.updated_ms)).await?;
            c.inner.local().known.remove(&rec.id);
            // a central step of a job cancelled meanwhile stops here (its blocking
            // part, if one runs, ends with the pipeline step under way)
            if let Some(task) = c.inner.local().in_flight.remove(&rec.id) {
                task.abort();
                tracing::info!(job = %rec.id, state = rec.state.as_str(), "central step stopped");
            }
            crate::metrics::finished(rec.state.as_str());
            continue;
        }
        c.inner.local().known.insert(rec.id.clone());
        match step_job(c, &rec, fence).await {
            Ok(()) => {}
            Err(StoreError::Lost(id)) => lost(c, &id).await,
            Err(e) => return Err(e),
        }
    }
    retention(c).await?;
    // the steps above may have changed what workers may lease
    refresh_leasable(c).await
}

/// Deletes the finished jobs past the retention (`keep_jobs`, `keep_ms`), a few per
/// tick.
async fn retention(c: &Coordinator) -> Result<(), StoreError> {
    let cfg = &c.inner.cfg;
    let expired = c
        .inner
        .store
        .expired_jobs(now_ms().saturating_sub(cfg.keep_ms), cfg.keep_jobs)
        .await?;
    // a few per tick: a tick must stay well inside the leader lease
    for id in expired.iter().take(2) {
        let Some(rec) = c.inner.store.get_job(id).await? else {
            // a delete that stopped half way: finish it
            c.inner.store.delete_job(id).await?;
            continue;
        };
        match delete_job(c, &rec).await {
            Ok(n) => tracing::info!(job = %id, objects = n, "finished job deleted (retention)"),
            Err(e) => tracing::warn!(job = %id, error = %e, "cannot delete a finished job yet"),
        }
    }
    Ok(())
}

/// Everything of a finished job: its artifacts, its cached folder, and last its state
/// (every shard set with it) (so a failed try is tried again). Returns the number of
/// objects removed.
pub(crate) async fn delete_job(c: &Coordinator, rec: &JobRecord) -> Result<u32, StepError> {
    let a = &c.inner.artifacts;
    let mut n = 0;
    for key in a.list(&keys::job_prefix(&rec.id)).await? {
        a.delete(&key).await?;
        n += 1;
    }
    if !c.inner.cfg.use_job_out {
        let dir = c.inner.cfg.work_dir.join(&rec.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(StepError::Retryable(format!("{}: {e}", dir.display())));
            }
        }
    }
    c.inner.store.delete_job(&rec.id).await?;
    c.forget(&rec.id);
    Ok(n)
}

/// The store lost a job's state: say so loudly and record the job as failed.
async fn lost(c: &Coordinator, id: &str) {
    let msg = format!("job {id}: its state is gone from the state store (Redis restarted without persistence, or flushed); the job cannot go on: submit it again");
    tracing::error!(job = %id, "{msg}");
    c.inner.local().known.remove(id);
    let now = now_ms();
    let rec = JobRecord {
        id: id.into(),
        name: id.into(),
        state: JobState::Failed,
        step: Phase::Lost,
        config_toml: String::new(),
        n_shards: 0,
        error: msg,
        error_kind: Some(ErrorKind::Runtime),
        created_ms: now,
        updated_ms: now,
        trace_parent: String::new(),
    };
    if let Err(e) = c.inner.store.create_job(&rec).await {
        tracing::error!(job = %id, error = %e, "cannot record the lost job as failed");
    }
}

async fn step_job(c: &Coordinator, rec: &JobRecord, fence: u64) -> Result<(), StoreError> {
    let store = &c.inner.store;
    match (rec.state, rec.step) {
        (JobState::Queued, _) => {
            move_job(
                c,
                fence,
                &rec.id,
                (rec.state, rec.step),
                (JobState::Running, Phase::Models),
                "",
            )
            .await?;
            spawn_central(c, rec, Central::Prepare, fence);
        }
        (JobState::Running, Phase::Models) => spawn_central(c, rec, Central::Prepare, fence),
        (JobState::Running, Phase::Identify) => {
            for e in store
                .reap(
                    &rec.id,
                    Stage::Identify,
                    now_ms(),
                    c.inner.cfg.max_attempts,
                    fence,
                )
                .await?
            {
                tracing::warn!(job = %rec.id, shard = e.shard, attempt = e.attempt, worker = %e.owner, requeued = e.requeued, "lease expired");
                crate::metrics::lease_expired(&rec.id, e.requeued);
            }
            let n = store.counts(&rec.id, Stage::Identify).await?;
            crate::metrics::shards(&rec.id, &n);
            if n.total > 0 && n.done == n.total {
                move_job(
                    c,
                    fence,
                    &rec.id,
                    (rec.state, rec.step),
                    (JobState::Running, Phase::Finish),
                    "",
                )
                .await?;
                spawn_central(c, rec, Central::Finish, fence);
            }
        }
        (JobState::Running, Phase::Finish) => spawn_central(c, rec, Central::Finish, fence),
        (JobState::Running, Phase::FineTune(round)) => {
            match crate::rounds::tick(c, rec, round, fence).await? {
                crate::rounds::RoundState::Running => {}
                crate::rounds::RoundState::Complete => {
                    spawn_central(c, rec, Central::Average(round), fence)
                }
            }
        }
        (JobState::AwaitingLabels, _) => resume_when_labelled(c, rec, fence).await?,
        _ => {}
    }
    Ok(())
}

/// A job waiting for labels goes on once the state store has them.
async fn resume_when_labelled(
    c: &Coordinator,
    rec: &JobRecord,
    fence: u64,
) -> Result<(), StoreError> {
    if c.inner.store.labels(&rec.id).await?.is_none() {
        return Ok(());
    }
    let to = (JobState::Running, Phase::Finish);
    move_job(c, fence, &rec.id, (rec.state, rec.step), to, "").await?;
    spawn_central(c, rec, Central::Finish, fence);
    Ok(())
}

/// Moves a job from `from` to `to` in the state store, if the move is legal
/// ([`lifecycle::legal`]); an illegal move is a bug: logged loudly and not made.
pub(crate) async fn move_job(
    c: &Coordinator,
    fence: u64,
    id: &str,
    from: (JobState, Phase),
    to: (JobState, Phase),
    error: &str,
) -> Result<(), StoreError> {
    if !lifecycle::legal(from, to) {
        tracing::error!(job = %id, from = ?from, to = ?to, "illegal job transition refused (a bug)");
        return Ok(());
    }
    c.inner
        .store
        .set_job_state(id, to.0, to.1, error, None, now_ms(), fence)
        .await
}

/// Fails a job in `phase` with `error`, recording its kind.
pub(crate) async fn fail_job(
    c: &Coordinator,
    fence: u64,
    id: &str,
    from: (JobState, Phase),
    phase: Phase,
    kind: ErrorKind,
    error: &str,
) -> Result<(), StoreError> {
    if !lifecycle::legal(from, (JobState::Failed, phase)) {
        tracing::error!(job = %id, from = ?from, to = ?phase, "illegal job transition refused (a bug)");
        return Ok(());
    }
    c.inner
        .store
        .set_job_state(
            id,
            JobState::Failed,
            phase,
            error,
            Some(kind),
            now_ms(),
            fence,
        )
        .await
}

#[derive(Debug, Clone, Copy)]
enum Central {
    Prepare,
    Finish,
    Average(usize),
}

impl Central {
    /// The phase a job is in while this step runs.
    fn phase(self) -> Phase {
        match self {
            Central::Prepare => Phase::Models,
            Central::Finish => Phase::Finish,
            Central::Average(r) => Phase::FineTune(r),
        }
    }
}

/// Starts a central step unless one runs for this job already (or a retry of it
/// waits for its backoff).
fn spawn_central(c: &Coordinator, rec: &JobRecord, what: Central, fence: u64) {
    // the lock is held until the handle is in: the task's own removal waits for it
    let mut local = c.inner.local();
    let waiting = local
        .retries
        .get(&rec.id)
        .is_some_and(|(_, not_before)| Instant::now() < *not_before);
    if waiting || local.in_flight.contains_key(&rec.id) {
        return;
    }
    let (c2, rec, key) = (c.clone(), rec.clone(), rec.id.clone());
    let span = tracing::info_span!("central", job = %rec.id, step = ?what, trace_id = tracing::field::Empty);
    if let Some(tp) = defuse_proto::trace::TraceParent::parse(&rec.trace_parent) {
        defuse_proto::trace::adopt(&span, &tp);
    }
    let task = tokio::spawn(async move {
        let c = c2;
        let id = rec.id.clone();
        let started = Instant::now();
        let r = match what {
            Central::Prepare => prepare(&c, &rec).await,
            Central::Finish => finish(&c, &rec).await,
            Central::Average(round) => crate::rounds::average(&c, &rec, round)
                .await
                .map(Next::Go),
        };
        if r.is_ok() {
            c.inner.local().retries.remove(&id);
        }
        let from = (JobState::Running, what.phase());
        let result = match r {
            Ok(Next::Identify(n)) => match c.inner.store.plan_shards(&id, Stage::Identify, n, now_ms(), fence).await {
                Ok(()) => move_job(&c, fence, &id, from, (JobState::Running, Phase::Identify), "").await,
                Err(e) => Err(e),
            },
            Ok(Next::Go(phase)) => move_job(&c, fence, &id, from, (JobState::Running, phase), "").await,
            Ok(Next::Done) => move_job(&c, fence, &id, from, (JobState::Done, Phase::Finish), "").await,
            Ok(Next::AwaitLabels) => {
                move_job(&c, fence, &id, from, (JobState::AwaitingLabels, Phase::Finish), "").await
            }
            Err(StepError::Retryable(msg)) if retry_later(&c, &id) => {
                // every central step is idempotent: it is tried again after a backoff
                tracing::warn!(job = %id, step = ?what, error = %msg, "central step failed, will retry");
                Ok(())
            }
            Err(e) => {
                c.inner.local().retries.remove(&id);
                let msg = e.to_string();
                tracing::error!(job = %id, step = ?what, error = %msg, "central step failed");
                fail_job(&c, fence, &id, from, what.phase(), e.kind(), &msg).await
            }
        };
        match result {
            Ok(()) => {}
            Err(e @ StoreError::Fenced(_)) => {
                tracing::warn!(job = %id, error = %e, "outcome of a central step dropped: no longer the leader")
            }
            Err(e) => {
                tracing::error!(job = %id, error = %e, "cannot record the outcome of a central step")
            }
        }
        tracing::info!(job = %id, step = ?what, seconds = started.elapsed().as_secs_f64(), "central step ended");
        // only this task's own entry: a newer step of the job (another leadership) keeps its
        let me = tokio::task::id();
        let mut local = c.inner.local();
        if local.in_flight.get(&id).is_some_and(|t| t.id() == me) {
            local.in_flight.remove(&id);
        }
    }.instrument(span));
    local.in_flight.insert(key, task);
}

/// Schedules another try of a job's central step after a retryable error; false
/// when the tries are used up.
fn retry_later(c: &Coordinator, job: &str) -> bool {
    let mut local = c.inner.local();
    let e = local
        .retries
        .entry(job.to_string())
        .or_insert((0, Instant::now()));
    e.0 += 1;
    let wait = Duration::from_secs((1u64 << (e.0 - 1).min(6)).min(60));
    e.1 = Instant::now() + wait;
    e.0 < CENTRAL_TRIES
}

/// What a central step leads to.
enum Next {
    /// Identify, with this many shards.
    Identify(u32),
    /// Running, in this phase.
    Go(Phase),
    Done,
    AwaitLabels,
}

fn job_config(c: &Coordinator, rec: &JobRecord) -> Result<JobConfig, StepError> {
    let mut cfg: JobConfig = toml::from_str(&rec.config_toml)
        .map_err(|e| StepError::fatal(format!("job config: {e}")))?;
    cfg.out = Some(c.job_dir(rec, &cfg));
    Ok(cfg)
}

/// Replaces the `upload://` inputs of `cfg` (files `defuse submit` uploaded with the
/// job) by their copies in the job folder, fetching and checking those it lacks.
async fn localise_uploads(
    c: &Coordinator,
    rec: &JobRecord,
    cfg: &mut JobConfig,
    dir: &std::path::Path,
) -> Result<(), StepError> {
    for (field, p) in sources::input_fields(cfg) {
        let Some(path) = p.as_deref() else { continue };
        let Some(u) = sources::Upload::parse(field, path).map_err(StepError::fatal)? else {
            continue;
        };
        let local = dir.join(u.local_file(field));
        if !local.is_file() {
            defuse_core::artifacts::get_file_checked(
                c.inner.artifacts.as_ref(),
                &keys::upload(&rec.id, &u),
                &local,
                &u.sha256,
            )
            .await
            .map_err(|e| StepError::from(e).context(format!("{field} = {}", u.url())))?;
        }
        *p = Some(local);
    }
    Ok(())
}

/// Runs `f` on a blocking thread in the current span; its errors are fatal (the
/// pipeline's: bad data, bad models).
async fn blocking<T: Send + 'static, E: Into<StepError> + Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, StepError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _in = span.enter();
        defuse_core::threads::enter_central();
        f()
    })
    .await
    .map_err(|e| StepError::fatal(format!("{what} panicked: {e}")))?
    .map_err(Into::into)
}

/// Models step: load or train the models, publish them and the shard plan.
async fn prepare(c: &Coordinator, rec: &JobRecord) -> Result<Next, StepError> {
    let cfg = job_config(c, rec)?;
    let dir = c.job_dir(rec, &cfg);
    crate::folder::restore_job(c, rec, &dir).await?;
    // the paths again, now that the job reads them (one created, or swapped for a
    // link, since submit), and every file of the data folder as its manifest is taken
    let roots = c.inner.cfg.allowed_roots.clone();
    if let Some(roots) = &roots {
        crate::paths::check_job(&cfg, roots).map_err(|e| StepError::fatal(e.to_string()))?;
    }
    let mut cfg = cfg;
    localise_uploads(c, rec, &mut cfg, &dir).await?;
    let dir_for_inputs = dir.clone();
    let (model_files, ranges, done, manifest) =
        blocking("models step", move || -> Result<_, StepError> {
            // models and labels in buckets: copied into the job folder, read from there
            let mut cfg = cfg;
            sources::localise_inputs(&mut cfg, &dir_for_inputs, Refresh::Always)?;
            // what workers must see at data.path, recorded with the plan; taken before
            // anything reads the data
            let allowed = |real: &std::path::Path| {
                roots.as_ref().is_none_or(|r| crate::paths::within(real, r))
            };
            let mut manifest =
                defuse_core::data::manifest::DataManifest::of_within(&cfg.data.path, &allowed)?;
            let p = pipeline::prepare(&cfg)?;
            // the files of each shard: what lets a worker read its shard alone
            manifest.layout = p.data_layout();
            Ok((
                p.model_files(),
                p.shard_ranges(),
                p.identify_done(),
                manifest,
            ))
        })
        .await?;
    if ranges.len() > defuse_core::limits::MAX_SHARDS {
        return Err(StepError::fatal(format!(
            "identify would plan {} shards, above the limit of {}: raise identify.shard_size",
            ranges.len(),
            defuse_core::limits::MAX_SHARDS
        )));
    }
    // the trained models (and their done.json) outlive this coordinator
    crate::folder::publish_job(c, rec, &dir).await?;
    if done {
        tracing::info!(job = %rec.id, "identify already done in the job folder: going on to finish");
        return Ok(Next::Go(Phase::Finish));
    }
    let a = &c.inner.artifacts;
    let upload = |path: std::path::PathBuf, name: &'static str| {
        let key = keys::model(&rec.id, &name_with_ext(&path, name));
        async move { a.put_file(&key, &path).await.map(|()| key) }
    };
    let (clf, vae, dec) = model_files;
    let manifest_json = serde_json::to_vec(&manifest).expect("a manifest serialises");
    a.put(&keys::data_manifest(&rec.id), manifest_json.into())
        .await?;
    let plan = Plan {
        data_digest: manifest.digest(),
        classifier_key: upload(clf, "classifier").await?,
        vae_key: upload(vae, "vae").await?,
        vae_decoder_key: match dec {
            Some(d) => upload(d, "vae_decoder").await?,
            None => String::new(),
        },
        ranges: ranges
            .iter()
            .map(|r| (r.start as u64, r.end as u64))
            .collect(),
        planned_ms: now_ms(),
    };
    let json = serde_json::to_vec_pretty(&plan).expect("plan serialises");
    a.put(&keys::plan(&rec.id), json.into()).await?;
    let n = plan.ranges.len() as u32;
    c.inner.local().plans.insert(rec.id.clone(), Arc::new(plan));
    tracing::info!(job = %rec.id, shards = n, "identify planned");
    if n == 0 {
        return Err(StepError::fatal(
            "identify has no images to search (empty split or limit)",
        ));
    }
    Ok(Next::Identify(n))
}

fn name_with_ext(path: &std::path::Path, name: &str) -> String {
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{name}.{ext}"),
        None => name.to_string(),
    }
}

/// Central steps after identify: gather the accepted shard outputs, then distill,
/// label, correct and report; publish the report.
async fn finish(c: &Coordinator, rec: &JobRecord) -> Result<Next, StepError> {
    let cfg = job_config(c, rec)?;
    let dir = c.job_dir(rec, &cfg);
    crate::folder::restore_job(c, rec, &dir).await?;
    // labels a person gave are in the state store (final); the pipeline reads them
    // from the folder
    if let Some(labels) = c.inner.store.labels(&rec.id).await? {
        let path = dir.join(files::LABELS);
        let tmp = dir.join(format!("{}.tmp", files::LABELS));
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&tmp, labels))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| StepError::fatal(format!("{}: {e}", path.display())))?;
    }
    // the accepted outputs, in shard order (a job that resumed from its folder has none)
    let shards = c.inner.store.shards(&rec.id, Stage::Identify).await?;
    let mut local = Vec::new();
    for s in &shards {
        if s.state != ShardState::Done {
            return Err(StepError::fatal(format!(
                "shard {} is {} at finish",
                s.shard, s.state
            )));
        }
        let path = dir.join(format!(
            "identify/accepted/shard-{:05}.safetensors",
            s.shard
        ));
        // what was accepted, or a clear failure: an output replaced in the store
        // after acceptance must not reach the report
        defuse_core::artifacts::get_file_checked(
            c.inner.artifacts.as_ref(),
            &s.output,
            &path,
            &s.output_sha256,
        )
        .await
        .map_err(|e| StepError::from(e).context(format!("shard {} output", s.shard)))?;
        local.push(path);
    }
    let id = rec.id.clone();
    let planned_ms = c.plan(rec).await.map(|p| p.planned_ms).unwrap_or(0);
    let identify_seconds = now_ms().saturating_sub(planned_ms) as f64 / 1000.0;
    // the job's config, models and labels are its input; the shard outputs are ours
    let mut cfg = cfg;
    localise_uploads(c, rec, &mut cfg, &dir).await?;
    let dir_for_inputs = dir.clone();
    let outcome = blocking("finish", move || -> Result<RunOutcome, StepError> {
        let mut cfg = cfg;
        sources::localise_inputs(&mut cfg, &dir_for_inputs, Refresh::IfMissing)?;
        let mut p = pipeline::prepare(&cfg)?;
        p.distributed_correct = true;
        if !local.is_empty() && !p.identify_done() {
            let mut parts = Vec::new();
            let mut total = IdentifyStats::default();
            for path in &local {
                let (f, s) = Failures::read(path).map_err(StepError::fatal)?;
                total.absorb(&s);
                parts.push(f);
            }
            let failures = Failures::concat(parts, p.vae.latent());
            p.record_identify(&failures, &total, identify_seconds)
                .map_err(StepError::fatal)?;
        }
        Ok(pipeline::finish(&mut p)?)
    })
    .await?;
    crate::folder::publish_job(c, rec, &dir).await?;
    match outcome {
        RunOutcome::AwaitingLabels { scenarios } => {
            tracing::info!(job = %id, scenarios, "waiting for labels");
            Ok(Next::AwaitLabels)
        }
        RunOutcome::FineTune(input) => {
            crate::rounds::start(c, &id, &input).await?;
            Ok(Next::Go(Phase::FineTune(0)))
        }
        RunOutcome::Finished(s) => {
            let a = &c.inner.artifacts;
            for file in [files::SUMMARY, files::REPORT] {
                a.put_file(&keys::result(&id, file), &dir.join(file))
                    .await?;
            }
            let name = s
                .model
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            a.put_file(&keys::final_model(&id, &name), &s.model).await?;
            tracing::info!(job = %id, failures = s.n_failures, scenarios = s.n_scenarios, "job done");
            Ok(Next::Done)
        }
    }
}
