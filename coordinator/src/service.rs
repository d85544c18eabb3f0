//! The gRPC services over the job API (`api.rs`) and the store: `WorkerService` for
//! workers (register, lease, heartbeat, complete, fail) and `JobService` for clients.
//! Handlers make fenced store calls and map [`CoordinatorError`] to a `Status`; they
//! move no job through its life cycle (the driver does).
use std::sync::Arc;

use defuse_proto::job_service_server::JobService;
use defuse_proto::worker_service_server::WorkerService;
use defuse_proto::*;
use tonic::{Request, Response, Status};

use crate::api::{valid_id, DEFAULT_PAGE};

/// The largest piece of a result a `FetchResult` message carries.
const RESULT_CHUNK: usize = 1 << 20;
use crate::error::CoordinatorError;
use crate::keys;
use crate::state::{is_leasable, Coordinator, Plan};
use crate::store::{now_ms, Attempt, FailOutcome, Failure, Fenced, JobRecord, Stage, StoreError};

/// What a leased shard's task is built from.
enum TaskSource {
    Identify(Arc<Plan>),
    /// A round's plan, the round, and its checkpoint's SHA-256 (empty: not recorded).
    Round(Arc<crate::state::RoundsPlan>, u32, String),
}

/// The task of identify shard `lease.shard`.
fn identify_task(
    rec: &JobRecord,
    plan: &Plan,
    lease: &crate::store::Lease,
) -> Result<Task, Status> {
    let (start, end) = *plan
        .ranges
        .get(lease.shard as usize)
        .ok_or_else(|| Status::internal("shard outside the plan"))?;
    Ok(Task {
        task: Some(TaskRef {
            job: rec.id.clone(),
            attempt: lease.attempt,
            work: Some(task_ref::Work::Identify(IdentifyShard {
                shard: lease.shard,
            })),
        }),
        config_toml: rec.config_toml.clone(),
        output_key: keys::shard_output(&rec.id, lease.shard, lease.attempt),
        traceparent: rec.trace_parent.clone(),
        spec: Some(task::Spec::Identify(IdentifySpec {
            start,
            end,
            classifier_key: plan.classifier_key.clone(),
            vae_key: plan.vae_key.clone(),
            vae_decoder_key: plan.vae_decoder_key.clone(),
            data: data_identity(&rec.id, &plan.data_digest),
        })),
    })
}

/// What a worker checks its data against (nothing for plans without a digest).
fn data_identity(job: &str, digest: &str) -> Option<DataIdentity> {
    (!digest.is_empty()).then(|| DataIdentity {
        digest: digest.to_string(),
        manifest_key: keys::data_manifest(job),
    })
}

/// The task of part `lease.shard` of fine-tune round `round`: train from the
/// round's checkpoint.
fn finetune_task(
    rec: &JobRecord,
    round: u32,
    plan: &crate::state::RoundsPlan,
    checkpoint_sha256: String,
    lease: &crate::store::Lease,
) -> Task {
    let r = round as usize;
    Task {
        task: Some(TaskRef {
            job: rec.id.clone(),
            attempt: lease.attempt,
            work: Some(task_ref::Work::Finetune(FineTunePart {
                round,
                part: lease.shard,
            })),
        }),
        config_toml: rec.config_toml.clone(),
        output_key: keys::part_output(&rec.id, r, lease.shard, lease.attempt, &plan.extension),
        traceparent: rec.trace_parent.clone(),
        spec: Some(task::Spec::Finetune(FineTuneSpec {
            checkpoint_key: keys::checkpoint(&rec.id, r, &plan.extension),
            checkpoint_sha256,
            scenario_key: plan.scenario_key.clone(),
            model_extension: plan.extension.clone(),
            data: data_identity(&rec.id, &plan.data_digest),
        })),
    }
}

/// The attempt a worker's task reference names.
fn attempt_of<'a>(t: &'a TaskRef, worker: &'a str) -> Result<Attempt<'a>, Status> {
    let (stage, shard) = match &t.work {
        Some(task_ref::Work::Identify(s)) => (Stage::Identify, s.shard),
        Some(task_ref::Work::Finetune(p)) => (Stage::Round(p.round), p.part),
        None => {
            return Err(Status::invalid_argument(
                "task: no unit of work (identify or finetune)",
            ))
        }
    };
    Ok(Attempt {
        job: &t.job,
        stage,
        shard,
        attempt: t.attempt,
        worker,
    })
}

pub(crate) fn store_status(e: StoreError) -> Status {
    CoordinatorError::from(e).into()
}

