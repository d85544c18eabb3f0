//! The driver loop: the one place that moves jobs through their steps and reaps
//! expired leases. Central steps (models, finish) run on blocking threads; the loop
//! only starts them and records their outcome.
use std::sync::Arc;
use std::time::{Duration, Instant};

use defuse_core::identify::{Failures, IdentifyStats};
use defuse_core::pipeline::{self, JobConfig, RunOutcome};

use tracing::Instrument;

use crate::service::{Coordinator, Plan};
use crate::store::{now_ms, JobRecord, JobState, StoreError};

pub(crate) async fn run(c: Coordinator) {
    let mut tick = tokio::time::interval(Duration::from_millis(c.inner.cfg.tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = step_all(&c).await {
            tracing::warn!(error = %e, "driver: state store unavailable, will retry");
        }
    }
}

async fn step_all(c: &Coordinator) -> Result<(), StoreError> {
    let jobs = c.inner.store.list_jobs().await?;
    let (rounds, top): (Vec<&JobRecord>, Vec<&JobRecord>) = jobs
        .iter()
        .partition(|j| crate::rounds::parse_sub_job(&j.id).is_some());
    crate::metrics::jobs(&top.into_iter().cloned().collect::<Vec<_>>());
    crate::metrics::rounds(rounds.len());
    let workers = c.inner.store.workers().await?;
    let now = now_ms();
    let ages: Vec<(String, f64)> = workers
        .iter()
        .map(|(w, _, t)| (w.clone(), now.saturating_sub(*t) as f64 / 1000.0))
        .collect();
    crate::metrics::workers(workers.len(), &ages);
    // a job this process has seen that the store no longer has: its state was lost
    let listed: std::collections::HashSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let known: Vec<String> = c.inner.known.lock().unwrap().iter().cloned().collect();
    for id in known.into_iter().filter(|id| !listed.contains(id)) {
        lost(c, &id).await;
    }
    for rec in jobs {
        c.inner.known.lock().unwrap().insert(rec.id.clone());
        if rec.state.is_final() {
            continue;
        }
        match step_job(c, &rec).await {
            Ok(()) => {}
            Err(StoreError::Lost(id)) => lost(c, &id).await,
            Err(e) => return Err(e),
        }
    }
    // what workers may lease until the next tick (the steps above may have changed it)
    let now_leasable: Vec<JobRecord> = c
        .inner
        .store
        .list_jobs()
        .await?
        .into_iter()
        .filter(crate::service::is_leasable)
        .collect();
    *c.inner.leasable.lock().unwrap() = Some(Arc::new(now_leasable));
    Ok(())
}

/// The store lost a job's state: say so loudly and record the job as failed.
async fn lost(c: &Coordinator, id: &str) {
    let msg = format!("job {id}: its state is gone from the state store (Redis restarted without persistence, or flushed); the job cannot go on: submit it again");
    tracing::error!(job = %id, "{msg}");
    c.inner.known.lock().unwrap().remove(id);
    let now = now_ms();
    let rec = JobRecord {
        id: id.into(),
        name: id.into(),
        state: JobState::Failed,
        step: "lost".into(),
        config_toml: String::new(),
        n_shards: 0,
        error: msg,
        created_ms: now,
        updated_ms: now,
    };
    if let Err(e) = c.inner.store.create_job(&rec).await {
        tracing::error!(job = %id, error = %e, "cannot record the lost job as failed");
    }
}

async fn step_job(c: &Coordinator, rec: &JobRecord) -> Result<(), StoreError> {
    let store = &c.inner.store;
    match (rec.state, rec.step.as_str()) {
        (JobState::Queued, _) => {
            store
                .set_job_state(&rec.id, JobState::Running, "models", "", now_ms())
                .await?;
            spawn_central(c, rec, Central::Prepare);
        }
        (JobState::Running, "models") => spawn_central(c, rec, Central::Prepare),
        (JobState::Running, "identify") => {
            for e in store
                .reap(&rec.id, now_ms(), c.inner.cfg.max_attempts)
                .await?
            {
                tracing::warn!(job = %rec.id, shard = e.shard, attempt = e.attempt, worker = %e.owner, requeued = e.requeued, "lease expired");
                crate::metrics::lease_expired(&rec.id, e.requeued);
            }
            let n = store.counts(&rec.id).await?;
            crate::metrics::shards(&rec.id, &n);
            if n.total > 0 && n.done == n.total {
                store
                    .set_job_state(&rec.id, JobState::Running, "finish", "", now_ms())
                    .await?;
                spawn_central(c, rec, Central::Finish);
            }
        }
        (JobState::Running, "finish") => spawn_central(c, rec, Central::Finish),
        (JobState::Running, step) if step.starts_with("finetune:") => {
            let Some(round) = crate::rounds::round_of_step(step) else {
                return Ok(());
            };
            match crate::rounds::tick(c, rec, round).await? {
                crate::rounds::RoundState::Running => {}
                crate::rounds::RoundState::Complete => {
                    spawn_central(c, rec, Central::Average(round))
                }
                crate::rounds::RoundState::Broken(msg) => {
                    tracing::error!(job = %rec.id, round, error = %msg, "fine-tune round failed");
                    store
                        .set_job_state(
                            &rec.id,
                            JobState::Failed,
                            step,
                            &format!("fine-tune round {round}: {msg}"),
                            now_ms(),
                        )
                        .await?;
                }
            }
        }
        (JobState::AwaitingLabels, _) => {
            let Ok(cfg) = toml::from_str::<JobConfig>(&rec.config_toml) else {
                return Ok(());
            };
            if c.job_dir(rec, &cfg).join("labels.json").exists() {
                store
                    .set_job_state(&rec.id, JobState::Running, "finish", "", now_ms())
                    .await?;
                spawn_central(c, rec, Central::Finish);
            }
        }
        _ => {}
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Central {
    Prepare,
    Finish,
    Average(usize),
}

/// Starts a central step unless one runs for this job already.
fn spawn_central(c: &Coordinator, rec: &JobRecord, what: Central) {
    if !c.inner.in_flight.lock().unwrap().insert(rec.id.clone()) {
        return;
    }
    let (c, rec) = (c.clone(), rec.clone());
    let span = tracing::info_span!("central", job = %rec.id, step = ?what);
    tokio::spawn(async move {
        let id = rec.id.clone();
        let started = Instant::now();
        let r = match what {
            Central::Prepare => prepare(&c, &rec).await,
            Central::Finish => finish(&c, &rec).await,
            Central::Average(round) => crate::rounds::average(&c, &rec, round)
                .await
                .map(Next::Step),
        };
        let now = now_ms();
        let store = &c.inner.store;
        let result = match r {
            Ok(Next::Identify(n)) => match store.plan_shards(&id, n, now).await {
                Ok(()) => {
                    store
                        .set_job_state(&id, JobState::Running, "identify", "", now)
                        .await
                }
                Err(e) => Err(e),
            },
            Ok(Next::Finish) => {
                store
                    .set_job_state(&id, JobState::Running, "finish", "", now)
                    .await
            }
            Ok(Next::Step(step)) => {
                c.inner.merge_failures.lock().unwrap().remove(&id);
                store
                    .set_job_state(&id, JobState::Running, &step, "", now)
                    .await
            }
            Ok(Next::Done) => {
                store
                    .set_job_state(&id, JobState::Done, "finish", "", now)
                    .await
            }
            Ok(Next::AwaitLabels) => {
                store
                    .set_job_state(&id, JobState::AwaitingLabels, "finish", "", now)
                    .await
            }
            Err(msg) if matches!(what, Central::Average(_)) && retry_average(&c, &id) => {
                // merging is idempotent: a store that failed once is tried again
                tracing::warn!(job = %id, step = ?what, error = %msg, "merging a round failed, will retry");
                Ok(())
            }
            Err(msg) => {
                c.inner.merge_failures.lock().unwrap().remove(&id);
                tracing::error!(job = %id, step = ?what, error = %msg, "central step failed");
                store
                    .set_job_state(&id, JobState::Failed, &rec.step, &msg, now)
                    .await
            }
        };
        if let Err(e) = result {
            tracing::error!(job = %id, error = %e, "cannot record the outcome of a central step");
        }
        tracing::info!(job = %id, step = ?what, seconds = started.elapsed().as_secs_f64(), "central step ended");
        c.inner.in_flight.lock().unwrap().remove(&id);
    }.instrument(span));
}

/// Up to 5 tries to merge a job's round before the job fails.
fn retry_average(c: &Coordinator, job: &str) -> bool {
    let mut m = c.inner.merge_failures.lock().unwrap();
    let n = m.entry(job.to_string()).or_default();
    *n += 1;
    *n < 5
}

enum Next {
    Identify(u32),
    Finish,
    /// Go on at this step (the fine-tune rounds).
    Step(String),
    Done,
    AwaitLabels,
}

fn job_config(c: &Coordinator, rec: &JobRecord) -> Result<JobConfig, String> {
    let mut cfg: JobConfig =
        toml::from_str(&rec.config_toml).map_err(|e| format!("job config: {e}"))?;
    cfg.out = Some(c.job_dir(rec, &cfg));
    Ok(cfg)
}

/// Models step: load or train the models, publish them and the shard plan.
async fn prepare(c: &Coordinator, rec: &JobRecord) -> Result<Next, String> {
    let cfg = job_config(c, rec)?;
    let span = tracing::Span::current();
    let (files, ranges, done) = tokio::task::spawn_blocking(move || {
        let _in = span.enter();
        let p = pipeline::prepare(&cfg).map_err(|e| e.to_string())?;
        Ok::<_, String>((p.model_files(), p.shard_ranges(), p.identify_done()))
    })
    .await
    .map_err(|e| format!("models step panicked: {e}"))??;
    if done {
        tracing::info!(job = %rec.id, "identify already done in the job folder: going on to finish");
        return Ok(Next::Finish);
    }
    let a = &c.inner.artifacts;
    let upload = |path: std::path::PathBuf, name: &'static str| {
        let key = format!("jobs/{}/models/{}", rec.id, name_with_ext(&path, name));
        async move {
            a.put_file(&key, &path)
                .await
                .map(|()| key)
                .map_err(|e| e.to_string())
        }
    };
    let (clf, vae, dec) = files;
    let plan = Plan {
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
    a.put(&format!("jobs/{}/plan.json", rec.id), json.into())
        .await
        .map_err(|e| e.to_string())?;
    let n = plan.ranges.len() as u32;
    c.inner
        .plans
        .lock()
        .unwrap()
        .insert(rec.id.clone(), Arc::new(plan));
    tracing::info!(job = %rec.id, shards = n, "identify planned");
    if n == 0 {
        return Err("identify has no images to search (empty split or limit)".into());
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
async fn finish(c: &Coordinator, rec: &JobRecord) -> Result<Next, String> {
    let cfg = job_config(c, rec)?;
    let dir = c.job_dir(rec, &cfg);
    // the accepted outputs, in shard order (a job that resumed from its folder has none)
    let shards = c
        .inner
        .store
        .shards(&rec.id)
        .await
        .map_err(|e| e.to_string())?;
    let mut local = Vec::new();
    for s in &shards {
        if s.state != "done" {
            return Err(format!("shard {} is {} at finish", s.shard, s.state));
        }
        let path = dir.join(format!(
            "identify/accepted/shard-{:05}.safetensors",
            s.shard
        ));
        c.inner
            .artifacts
            .get_file(&s.output, &path)
            .await
            .map_err(|e| format!("shard {} output: {e}", s.shard))?;
        local.push(path);
    }
    let id = rec.id.clone();
    let planned_ms = c.plan(&rec.id).await.map(|p| p.planned_ms).unwrap_or(0);
    let identify_seconds = now_ms().saturating_sub(planned_ms) as f64 / 1000.0;
    let span = tracing::Span::current();
    let outcome = tokio::task::spawn_blocking(move || -> Result<RunOutcome, String> {
        let _in = span.enter();
        let mut p = pipeline::prepare(&cfg).map_err(|e| e.to_string())?;
        p.distributed_correct = true;
        if !local.is_empty() && !p.identify_done() {
            let mut parts = Vec::new();
            let mut total = IdentifyStats::default();
            for path in &local {
                let (f, s) = Failures::read(path).map_err(|e| e.to_string())?;
                total.absorb(&s);
                parts.push(f);
            }
            let failures = Failures::concat(parts, p.vae.latent());
            p.record_identify(&failures, &total, identify_seconds)
                .map_err(|e| e.to_string())?;
        }
        pipeline::finish(&mut p).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("finish panicked: {e}"))??;
    match outcome {
        RunOutcome::AwaitingLabels { scenarios } => {
            tracing::info!(job = %id, scenarios, "waiting for labels");
            Ok(Next::AwaitLabels)
        }
        RunOutcome::FineTune(input) => {
            crate::rounds::start(c, &id, &input).await?;
            Ok(Next::Step("finetune:0".into()))
        }
        RunOutcome::Finished(s) => {
            let a = &c.inner.artifacts;
            for (key, file) in [
                ("report/summary.json", "report/summary.json"),
                ("report/index.html", "report/index.html"),
            ] {
                a.put_file(&format!("jobs/{id}/{key}"), &dir.join(file))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            a.put_file(
                &format!(
                    "jobs/{id}/model/{}",
                    s.model
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
                &s.model,
            )
            .await
            .map_err(|e| e.to_string())?;
            tracing::info!(job = %id, failures = s.n_failures, scenarios = s.n_scenarios, "job done");
            Ok(Next::Done)
        }
    }
}
