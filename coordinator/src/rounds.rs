//! The distributed fine-tune (`correct.parts > 1`): synchronous rounds over the
//! workers, driven by the coordinator.
//!
//! Round `r`'s parts are a shard set of the job ([`Stage::Round`]), planned when the
//! job enters `finetune:r`: the same lease / heartbeat / fence / reap machinery as
//! identify, so a worker lost mid-round loses its lease and another worker trains its
//! part again (the round waits; nothing is averaged from a dead attempt). A part that
//! fails for good fails the job, and cancelling the job ends the round's parts. When
//! every part is done, the
//! coordinator merges the parts (`correct.merge`: the sum of their updates, or the mean
//! of their weights, weighted by the rows each saw) into checkpoint
//! `r + 1`: it writes the object first, then moves the job's step to `finetune:<r+1>`
//! (the round lives in the job record, in the state store), so a crash in between
//! only repeats the average, which gives the same bytes. A restarted coordinator reads
//! the step and the round's set and goes on. Results of an older round cannot be
//! accepted: its parts are done, and they fence every completion.
//!
//! The exchange is the artifact store (checkpoints in, checkpoints out). A multi-GPU
//! backend (NCCL all-reduce inside a node) would be a second [`Exchange`]: see DESIGN.md.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use defuse_core::correct;
use defuse_core::models::Classifier;
use defuse_core::pipeline::{RoundsDone, RoundsInput};

use crate::error::StepError;
use crate::keys::{self, files};
use crate::lifecycle::Phase;
use crate::state::{Coordinator, RoundsPlan};
use crate::store::{now_ms, JobRecord, ShardState, Stage, StoreError};

/// Publishes round 0 (the classifier, the scenario-train samples, the plan).
pub(crate) async fn start(
    c: &Coordinator,
    job: &str,
    input: &RoundsInput,
) -> Result<(), StepError> {
    let a = &c.inner.artifacts;
    let scenario_key = keys::scenario_train(job);
    a.put_file(&scenario_key, &input.scenario_train).await?;
    a.put_file(
        &keys::checkpoint(job, 0, &input.extension),
        &input.classifier,
    )
    .await?;
    let sha = defuse_core::artifacts::sha256_file(&input.classifier)
        .map_err(|e| StepError::fatal(format!("{}: {e}", input.classifier.display())))?;
    c.inner.store.put_checkpoint_sha256(job, 0, &sha).await?;
    // the parts read the training split: the data identify was planned with
    // (none when identify ran in the job folder before it was published: nothing to
    // check against; a store error is retried, not taken for "no digest")
    let data_digest = match a.get(&keys::plan(job)).await {
        Ok(b) => serde_json::from_slice::<crate::state::Plan>(&b)
            .map(|p| p.data_digest)
            .map_err(|e| StepError::fatal(format!("identify plan of {job}: {e}")))?,
        Err(defuse_core::artifacts::ArtifactError::NotFound { .. }) => String::new(),
        Err(e) => return Err(e.into()),
    };
    let plan = RoundsPlan {
        data_digest,
        rounds: input.rounds,
        parts: input.parts,
        extension: input.extension.clone(),
        scenario_key,
        n_train: input.n_train,
        n_scenario: input.n_scenario,
        image_shape: input.image_shape,
        num_classes: input.num_classes,
        hash: input.hash.clone(),
        planned_ms: now_ms(),
    };
    a.put(
        &keys::finetune_plan(job),
        serde_json::to_vec_pretty(&plan).expect("plan").into(),
    )
    .await?;
    c.inner
        .local()
        .round_plans
        .insert(job.into(), Arc::new(plan));
    tracing::info!(
        job,
        rounds = input.rounds,
        parts = input.parts,
        "fine-tune planned"
    );
    Ok(())
}

/// What the driver does for a job in step `finetune:<round>`: plans the round's parts
/// (once), reaps their expired leases, and says whether the round is complete.
pub(crate) async fn tick(
    c: &Coordinator,
    rec: &JobRecord,
    round: usize,
    fence: u64,
) -> Result<RoundState, StoreError> {
    let store = &c.inner.store;
    let stage = Stage::Round(round as u32);
    let parts = match c.rounds_plan(rec).await {
        Ok(p) => p.parts as u32,
        Err(e) => {
            // the artifact store may be down for a while: try again next tick
            tracing::warn!(job = %rec.id, round, error = %e, "fine-tune plan unreadable, retrying");
            return Ok(RoundState::Running);
        }
    };
    let n = store.counts(&rec.id, stage).await?;
    if n.total == 0 {
        // idempotent, and refused by the store unless the job is running this round
        store
            .plan_shards(&rec.id, stage, parts, now_ms(), fence)
            .await?;
        tracing::info!(job = %rec.id, round, parts, "round started");
        return Ok(RoundState::Running);
    }
    for e in store
        .reap(&rec.id, stage, now_ms(), c.inner.cfg.max_attempts, fence)
        .await?
    {
        tracing::warn!(job = %rec.id, round, part = e.shard, attempt = e.attempt, worker = %e.owner, requeued = e.requeued, "lease expired");
        crate::metrics::lease_expired(&rec.id, e.requeued);
    }
    Ok(if n.done == n.total {
        RoundState::Complete
    } else {
        RoundState::Running
    })
}