#[tonic::async_trait]
impl WorkerService for Coordinator {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(worker = %r.worker_id, version = r.protocol_version, "worker refused: protocol version");
            return Err(Status::failed_precondition(format!(
                "worker {} speaks protocol version {}, this coordinator speaks {}: run a worker of the coordinator's release",
                r.worker_id, r.protocol_version, PROTOCOL_VERSION
            )));
        }
        if !valid_id(&r.worker_id.replace('.', "-")) {
            return Err(Status::invalid_argument(
                "worker_id: letters, digits, '.', '-' and '_' only",
            ));
        }
        let info = serde_json::json!({"host": r.host, "device": r.device, "memory_bytes": r.memory_bytes, "threads": r.threads});
        self.inner
            .store
            .register_worker(&r.worker_id, &info.to_string(), now_ms())
            .await
            .map_err(store_status)?;
        tracing::info!(worker = %r.worker_id, device = %r.device, "worker registered");
        Ok(Response::new(RegisterResponse {
            heartbeat_ms: self.inner.cfg.heartbeat_ms,
            lease_ms: self.inner.cfg.lease_ms,
            artifacts_url: self.inner.artifacts.url(),
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        let worker = req.into_inner().worker_id;
        let now = now_ms();
        if !self
            .inner
            .store
            .touch_worker(&worker, now)
            .await
            .map_err(store_status)?
        {
            return Err(Status::failed_precondition(format!(
                "unknown worker {worker}: register first"
            )));
        }
        let cached = {
            let local = self.inner.local();
            local.leasable.clone().zip(local.unfinished)
        };
        let (jobs, unfinished) = match cached {
            Some(c) => c,
            None => {
                let active = self.inner.store.active_jobs().await.map_err(store_status)?;
                let unfinished = crate::state::unfinished(&active);
                (Arc::new(active), unfinished)
            }
        };
        for rec in jobs.iter().filter(|j| is_leasable(j)) {
            let Some(stage) = Stage::of(rec.step) else {
                continue;
            };
            // what the task needs is read before the lease is taken: a failed read
            // leaves the shard pending and burns no attempt
            let source = match stage {
                Stage::Round(r) => match (
                    self.rounds_plan(rec).await,
                    self.inner.store.checkpoint_sha256(&rec.id, r).await,
                ) {
                    (Ok(p), Ok(sha)) => TaskSource::Round(p, r, sha.unwrap_or_default()),
                    (Err(e), _) => {
                        tracing::warn!(job = %rec.id, error = %e, "fine-tune plan unreadable: leasing from other jobs");
                        continue;
                    }
                    (_, Err(e)) => {
                        tracing::warn!(job = %rec.id, error = %e, "checkpoint hash unreadable: leasing from other jobs");
                        continue;
                    }
                },
                Stage::Identify => match self.plan(rec).await {
                    Ok(p) => TaskSource::Identify(p),
                    Err(e) => {
                        tracing::warn!(job = %rec.id, error = %e, "plan unreadable: leasing from other jobs");
                        continue;
                    }
                },
            };
            let started = std::time::Instant::now();
            let r = self
                .inner
                .store
                .lease(&rec.id, stage, &worker, now, self.inner.cfg.lease_ms)
                .await;
            crate::metrics::store_call("lease", started.elapsed().as_secs_f64(), r.is_ok());
            let lease = match r {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => return Err(store_status(e)),
            };
            tracing::info!(job = %rec.id, unit = %stage.unit(lease.shard), attempt = lease.attempt, worker = %worker, "shard leased");
            crate::metrics::lease(&rec.id);
            let task = match source {
                TaskSource::Round(plan, r, sha) => finetune_task(rec, r, &plan, sha, &lease),
                TaskSource::Identify(plan) => identify_task(rec, &plan, &lease)?,
            };
            return Ok(Response::new(LeaseResponse {
                task: Some(task),
                retry_after_ms: 0,
                idle: false,
            }));
        }
        Ok(Response::new(LeaseResponse {
            task: None,
            retry_after_ms: 300,
            idle: unfinished == 0,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let now = now_ms();
        if !self
            .inner
            .store
            .touch_worker(&r.worker_id, now)
            .await
            .map_err(store_status)?
        {
            return Ok(Response::new(HeartbeatResponse {
                verdicts: vec![],
                reregister: true,
            }));
        }
        let mut verdicts = Vec::new();
        for t in &r.running {
            let Ok(a) = attempt_of(t, &r.worker_id) else {
                verdicts.push(TaskVerdict::Abandon as i32);
                continue;
            };
            let v = match self
                .inner
                .store
                .renew(&a, now, self.inner.cfg.lease_ms)
                .await
            {
                Ok(Fenced::Accepted) => TaskVerdict::Continue,
                Ok(Fenced::Stale) | Err(StoreError::Lost(_)) => TaskVerdict::Abandon,
                Err(e) => return Err(store_status(e)),
            };
            verdicts.push(v as i32);
        }
        Ok(Response::new(HeartbeatResponse {
            verdicts,
            reregister: false,
        }))
    }

    async fn complete(
        &self,
        req: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let r = req.into_inner();
        let t = r
            .task
            .ok_or_else(|| Status::invalid_argument("task missing"))?;
        let a = attempt_of(&t, &r.worker_id)?;
        // the output must be the one of this attempt
        let expected = match a.stage {
            Stage::Round(round) => {
                let rec = self.job(&t.job).await?;
                let plan = self
                    .rounds_plan(&rec)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                keys::part_output(&t.job, round as usize, a.shard, a.attempt, &plan.extension)
            }
            Stage::Identify => keys::shard_output(&t.job, a.shard, a.attempt),
        };
        if r.output_key != expected {
            return Err(Status::invalid_argument(format!(
                "output key {} is not the key of attempt {}",
                r.output_key, t.attempt
            )));
        }
        if !defuse_core::artifacts::is_sha256(&r.output_sha256) {
            return Err(Status::invalid_argument(format!(
                "output_sha256 '{}' is not a SHA-256 in hex",
                r.output_sha256
            )));
        }
        if let Stage::Round(_) = a.stage {
            // a part's losses go beside its checkpoint before it is accepted: the
            // round's history survives a restart of the coordinator
            self.inner
                .artifacts
                .put(
                    &keys::part_stats(&r.output_key),
                    r.stats_json.clone().into(),
                )
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        let started = std::time::Instant::now();
        let f = self
            .inner
            .store
            .complete(&a, &r.output_key, &r.output_sha256)
            .await;
        crate::metrics::store_call("complete", started.elapsed().as_secs_f64(), f.is_ok());
        let f = f.map_err(store_status)?;
        crate::metrics::completion(&t.job, f == Fenced::Accepted);
        let acceptance = match f {
            Fenced::Accepted if matches!(a.stage, Stage::Round(_)) => {
                tracing::info!(job = %t.job, unit = %t.unit(), attempt = t.attempt, worker = %r.worker_id, "round part done");
                Acceptance::Accepted
            }
            Fenced::Accepted => {
                if let Ok(s) =
                    serde_json::from_str::<defuse_core::identify::IdentifyStats>(&r.stats_json)
                {
                    crate::metrics::shard_found(
                        &t.job,
                        s.n_searched as u64,
                        s.n_perturbations as u64,
                        s.n_failures as u64,
                    );
                }
                tracing::info!(job = %t.job, unit = %t.unit(), attempt = t.attempt, worker = %r.worker_id, "shard done");
                Acceptance::Accepted
            }
            Fenced::Stale => {
                tracing::warn!(job = %t.job, unit = %t.unit(), attempt = t.attempt, worker = %r.worker_id, "stale completion ignored");
                Acceptance::Stale
            }
        };
        Ok(Response::new(CompleteResponse {
            acceptance: acceptance as i32,
        }))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailResponse>, Status> {
        let r = req.into_inner();
        let t = r
            .task
            .ok_or_else(|| Status::invalid_argument("task missing"))?;
        let e = r.error.unwrap_or_default();
        let failure = if e.kind == FailureKind::Shutdown as i32 {
            Failure::HandBack
        } else if e.retryable {
            Failure::Retryable
        } else {
            Failure::Fatal
        };
        let o = self
            .inner
            .store
            .fail(
                &attempt_of(&t, &r.worker_id)?,
                failure,
                &e.message,
                self.inner.cfg.max_attempts,
            )
            .await
            .map_err(store_status)?;
        tracing::warn!(job = %t.job, unit = %t.unit(), attempt = t.attempt, worker = %r.worker_id, failure = ?failure, outcome = ?o, error = %e.message, "task failed");
        crate::metrics::task_failure(&t.job, e.retryable, &format!("{o:?}").to_lowercase());
        let acceptance = if o == FailOutcome::Stale {
            Acceptance::Stale
        } else {
            Acceptance::Accepted
        };
        Ok(Response::new(FailResponse {
            acceptance: acceptance as i32,
        }))
    }
}

#[tonic::async_trait]
impl JobService for Coordinator {
    async fn submit(
        &self,
        req: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = req
            .metadata()
            .get(defuse_proto::trace::HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(defuse_proto::trace::TraceParent::parse);
        let r = req.into_inner();
        let id = self
            .submit_traced(&r.config_toml, Some(r.job_id), caller)
            .await?;
        Ok(Response::new(SubmitResponse { job_id: id }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<JobStatus>, Status> {
        let id = req.into_inner().job_id;
        match self.inner.store.get_job(&id).await.map_err(store_status)? {
            Some(rec) => Ok(Response::new(self.status_of(&rec, true).await)),
            None => Err(Status::not_found(format!("no job {id}"))),
        }
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let id = req.into_inner().job_id;
        let state = Coordinator::cancel(self, &id).await?;
        Ok(Response::new(CancelResponse {
            state: state.as_str().into(),
        }))
    }

    async fn label(&self, req: Request<LabelRequest>) -> Result<Response<LabelResponse>, Status> {
        let r = req.into_inner();
        let pairs: Vec<(String, String)> = r.labels.into_iter().collect();
        let (labelled, discarded) = self.set_labels(&r.job_id, &pairs).await?;
        Ok(Response::new(LabelResponse {
            labelled: labelled as u32,
            discarded: discarded as u32,
        }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let r = req.into_inner();
        let size = if r.page_size == 0 {
            DEFAULT_PAGE
        } else {
            r.page_size as usize
        };
        let (recs, next) = self
            .jobs_page(&r.page_token, size)
            .await
            .map_err(store_status)?;
        let mut jobs = Vec::new();
        for rec in &recs {
            jobs.push(self.status_of(rec, false).await);
        }
        Ok(Response::new(ListResponse {
            jobs,
            next_page_token: next,
        }))
    }

    async fn list_results(
        &self,
        req: Request<ListResultsRequest>,
    ) -> Result<Response<ListResultsResponse>, Status> {
        let names = self.results(&req.into_inner().job_id).await?;
        Ok(Response::new(ListResultsResponse { names }))
    }

    type FetchResultStream = tokio_stream::Iter<std::vec::IntoIter<Result<ResultChunk, Status>>>;

    async fn fetch_result(
        &self,
        req: Request<FetchResultRequest>,
    ) -> Result<Response<Self::FetchResultStream>, Status> {
        let r = req.into_inner();
        let bytes = self.result(&r.job_id, &r.name).await?;
        let chunks: Vec<Result<ResultChunk, Status>> = bytes
            .chunks(RESULT_CHUNK)
            .map(|c| Ok(ResultChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn put_input(
        &self,
        req: Request<tonic::Streaming<InputChunk>>,
    ) -> Result<Response<InputRef>, Status> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let mut chunks = req.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an upload without a first chunk"))?;
        let (job, name) = (first.job_id.clone(), first.name.clone());
        self.check_upload(&job, &name).await?;
        // received into the work dir (a scratch file), hashed on the way
        let dir = self.inner.cfg.work_dir.join(".uploads");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Status::internal(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("{job}-{:016x}.part", rand::random::<u64>()));
        let io = |e: std::io::Error| Status::internal(format!("{}: {e}", path.display()));
        let received = async {
            let mut f = tokio::fs::File::create(&path).await.map_err(io)?;
            let (mut sha, mut bytes) = (sha2::Sha256::new(), 0u64);
            let mut next = Some(first);
            while let Some(c) = next {
                bytes += c.data.len() as u64;
                if bytes > defuse_core::limits::MAX_UPLOAD_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "upload '{name}' is larger than {} GiB",
                        defuse_core::limits::MAX_UPLOAD_BYTES >> 30
                    )));
                }
                sha.update(&c.data);
                f.write_all(&c.data).await.map_err(io)?;
                next = chunks.message().await?;
            }
            f.flush().await.map_err(io)?;
            Ok((format!("{:x}", sha.finalize()), bytes))
        }
        .await;
        let stored = match received {
            Ok((sha, bytes)) => self
                .store_upload(&job, &name, &path, &sha)
                .await
                .map(|url| (url, bytes))
                .map_err(Status::from),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&path).await;
        let (url, bytes) = stored?;
        Ok(Response::new(InputRef { url, bytes }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let id = req.into_inner().job_id;
        let objects = Coordinator::delete(self, &id).await?;
        Ok(Response::new(DeleteResponse { objects }))
    }
}
