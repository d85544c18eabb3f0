//! The coordinator's life cycle in process: a memory state store, a local artifact
//! folder, the worker and job services called directly (no network, no driver), so
//! each defect of the life cycle has a test of a few milliseconds.
use std::collections::BTreeMap;
use std::sync::Arc;

use defuse_coordinator::keys::{self, files};
use defuse_coordinator::store::memory::MemoryStore;
use defuse_coordinator::store::{ErrorKind, JobRecord, JobState, Phase, Stage, StateStore};
use defuse_coordinator::{Coordinator, CoordinatorConfig};
use defuse_core::artifacts::{ArtifactStore, LocalStore};
use defuse_proto::worker_service_server::WorkerService;
use defuse_proto::*;
use tonic::Request;

struct Harness {
    store: Arc<dyn StateStore>,
    artifacts: Arc<dyn ArtifactStore>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Harness {
            store: Arc::new(MemoryStore::new()),
            artifacts: Arc::new(LocalStore::new(dir.path().join("artifacts"))),
            dir,
        }
    }

    /// A coordinator over the harness's stores, on a work dir of its own (never
    /// created unless the coordinator writes to it).
    fn coordinator(&self, name: &str, max_attempts: u32) -> Coordinator {
        self.coordinator_with(name, |c| c.max_attempts = max_attempts)
    }

    fn coordinator_with(
        &self,
        name: &str,
        set: impl FnOnce(&mut CoordinatorConfig),
    ) -> Coordinator {
        let mut cfg = CoordinatorConfig {
            work_dir: self.dir.path().join(name),
            // the jobs read temporary folders (tests/security.rs checks the roots)
            allowed_roots: None,
            ..Default::default()
        };
        set(&mut cfg);
        Coordinator::new(cfg, self.store.clone(), self.artifacts.clone())
    }

    async fn job(&self, id: &str, state: JobState, step: Phase, shards: u32) {
        self.store
            .create_job(&JobRecord {
                id: id.into(),
                name: id.into(),
                state: JobState::Running,
                step,
                config_toml: "[data]\npath = \"/nowhere\"\n".into(),
                n_shards: 0,
                error: String::new(),
                error_kind: None,
                created_ms: 1,
                updated_ms: 1,
                trace_parent: String::new(),
            })
            .await
            .unwrap();
        if shards > 0 {
            self.store
                .plan_shards(id, Stage::Identify, shards, 1, 1)
                .await
                .unwrap();
        }
        self.store
            .set_job_state(id, state, step, "", None, 2, 1)
            .await
            .unwrap();
    }

    async fn plan(&self, job: &str) {
        let plan = serde_json::json!({
            "ranges": [[0, 10], [10, 20]],
            "classifier_key": keys::model(job, "classifier.safetensors"),
            "vae_key": keys::model(job, "vae.safetensors"),
            "vae_decoder_key": "",
        });
        self.artifacts
            .put(&keys::plan(job), plan.to_string().into())
            .await
            .unwrap();
    }

    /// A fine-tune plan of `parts` parts per round, as the finish step publishes it.
    async fn rounds_plan(&self, job: &str, parts: usize) {
        let plan = serde_json::json!({
            "rounds": 2, "parts": parts, "extension": "safetensors",
            "scenario_key": keys::scenario_train(job), "n_train": 100, "n_scenario": 10,
            "image_shape": [1, 28, 28], "num_classes": 10, "hash": "h", "planned_ms": 5,
        });
        self.artifacts
            .put(&keys::finetune_plan(job), plan.to_string().into())
            .await
            .unwrap();
    }
}