/// Where a round stands (a part that failed for good has failed the job already).
pub(crate) enum RoundState {
    Running,
    Complete,
}

/// Averages round `round`'s parts into the next checkpoint; after the last round,
/// leaves the result in the job folder (and its durable copy) for the finish step.
/// Returns the next step.
///
/// Everything it reads is in the stores (the parts' checkpoints and losses, the
/// plan), so a coordinator restarted on an empty disk merges the same bytes.
pub(crate) async fn average(
    c: &Coordinator,
    rec: &JobRecord,
    round: usize,
) -> Result<Phase, StepError> {
    let job = rec.id.clone();
    let plan = c
        .rounds_plan(rec)
        .await
        .map_err(|e| StepError::Retryable(e.to_string()))?;
    let shards = c
        .inner
        .store
        .shards(&job, Stage::Round(round as u32))
        .await?;
    let job_dir = c.job_dir_of(rec).map_err(StepError::fatal)?;
    // the folder this merge publishes after the last round starts as the last step
    // left it (another coordinator may have run that step)
    crate::folder::restore_job(c, rec, &job_dir).await?;
    let dir = job_dir.join("correct/rounds");
    let ext = plan.extension.clone();
    let exchange = StoreExchange {
        artifacts: c.inner.artifacts.clone(),
        ext: ext.clone(),
    };
    let start_sha = c
        .inner
        .store
        .checkpoint_sha256(&job, round as u32)
        .await?
        .unwrap_or_default();
    let start = exchange.start(&job, round, &dir, &start_sha).await?;
    let outputs: Vec<PartOutput> = shards
        .iter()
        .map(|s| {
            if s.state == ShardState::Done {
                Ok(PartOutput {
                    part: s.shard as usize,
                    key: s.output.clone(),
                    sha256: s.output_sha256.clone(),
                })
            } else {
                Err(StepError::fatal(format!(
                    "round {round} part {} is {}",
                    s.shard, s.state
                )))
            }
        })
        .collect::<Result<_, _>>()?;
    let parts = exchange.collect(round, &outputs, &dir).await?;
    let epoch = merged_stats(c, round, &outputs).await?;
    let next = dir.join(format!("round-{:04}.{ext}", round + 1));
    let seed = toml::from_str::<defuse_core::config::JobConfig>(&rec.config_toml)
        .map_err(|e| StepError::fatal(format!("job config of {job}: {e}")))?;
    let (plan2, next2) = (plan.clone(), next.clone());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        defuse_core::threads::enter_central();
        let load = |p: &std::path::Path| {
            Classifier::load(p, plan2.image_shape, plan2.num_classes, tch::Device::Cpu)
                .map_err(|e| e.to_string())
        };
        let mut target = load(&start)?;
        let models: Vec<(Classifier, f64)> = parts
            .iter()
            .map(|(part, p)| {
                // weight: the train rows this part saw (known from the plan alone)
                let (tb, _) = correct::round_steps(
                    plan2.n_train,
                    plan2.n_scenario,
                    &seed.correct,
                    seed.seed,
                    round,
                    *part,
                );
                let rows: usize = tb.iter().map(Vec::len).sum();
                Ok((load(p)?, rows as f64))
            })
            .collect::<Result<_, String>>()?;
        let refs: Vec<(&Classifier, f64)> = models
            .iter()
            .filter(|m| m.1 > 0.0)
            .map(|(m, w)| (m, *w))
            .collect();
        if !refs.is_empty() {
            correct::merge_into(&mut target, &refs, seed.correct.merge)
                .map_err(|e| e.to_string())?;
        }
        target.save(&next2).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| StepError::fatal(format!("average panicked: {e}")))?
    .map_err(StepError::Fatal)?;
    tracing::info!(job = %job, round, ce_train = epoch.ce_train, ce_scenario = epoch.ce_scenario, "round merged");
    crate::metrics::round(&job, round + 1, epoch.ce_train, epoch.ce_scenario);
    c.inner
        .artifacts
        .put(
            &keys::round_stats(&job, round),
            serde_json::to_vec(&epoch).expect("epoch").into(),
        )
        .await?;
    c.inner.local().last_round.insert(job.clone(), epoch);
    // publish: the object first, then its hash, then the step that names it
    let sha = exchange.publish(&job, round + 1, &next).await?;
    c.inner
        .store
        .put_checkpoint_sha256(&job, round as u32 + 1, &sha)
        .await?;
    if round + 1 < plan.rounds {
        return Ok(Phase::FineTune(round + 1));
    }
    let last = job_dir.join(files::rounds_final(&ext));
    std::fs::copy(&next, &last)
        .map_err(|e| StepError::fatal(format!("{} -> {}: {e}", next.display(), last.display())))?;
    let mut history = Vec::new();
    for r in 0..plan.rounds {
        let bytes = c.inner.artifacts.get(&keys::round_stats(&job, r)).await?;
        history.push(
            serde_json::from_slice::<correct::CorrectEpoch>(&bytes)
                .map_err(|e| StepError::fatal(format!("losses of round {r}: {e}")))?,
        );
    }
    let done = RoundsDone {
        hash: plan.hash.clone(),
        history,
    };
    defuse_core::layout::write_json(&job_dir.join(files::ROUNDS_DONE), &done)
        .map_err(StepError::fatal)?;
    // the finish step may run on another coordinator
    crate::folder::publish_job(c, rec, &job_dir).await?;
    tracing::info!(job = %job, rounds = plan.rounds, "fine-tune rounds done");
    Ok(Phase::Finish)
}

/// Round `round`'s losses: its parts' (stored beside their checkpoints when they were
/// accepted), weighted by the rows each saw.
async fn merged_stats(
    c: &Coordinator,
    round: usize,
    outputs: &[PartOutput],
) -> Result<correct::CorrectEpoch, StepError> {
    let (mut train, mut scenario, mut rows) = (0.0, 0.0, 0usize);
    for PartOutput { part, key, .. } in outputs {
        let bytes = c.inner.artifacts.get(&keys::part_stats(key)).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| StepError::fatal(format!("losses of round {round} part {part}: {e}")))?;
        let n = v["samples"].as_u64().unwrap_or(0) as usize;
        train += v["ce_train"].as_f64().unwrap_or(0.0) * n as f64;
        scenario += v["ce_scenario"].as_f64().unwrap_or(0.0) * n as f64;
        rows += n;
    }
    let n = rows.max(1) as f64;
    Ok(correct::CorrectEpoch {
        epoch: round + 1,
        ce_train: train / n,
        ce_scenario: scenario / n,
    })
}

/// An accepted part: its checkpoint's key and the SHA-256 recorded at acceptance.
#[derive(Debug, Clone)]
pub(crate) struct PartOutput {
    pub part: usize,
    pub key: String,
    pub sha256: String,
}

/// How the parts of a round meet the coordinator: where a round's starting checkpoint
/// comes from, how the parts' results are gathered, and how the merged checkpoint is
/// published. The one implementation today goes through the artifact store
/// ([`StoreExchange`]); a multi-GPU backend (NCCL all-reduce inside a node) would be
/// a second one (DESIGN.md, "Where NCCL would plug in").
#[async_trait::async_trait]
pub(crate) trait Exchange: Send + Sync {
    /// Round `round`'s starting checkpoint, as a local file under `dir`, checked
    /// against the SHA-256 recorded when it was published (empty: not checked).
    async fn start(
        &self,
        job: &str,
        round: usize,
        dir: &Path,
        sha256: &str,
    ) -> Result<PathBuf, StepError>;
    /// The parts' checkpoints, as local files under `dir`, each checked to be what
    /// was accepted.
    async fn collect(
        &self,
        round: usize,
        outputs: &[PartOutput],
        dir: &Path,
    ) -> Result<Vec<(usize, PathBuf)>, StepError>;
    /// Makes `file` round `round`'s checkpoint, for every worker to start from;
    /// returns its SHA-256, for the caller to record.
    async fn publish(&self, job: &str, round: usize, file: &Path) -> Result<String, StepError>;
}

/// Checkpoints in and out through the artifact store (S3 or a folder).
pub(crate) struct StoreExchange {
    pub artifacts: Arc<dyn defuse_core::artifacts::ArtifactStore>,
    pub ext: String,
}

#[async_trait::async_trait]
impl Exchange for StoreExchange {
    async fn start(
        &self,
        job: &str,
        round: usize,
        dir: &Path,
        sha256: &str,
    ) -> Result<PathBuf, StepError> {
        let path = dir.join(format!("round-{round:04}.{}", self.ext));
        defuse_core::artifacts::get_file_checked(
            self.artifacts.as_ref(),
            &keys::checkpoint(job, round, &self.ext),
            &path,
            sha256,
        )
        .await
        .map_err(|e| StepError::from(e).context(format!("checkpoint of round {round}")))?;
        Ok(path)
    }

    async fn collect(
        &self,
        round: usize,
        outputs: &[PartOutput],
        dir: &Path,
    ) -> Result<Vec<(usize, PathBuf)>, StepError> {
        let mut parts = Vec::new();
        for PartOutput { part, key, sha256 } in outputs {
            let p = dir.join(format!("round-{round:04}-part-{part:03}.{}", self.ext));
            defuse_core::artifacts::get_file_checked(self.artifacts.as_ref(), key, &p, sha256)
                .await
                .map_err(|e| StepError::from(e).context(format!("round {round} part {part}")))?;
            parts.push((*part, p));
        }
        Ok(parts)
    }

    async fn publish(&self, job: &str, round: usize, file: &Path) -> Result<String, StepError> {
        let sha = defuse_core::artifacts::sha256_file(file)
            .map_err(|e| StepError::fatal(format!("{}: {e}", file.display())))?;
        self.artifacts
            .put_file(&keys::checkpoint(job, round, &self.ext), file)
            .await
            .map_err(|e| StepError::from(e).context(format!("checkpoint of round {round}")))?;
        Ok(sha)
    }
}