async fn register(c: &Coordinator, worker: &str) {
    WorkerService::register(
        c,
        Request::new(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: worker.into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
}

async fn lease(c: &Coordinator, worker: &str) -> Result<Option<Task>, tonic::Status> {
    WorkerService::lease(
        c,
        Request::new(LeaseRequest {
            worker_id: worker.into(),
        }),
    )
    .await
    .map(|r| r.into_inner().task)
}

async fn fail(c: &Coordinator, worker: &str, task: &Task, kind: FailureKind) -> i32 {
    WorkerService::fail(
        c,
        Request::new(FailRequest {
            worker_id: worker.into(),
            task: task.task.clone(),
            error: Some(TaskError {
                kind: kind as i32,
                retryable: true,
                message: format!("{kind:?}"),
            }),
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .acceptance
}

#[tokio::test]
async fn a_plan_that_cannot_be_read_leaves_the_shard_pending_and_burns_no_attempt() {
    let h = Harness::new();
    h.job("j", JobState::Running, Phase::Identify, 2).await;
    let c = h.coordinator("work", 3);
    register(&c, "w").await;
    // no plan in the artifact store (it is down, or was lost): no task from this job
    // (other jobs would still be leased)
    assert!(lease(&c, "w").await.unwrap().is_none());
    let shards = h.store.shards("j", Stage::Identify).await.unwrap();
    assert_eq!(
        shards
            .iter()
            .map(|s| (s.state.as_str(), s.attempt))
            .collect::<Vec<_>>(),
        vec![("pending", 0), ("pending", 0)],
        "a lease was taken for a task that was never built"
    );
    // once the plan can be read, the first lease is attempt 1
    h.plan("j").await;
    let t = lease(&c, "w").await.unwrap().unwrap();
    let r = t.task.unwrap();
    let Some(task::Spec::Identify(spec)) = t.spec else {
        panic!("not an identify task: {:?}", t.spec)
    };
    assert_eq!(
        (r.index(), r.attempt, spec.start, spec.end),
        (Some(0), 1, 0, 10)
    );
}

#[tokio::test]
async fn a_completion_retried_after_a_lost_reply_is_accepted_once() {
    let h = Harness::new();
    h.job("j", JobState::Running, Phase::Identify, 2).await;
    h.plan("j").await;
    let c = h.coordinator("work", 3);
    register(&c, "w").await;
    let t = lease(&c, "w").await.unwrap().unwrap();
    let r = t.task.clone().unwrap();
    let complete = || {
        WorkerService::complete(
            &c,
            Request::new(CompleteRequest {
                worker_id: "w".into(),
                task: t.task.clone(),
                output_key: t.output_key.clone(),
                stats_json: "{}".into(),
                output_sha256: "0".repeat(64),
            }),
        )
    };
    // a completion without its output's hash is refused (nothing to check it by)
    let e = WorkerService::complete(
        &c,
        Request::new(CompleteRequest {
            worker_id: "w".into(),
            task: t.task.clone(),
            output_key: t.output_key.clone(),
            stats_json: "{}".into(),
            output_sha256: String::new(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    for i in 0..2 {
        let a = complete().await.unwrap().into_inner().acceptance;
        assert_eq!(a, Acceptance::Accepted as i32, "completion {i}");
    }
    let s = &h.store.shards("j", Stage::Identify).await.unwrap()[r.index().unwrap() as usize];
    assert_eq!((s.state.as_str(), s.accepted), ("done", 1));
    // another worker's completion of the same shard is still stale
    register(&c, "x").await;
    let stale = WorkerService::complete(
        &c,
        Request::new(CompleteRequest {
            worker_id: "x".into(),
            task: t.task.clone(),
            output_key: t.output_key.clone(),
            stats_json: "{}".into(),
            output_sha256: "0".repeat(64),
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .acceptance;
    assert_eq!(stale, Acceptance::Stale as i32);
}

#[tokio::test]
async fn a_hand_back_on_shutdown_is_not_an_attempt() {
    let h = Harness::new();
    h.job("j", JobState::Running, Phase::Identify, 1).await;
    h.plan("j").await;
    let c = h.coordinator("work", 2);
    register(&c, "w").await;
    // three workers shut down holding the shard, more than max_attempts = 2
    for k in 1..=3 {
        let t = lease(&c, "w").await.unwrap().unwrap();
        assert_eq!(t.task.as_ref().unwrap().attempt, k);
        assert_eq!(
            fail(&c, "w", &t, FailureKind::Shutdown).await,
            Acceptance::Accepted as i32
        );
        let j = h.store.get_job("j").await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Running, "hand-back {k} failed the job");
    }
    // real failures still count: two of them fail the job
    let t = lease(&c, "w").await.unwrap().unwrap();
    fail(&c, "w", &t, FailureKind::Io).await;
    assert_eq!(
        h.store.get_job("j").await.unwrap().unwrap().state,
        JobState::Running
    );
    let t = lease(&c, "w").await.unwrap().unwrap();
    fail(&c, "w", &t, FailureKind::Io).await;
    assert_eq!(
        h.store.get_job("j").await.unwrap().unwrap().state,
        JobState::Failed
    );
}

fn scenario(id: usize) -> defuse_core::scenarios::Scenario {
    defuse_core::scenarios::Scenario {
        id,
        component: id,
        weight: 0.5,
        size: 5,
        mean: vec![0.0, 0.0],
        covariance: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        predicted: 1,
        source_labels: BTreeMap::from([(7, 5)]),
        sample_predictions: vec![1; 8],
        examples: vec![],
    }
}

#[tokio::test]
async fn labels_are_validated_from_the_artifact_store_and_final_across_coordinators() {
    let h = Harness::new();
    h.job("j", JobState::AwaitingLabels, Phase::Finish, 0).await;
    // what the distill step published: the durable copy of the job folder
    let put = |rel: &'static str, v: serde_json::Value| {
        let a = h.artifacts.clone();
        async move {
            a.put(&keys::folder_file("j", rel), v.to_string().into())
                .await
                .unwrap()
        }
    };
    put(
        files::SCENARIOS,
        serde_json::to_value(vec![scenario(0), scenario(1)]).unwrap(),
    )
    .await;
    put(
        files::CLASSES,
        serde_json::json!(["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]),
    )
    .await;
    let first = h.coordinator("first", 3);
    let e = first
        .set_labels("j", &[("5".into(), "7".into())])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("scenario 5 does not exist"), "{e:?}");
    assert_eq!(h.store.labels("j").await.unwrap(), None);
    let (labelled, discarded) = first
        .set_labels("j", &[("0".into(), "7".into())])
        .await
        .unwrap();
    assert_eq!((labelled, discarded), (1, 1));
    let stored: serde_json::Value =
        serde_json::from_str(&h.store.labels("j").await.unwrap().unwrap()).unwrap();
    assert_eq!(stored, serde_json::json!({"0": 7, "1": "discard"}));
    // a second coordinator (another pod, an empty disk) refuses new labels
    let second = h.coordinator("second", 3);
    let e = second
        .set_labels("j", &[("1".into(), "3".into())])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.to_string().contains("labelled already"), "{e:?}");
    let again: serde_json::Value =
        serde_json::from_str(&h.store.labels("j").await.unwrap().unwrap()).unwrap();
    assert_eq!(again, stored, "labels are final");
    // nothing was read from or written to either coordinator's disk
    assert!(!h.dir.path().join("first").exists());
    assert!(!h.dir.path().join("second").exists());
}

#[tokio::test]
async fn of_two_coordinators_one_drives_and_the_other_takes_over_when_it_dies() {
    let h = Harness::new();
    h.job("j", JobState::Running, Phase::Identify, 2).await;
    h.plan("j").await;
    let short = |c: &mut CoordinatorConfig| {
        c.lease_ms = 50;
        c.leader_ms = 400;
    };
    let a = h.coordinator_with("a", short);
    let b = h.coordinator_with("b", short);
    assert_ne!(a.node(), b.node());
    register(&a, "w").await;
    let leased = |t: Task| {
        let store = h.store.clone();
        async move {
            let r = t.task.unwrap();
            let s = &store.shards("j", Stage::Identify).await.unwrap()[r.index().unwrap() as usize];
            (s.state.as_str(), s.attempt) == ("leased", r.attempt)
        }
    };
    let expire = || tokio::time::sleep(std::time::Duration::from_millis(80));

    // a leads and reaps; b follows and touches nothing
    let t = lease(&a, "w").await.unwrap().unwrap();
    expire().await;
    assert!(a.tick().await.unwrap(), "a leads");
    assert!(!b.tick().await.unwrap(), "b follows");
    assert!(!leased(t).await, "the leader reaped the expired lease");
    let t = lease(&b, "w").await.unwrap().unwrap();
    expire().await;
    assert!(!b.tick().await.unwrap());
    assert!(leased(t.clone()).await, "a follower does not reap");
    // a stops (dies, or hangs); once its lease runs out b takes over
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    assert!(b.tick().await.unwrap(), "b took over");
    assert!(!leased(t).await, "the new leader reaped");
    // a comes back: it follows, and its old leadership's writes are refused
    assert!(!a.tick().await.unwrap());
    let stale = h
        .store
        .set_job_state(
            "j",
            JobState::Failed,
            Phase::Identify,
            "stale leader",
            Some(ErrorKind::Runtime),
            1,
            1,
        )
        .await;
    assert!(
        matches!(stale, Err(defuse_coordinator::store::StoreError::Fenced(_))),
        "{stale:?}"
    );
    assert_eq!(
        h.store.get_job("j").await.unwrap().unwrap().state,
        JobState::Running
    );
}

#[tokio::test]
async fn finished_jobs_are_paged_retired_kept_within_retention_and_deleted() {
    let h = Harness::new();
    for i in 0..5u64 {
        let id = format!("done-{i}");
        h.job(&id, JobState::Running, Phase::Finish, 0).await;
        h.store
            .set_job_state(&id, JobState::Done, Phase::Finish, "", None, 10 + i, 1)
            .await
            .unwrap();
        h.artifacts
            .put(&keys::result(&id, files::SUMMARY), "{}".into())
            .await
            .unwrap();
    }
    h.job("live", JobState::Running, Phase::Identify, 1).await;
    h.plan("live").await;
    let c = h.coordinator_with("c", |c| {
        c.keep_jobs = 3;
        c.keep_ms = u64::MAX;
    });

    // pages, in id order
    let ids = |v: Vec<JobRecord>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let (p1, next) = c.jobs_page("", 4).await.unwrap();
    assert_eq!(ids(p1), ["done-0", "done-1", "done-2", "done-3"]);
    assert_eq!(next, "done-3");
    let (p2, next) = c.jobs_page(&next, 4).await.unwrap();
    assert_eq!(ids(p2), ["done-4", "live"]);
    assert_eq!(next, "");

    // a running job is not deleted
    let e = c.delete("live").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.to_string().contains("cancel it first"), "{e:?}");

    // a tick retires the finished jobs (it reads only the active ones from then on)
    // and deletes the oldest beyond the 3 kept, state and artifacts
    assert!(c.tick().await.unwrap());
    assert_eq!(ids(h.store.active_jobs().await.unwrap()), ["live"]);
    assert_eq!(
        h.store.job_ids().await.unwrap(),
        ["done-2", "done-3", "done-4", "live"]
    );
    assert!(h.artifacts.list("jobs/done-0/").await.unwrap().is_empty());
    assert_eq!(h.artifacts.list("jobs/done-2/").await.unwrap().len(), 1);

    // a status carries the report's summary; a listing does not (a page stays small)
    use defuse_proto::job_service_server::JobService;
    let one = JobService::status(
        &c,
        Request::new(StatusRequest {
            job_id: "done-2".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(one.summary_json, "{}");
    let page = JobService::list(
        &c,
        Request::new(ListRequest {
            page_size: 2,
            page_token: String::new(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(page.jobs.len(), 2);
    assert_eq!(page.next_page_token, "done-3");
    assert!(page.jobs.iter().all(|j| j.summary_json.is_empty()));

    // `defuse delete`: state and artifacts
    assert_eq!(c.delete("done-4").await.unwrap(), 1);
    assert_eq!(h.store.get_job("done-4").await.unwrap(), None);
    assert!(h.artifacts.list("jobs/done-4/").await.unwrap().is_empty());
    assert_eq!(
        c.delete("done-4").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}

/// An artifact store whose folder manifests never arrive: a central step that reads
/// one hangs there until it is stopped, and the store sees it stop.
#[derive(Debug)]
struct Stall {
    inner: LocalStore,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl ArtifactStore for Stall {
    async fn put(
        &self,
        key: &str,
        bytes: bytes::Bytes,
    ) -> defuse_core::artifacts::ArtifactResult<()> {
        self.inner.put(key, bytes).await
    }
    async fn get(&self, key: &str) -> defuse_core::artifacts::ArtifactResult<bytes::Bytes> {
        if key.ends_with("folder.json") {
            let _guard = SetOnDrop(self.stopped.clone());
            std::future::pending::<()>().await;
        }
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> defuse_core::artifacts::ArtifactResult<bool> {
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> defuse_core::artifacts::ArtifactResult<Vec<String>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> defuse_core::artifacts::ArtifactResult<()> {
        self.inner.delete(key).await
    }
    fn url(&self) -> String {
        self.inner.url()
    }
}

#[tokio::test]
async fn cancel_stops_a_central_step_under_way() {
    let mut h = Harness::new();
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    h.artifacts = Arc::new(Stall {
        inner: LocalStore::new(h.dir.path().join("artifacts")),
        stopped: stopped.clone(),
    });
    h.job("j", JobState::Running, Phase::Finish, 0).await;
    let c = h.coordinator("c", 3);
    assert!(c.tick().await.unwrap(), "leads, and starts the finish step");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !stopped.load(std::sync::atomic::Ordering::SeqCst),
        "under way"
    );
    defuse_proto::job_service_server::JobService::cancel(
        &c,
        Request::new(CancelRequest { job_id: "j".into() }),
    )
    .await
    .unwrap();
    c.tick().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        stopped.load(std::sync::atomic::Ordering::SeqCst),
        "the central step of the cancelled job goes on"
    );
    assert_eq!(
        h.store.get_job("j").await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert!(h.store.active_jobs().await.unwrap().is_empty());
}

/// An artifact store that is down (every call a retryable I/O error) while `down` is set.
#[derive(Debug)]
struct Flaky {
    inner: LocalStore,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Flaky {
    fn check(&self, key: &str) -> defuse_core::artifacts::ArtifactResult<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(defuse_core::artifacts::ArtifactError::Io {
                store: self.inner.url(),
                key: key.into(),
                msg: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ArtifactStore for Flaky {
    async fn put(
        &self,
        key: &str,
        bytes: bytes::Bytes,
    ) -> defuse_core::artifacts::ArtifactResult<()> {
        self.check(key)?;
        self.inner.put(key, bytes).await
    }
    async fn get(&self, key: &str) -> defuse_core::artifacts::ArtifactResult<bytes::Bytes> {
        self.check(key)?;
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> defuse_core::artifacts::ArtifactResult<bool> {
        self.check(key)?;
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> defuse_core::artifacts::ArtifactResult<Vec<String>> {
        self.check(prefix)?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> defuse_core::artifacts::ArtifactResult<()> {
        self.check(key)?;
        self.inner.delete(key).await
    }
    fn url(&self) -> String {
        self.inner.url()
    }
}

#[tokio::test]
async fn a_store_outage_in_a_central_step_is_retried_and_only_a_real_error_fails_the_job() {
    let mut h = Harness::new();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    h.artifacts = Arc::new(Flaky {
        inner: LocalStore::new(h.dir.path().join("artifacts")),
        down: down.clone(),
    });
    h.job("j", JobState::Running, Phase::Finish, 0).await;
    let c = h.coordinator("c", 3);
    let state = || {
        let store = h.store.clone();
        async move { store.get_job("j").await.unwrap().unwrap() }
    };
    // the finish step cannot read the job folder's copy: tried again later, the job
    // keeps its phase
    assert!(c.tick().await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let j = state().await;
    assert_eq!(
        (j.state, j.step),
        (JobState::Running, Phase::Finish),
        "a store outage failed the job: {}",
        j.error
    );
    // the store is back: after the backoff the step runs again, and this time fails
    // for a reason of its own (this job's data does not exist): that one is fatal
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while state().await.state != JobState::Failed {
        assert!(std::time::Instant::now() < end, "never tried again");
        c.tick().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let j = state().await;
    assert!(j.error.contains("/nowhere"), "{}", j.error);
}

#[tokio::test]
async fn a_fine_tune_round_is_part_of_its_job() {
    let h = Harness::new();
    for j in ["a", "b"] {
        h.job(j, JobState::Running, Phase::FineTune(0), 0).await;
        h.rounds_plan(j, 2).await;
    }
    let c = h.coordinator("c", 2);
    register(&c, "w").await;
    // the driver plans round 0's parts in the job itself: no other job appears
    assert!(c.tick().await.unwrap());
    let ids = h.store.job_ids().await.unwrap();
    assert_eq!(ids, ["a", "b"], "a round is not a job of its own");
    for j in ["a", "b"] {
        let n = h.store.counts(j, Stage::Round(0)).await.unwrap();
        assert_eq!((n.total, n.pending), (2, 2), "{j}");
        assert_eq!(h.store.counts(j, Stage::Identify).await.unwrap().total, 0);
    }
    // a part's task names its round and part, and the round's checkpoint
    let t = lease(&c, "w").await.unwrap().unwrap();
    let r = t.task.clone().unwrap();
    assert_eq!(r.job, "a");
    assert_eq!(
        r.work,
        Some(task_ref::Work::Finetune(FineTunePart { round: 0, part: 0 }))
    );
    let Some(task::Spec::Finetune(spec)) = &t.spec else {
        panic!("not a fine-tune task: {t:?}")
    };
    assert_eq!(spec.checkpoint_key, keys::checkpoint("a", 0, "safetensors"));
    assert_eq!(t.output_key, keys::part_output("a", 0, 0, 1, "safetensors"));
    // the round of another phase cannot be leased or planned
    assert_eq!(
        h.store
            .lease("a", Stage::Round(1), "w", 10, 1000)
            .await
            .unwrap(),
        None
    );
    h.store
        .plan_shards("a", Stage::Round(1), 2, 10, 99)
        .await
        .unwrap();
    assert_eq!(h.store.counts("a", Stage::Round(1)).await.unwrap().total, 0);

    // a part that fails for good fails its job at once (max_attempts = 2)
    let fatal = |t: Task| {
        let c = c.clone();
        async move {
            WorkerService::fail(
                &c,
                Request::new(FailRequest {
                    worker_id: "w".into(),
                    task: t.task,
                    error: Some(TaskError {
                        kind: FailureKind::Execution as i32,
                        retryable: false,
                        message: "NaN loss".into(),
                    }),
                }),
            )
            .await
            .unwrap()
        }
    };
    fatal(t).await;
    let a = h.store.get_job("a").await.unwrap().unwrap();
    assert_eq!(a.state, JobState::Failed);
    assert_eq!(a.error, "round 0 part 0 failed on attempt 1: NaN loss");
    // the other part's worker is told to stop: the job has ended
    let t = lease(&c, "w").await.unwrap().unwrap();
    assert_eq!(
        t.task.as_ref().unwrap().job,
        "b",
        "a failed job leases nothing"
    );

    // cancelling a job during a round ends the round's parts: nothing stays pending
    // or leased, and the worker holding one is told to abandon it
    defuse_proto::job_service_server::JobService::cancel(
        &c,
        Request::new(CancelRequest { job_id: "b".into() }),
    )
    .await
    .unwrap();
    let n = h.store.counts("b", Stage::Round(0)).await.unwrap();
    assert_eq!((n.pending, n.leased, n.failed), (0, 0, 2), "{n:?}");
    let hb = WorkerService::heartbeat(
        &c,
        Request::new(HeartbeatRequest {
            worker_id: "w".into(),
            running: vec![t.task.clone().unwrap()],
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(hb.verdicts, [TaskVerdict::Abandon as i32]);

    // deleting the job removes its rounds with it
    c.tick().await.unwrap();
    c.delete("b").await.unwrap();
    assert!(matches!(
        h.store.counts("b", Stage::Round(0)).await,
        Err(defuse_coordinator::store::StoreError::Lost(_))
    ));
}
