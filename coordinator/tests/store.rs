//! One suite, two state stores: memory and a real Redis started for the test. Times
//! are passed in, so lease expiry is tested without sleeping.
use std::sync::Arc;

use defuse_coordinator::store::memory::MemoryStore;
use defuse_coordinator::store::redis::RedisStore;
use defuse_coordinator::store::*;
use defuse_testkit::Redis;

/// An output's SHA-256 as a worker reports it.
const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn job(id: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        name: "n".into(),
        state: JobState::Running,
        step: Phase::Identify,
        config_toml: "x = 1".into(),
        n_shards: 0,
        error: String::new(),
        error_kind: None,
        created_ms: 1,
        updated_ms: 1,
        trace_parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    }
}

/// Attempt `attempt` of shard `shard` of `job`, held by `worker`.
fn at<'a>(job: &'a str, shard: u32, worker: &'a str, attempt: u32) -> Attempt<'a> {
    Attempt {
        job,
        stage: Stage::Identify,
        shard,
        attempt,
        worker,
    }
}

/// Attempt `attempt` of part `part` of fine-tune round `round` of `job`.
fn part<'a>(job: &'a str, round: u32, part: u32, worker: &'a str, attempt: u32) -> Attempt<'a> {
    Attempt {
        stage: Stage::Round(round),
        ..at(job, part, worker, attempt)
    }
}

async fn suite(s: Arc<dyn StateStore>) {
    let t0 = 1_000_000u64;
    s.create_job(&job("a")).await.unwrap();
    assert!(matches!(
        s.create_job(&job("a")).await,
        Err(StoreError::Exists(_))
    ));
    s.plan_shards("a", Stage::Identify, 3, t0, 1).await.unwrap();
    s.plan_shards("a", Stage::Identify, 5, t0, 1).await.unwrap(); // idempotent
    assert_eq!(s.get_job("a").await.unwrap().unwrap().n_shards, 3);
    // the record comes back whole, its trace context with it
    assert_eq!(
        s.get_job("a").await.unwrap().unwrap().trace_parent,
        job("a").trace_parent
    );
    assert_eq!(
        s.counts("a", Stage::Identify).await.unwrap(),
        ShardCounts {
            total: 3,
            pending: 3,
            ..Default::default()
        }
    );

    // leases in order, attempt 1, until none is left
    let l0 = s
        .lease("a", Stage::Identify, "w1", t0, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((l0.shard, l0.attempt, l0.deadline_ms), (0, 1, t0 + 100));
    let l1 = s
        .lease("a", Stage::Identify, "w2", t0, 100)
        .await
        .unwrap()
        .unwrap();
    let l2 = s
        .lease("a", Stage::Identify, "w1", t0, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((l1.shard, l2.shard), (1, 2));
    assert_eq!(
        s.lease("a", Stage::Identify, "w3", t0, 100).await.unwrap(),
        None
    );

    // fencing: another owner or attempt is stale
    assert_eq!(
        s.complete(&at("a", 0, "w2", 1), "k", SHA).await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        s.complete(&at("a", 0, "w1", 2), "k", SHA).await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        s.renew(&at("a", 0, "w1", 1), t0 + 50, 100).await.unwrap(),
        Fenced::Accepted
    );
    assert_eq!(
        s.complete(&at("a", 0, "w1", 1), "jobs/a/0/1", SHA)
            .await
            .unwrap(),
        Fenced::Accepted
    );
    // a completion retried after its reply was lost is accepted again, counted once
    assert_eq!(
        s.complete(&at("a", 0, "w1", 1), "jobs/a/0/1", SHA)
            .await
            .unwrap(),
        Fenced::Accepted,
        "the same owner, attempt and output: idempotent"
    );
    assert_eq!(
        s.complete(&at("a", 0, "w1", 1), "jobs/a/0/other", SHA)
            .await
            .unwrap(),
        Fenced::Stale,
        "another output of a done shard"
    );
    // the output's hash is recorded with it, for the readers to check
    let done = &s.shards("a", Stage::Identify).await.unwrap()[0];
    assert_eq!(
        (done.output.as_str(), done.output_sha256.as_str()),
        ("jobs/a/0/1", SHA)
    );

    // expiry: shard 1 (deadline t0+100) and 2 expire at t0+120; shard 0 is done
    let mut exp = s.reap("a", Stage::Identify, t0 + 120, 3, 1).await.unwrap();
    exp.sort_by_key(|e| e.shard);
    assert_eq!(
        exp.iter()
            .map(|e| (e.shard, e.attempt, e.owner.as_str(), e.requeued))
            .collect::<Vec<_>>(),
        vec![(1, 1, "w2", true), (2, 1, "w1", true)]
    );
    assert!(
        s.reap("a", Stage::Identify, t0 + 120, 3, 1)
            .await
            .unwrap()
            .is_empty(),
        "one reaper pass only"
    );
    // the old owner's completion is now stale
    assert_eq!(
        s.complete(&at("a", 1, "w2", 1), "late", SHA).await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        s.renew(&at("a", 1, "w2", 1), t0 + 130, 100).await.unwrap(),
        Fenced::Stale
    );
    let c = s.counts("a", Stage::Identify).await.unwrap();
    assert_eq!((c.pending, c.leased, c.done), (2, 0, 1));

    // retryable failure requeues, until the attempts run out
    let l = s
        .lease("a", Stage::Identify, "w3", t0 + 200, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((l.shard, l.attempt), (1, 2));
    assert_eq!(
        s.fail(&at("a", 1, "w9", 2), Failure::Retryable, "x", 3)
            .await
            .unwrap(),
        FailOutcome::Stale
    );
    assert_eq!(
        s.fail(&at("a", 1, "w3", 2), Failure::Retryable, "io hiccup", 3)
            .await
            .unwrap(),
        FailOutcome::Requeued
    );
    let l = s
        .lease("a", Stage::Identify, "w3", t0 + 300, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((l.shard, l.attempt), (2, 2));
    assert_eq!(
        s.complete(&at("a", 2, "w3", 2), "jobs/a/2/2", SHA)
            .await
            .unwrap(),
        Fenced::Accepted
    );
    let l = s
        .lease("a", Stage::Identify, "w3", t0 + 300, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((l.shard, l.attempt), (1, 3));
    assert_eq!(
        s.fail(&at("a", 1, "w3", 3), Failure::Retryable, "model broken", 3)
            .await
            .unwrap(),
        FailOutcome::JobFailed
    );
    let j = s.get_job("a").await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    // a shard that fails for good is not the job's input at fault (as far as the
    // store knows): the central steps say when it is
    assert_eq!(j.error_kind, Some(ErrorKind::Runtime));
    assert!(
        j.error.contains("shard 1") && j.error.contains("model broken"),
        "{}",
        j.error
    );
    // a final state is never left
    s.set_job_state("a", JobState::Running, Phase::Identify, "", None, t0, 1)
        .await
        .unwrap();
    assert_eq!(
        s.get_job("a").await.unwrap().unwrap().state,
        JobState::Failed
    );
    let sh = s.shards("a", Stage::Identify).await.unwrap();
    assert_eq!(
        sh.iter().map(|x| x.accepted).collect::<Vec<_>>(),
        vec![1, 0, 1]
    );
    assert_eq!(sh[2].output, "jobs/a/2/2");

    // a non-retryable failure fails at once; lease expiry out of attempts fails too
    s.create_job(&job("b")).await.unwrap();
    s.plan_shards("b", Stage::Identify, 2, t0, 1).await.unwrap();
    let l = s
        .lease("b", Stage::Identify, "w", t0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.fail(&at("b", l.shard, "w", 1), Failure::Fatal, "bad config", 3)
            .await
            .unwrap(),
        FailOutcome::JobFailed
    );
    s.create_job(&job("c")).await.unwrap();
    s.plan_shards("c", Stage::Identify, 1, t0, 1).await.unwrap();
    for k in 1..=2u64 {
        let l = s
            .lease("c", Stage::Identify, "w", t0 + 100 * k, 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.attempt as u64, k);
        let e = s
            .reap("c", Stage::Identify, t0 + 100 * k + 20, 2, 1)
            .await
            .unwrap();
        assert_eq!(e[0].requeued, k < 2);
    }
    assert_eq!(
        s.get_job("c").await.unwrap().unwrap().state,
        JobState::Failed
    );
    assert!(s
        .get_job("c")
        .await
        .unwrap()
        .unwrap()
        .error
        .contains("lease expired 2 times"));

    // no leases from a job that is not running; cancel clears leases
    s.create_job(&JobRecord {
        state: JobState::Queued,
        ..job("d")
    })
    .await
    .unwrap();
    s.plan_shards("d", Stage::Identify, 2, t0, 1).await.unwrap();
    assert_eq!(
        s.counts("d", Stage::Identify).await.unwrap().total,
        0,
        "planned only when running"
    );
    assert_eq!(
        s.lease("d", Stage::Identify, "w", t0, 10).await.unwrap(),
        None
    );
    s.set_job_state("d", JobState::Running, Phase::Identify, "", None, t0, 1)
        .await
        .unwrap();
    s.plan_shards("d", Stage::Identify, 2, t0, 1).await.unwrap();
    let l = s
        .lease("d", Stage::Identify, "w", t0, 10)
        .await
        .unwrap()
        .unwrap();
    s.cancel("d", t0 + 1).await.unwrap();
    let c = s.counts("d", Stage::Identify).await.unwrap();
    assert_eq!((c.pending, c.leased), (0, 0));
    assert_eq!(
        s.get_job("d").await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        s.complete(&at("d", l.shard, "w", l.attempt), "k", SHA)
            .await
            .unwrap(),
        Fenced::Stale
    );
    assert!(s
        .reap("d", Stage::Identify, t0 + 1000, 3, 1)
        .await
        .unwrap()
        .is_empty());

    // a job cancelled while its plan was being made gets no shards: nothing is left
    // pending for workers (cancel during the models step)
    s.create_job(&JobRecord {
        step: Phase::Models,
        ..job("e")
    })
    .await
    .unwrap();
    s.cancel("e", t0).await.unwrap();
    s.plan_shards("e", Stage::Identify, 4, t0, 1).await.unwrap();
    assert_eq!(s.counts("e", Stage::Identify).await.unwrap().total, 0);
    assert_eq!(
        s.lease("e", Stage::Identify, "w", t0, 10).await.unwrap(),
        None
    );

    // a hand-back (worker shutting down) requeues without using up a try
    s.create_job(&job("f")).await.unwrap();
    s.plan_shards("f", Stage::Identify, 1, t0, 1).await.unwrap();
    for k in 1..=3u32 {
        let l = s
            .lease("f", Stage::Identify, "w", t0, 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.attempt, k);
        assert_eq!(
            s.fail(&at("f", 0, "w", k), Failure::HandBack, "shutting down", 2)
                .await
                .unwrap(),
            FailOutcome::Requeued,
            "hand-back {k} with max_attempts 2"
        );
    }
    let sh = s.shards("f", Stage::Identify).await.unwrap();
    assert_eq!((sh[0].attempt, sh[0].handbacks), (3, 3));
    // the tries still count: 2 real ones after 3 hand-backs
    let l = s
        .lease("f", Stage::Identify, "w", t0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.fail(&at("f", 0, "w", l.attempt), Failure::Retryable, "io", 2)
            .await
            .unwrap(),
        FailOutcome::Requeued
    );
    let l = s
        .lease("f", Stage::Identify, "w", t0 + 100, 10)
        .await
        .unwrap()
        .unwrap();
    let e = s.reap("f", Stage::Identify, t0 + 200, 2, 1).await.unwrap();
    assert_eq!((e[0].attempt, e[0].requeued), (l.attempt, false));
    assert_eq!(
        s.get_job("f").await.unwrap().unwrap().state,
        JobState::Failed
    );

    // labels are stored once: a second set is refused, the first is kept
    assert_eq!(s.labels("a").await.unwrap(), None);
    assert!(s.put_labels("a", "{\"0\": 3}").await.unwrap());
    assert!(!s.put_labels("a", "{\"0\": 4}").await.unwrap());
    assert_eq!(s.labels("a").await.unwrap().as_deref(), Some("{\"0\": 3}"));
    assert!(matches!(
        s.put_labels("zz", "{}").await,
        Err(StoreError::Lost(_))
    ));

    // unknown jobs are lost, not silently empty
    assert!(matches!(
        s.lease("zz", Stage::Identify, "w", t0, 10).await,
        Err(StoreError::Lost(_))
    ));
    assert!(matches!(
        s.complete(&at("zz", 0, "w", 1), "k", SHA).await,
        Err(StoreError::Lost(_))
    ));
    assert_eq!(s.get_job("zz").await.unwrap(), None);
    let mut ids: Vec<String> = s
        .list_jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c", "d", "e", "f"]);

    // one leader at a time; a new leader gets a newer token, and a job refuses the
    // writes of a leader older than the newest that wrote to it
    let t1 = s.lead("n1", t0, 100).await.unwrap().expect("n1 leads");
    assert_eq!(
        s.lead("n1", t0 + 50, 100).await.unwrap(),
        Some(t1),
        "renewed"
    );
    assert_eq!(
        s.lead("n2", t0 + 120, 100).await.unwrap(),
        None,
        "n1's lease holds"
    );
    let t2 = s
        .lead("n2", t0 + 151, 100)
        .await
        .unwrap()
        .expect("n1's lease expired");
    assert!(t2 > t1);
    assert_eq!(
        s.lead("n1", t0 + 160, 100).await.unwrap(),
        None,
        "n1 lost it"
    );
    s.resign("n1").await.unwrap(); // not the leader: nothing changes
    assert_eq!(s.lead("n1", t0 + 161, 100).await.unwrap(), None);
    s.resign("n2").await.unwrap(); // the leader shuts down: another takes over at once
    let t3 = s
        .lead("n1", t0 + 162, 100)
        .await
        .unwrap()
        .expect("n2 resigned");
    assert!(t3 > t2);
    assert_eq!(s.lead("n2", t0 + 163, 100).await.unwrap(), None);
    s.create_job(&JobRecord {
        step: Phase::Models,
        ..job("g")
    })
    .await
    .unwrap();
    s.set_job_state("g", JobState::Running, Phase::Models, "", None, t0, t1)
        .await
        .unwrap();
    s.plan_shards("g", Stage::Identify, 2, t0, t2)
        .await
        .unwrap();
    for refused in [
        s.set_job_state(
            "g",
            JobState::Failed,
            Phase::Models,
            "stale",
            Some(ErrorKind::Runtime),
            t0,
            t1,
        )
        .await
        .map(|_| ()),
        s.plan_shards("g", Stage::Identify, 9, t0, t1).await,
        s.reap("g", Stage::Identify, t0, 3, t1).await.map(|_| ()),
    ] {
        assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    }
    let g = s.get_job("g").await.unwrap().unwrap();
    assert_eq!((g.state, g.n_shards), (JobState::Running, 2));
    s.set_job_state("g", JobState::Running, Phase::Identify, "", None, t0, t2)
        .await
        .unwrap();

    // workers
    assert!(!s.touch_worker("w1", t0).await.unwrap());
    s.register_worker("w1", "{\"device\":\"cpu\"}", t0)
        .await
        .unwrap();
    assert!(s.touch_worker("w1", t0 + 5).await.unwrap());
    let w = s.workers().await.unwrap();
    assert_eq!(
        w,
        vec![("w1".to_string(), "{\"device\":\"cpu\"}".to_string(), t0 + 5)]
    );

    // the driver reads the active jobs only; retired ones wait for retention or delete
    let ids = |v: Vec<JobRecord>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.active_jobs().await.unwrap()),
        ["a", "b", "c", "d", "e", "f", "g"]
    );
    for (id, t) in [("a", 100), ("b", 200), ("c", 300)] {
        s.retire(id, Some(t)).await.unwrap();
    }
    assert_eq!(ids(s.active_jobs().await.unwrap()), ["d", "e", "f", "g"]);
    assert_eq!(s.finished_count().await.unwrap(), 3);
    assert_eq!(s.expired_jobs(150, 10).await.unwrap(), ["a"], "by age");
    assert_eq!(s.expired_jobs(0, 1).await.unwrap(), ["a", "b"], "by count");
    assert!(s.expired_jobs(100, 3).await.unwrap().is_empty());
    s.delete_job("a").await.unwrap();
    assert_eq!(s.get_job("a").await.unwrap(), None);
    assert_eq!(
        s.labels("a").await.unwrap(),
        None,
        "its labels went with it"
    );
    assert_eq!(s.job_ids().await.unwrap(), ["b", "c", "d", "e", "f", "g"]);
    assert_eq!(s.finished_count().await.unwrap(), 2);
    assert!(matches!(
        s.shards("a", Stage::Identify).await,
        Err(StoreError::Lost(_))
    ));

    // a job failed for its input says so, and the kind survives a read
    s.create_job(&job("k")).await.unwrap();
    s.set_job_state(
        "k",
        JobState::Failed,
        Phase::Models,
        "model c.pt: 5 classes, the data has 10",
        Some(ErrorKind::Input),
        t0,
        1,
    )
    .await
    .unwrap();
    let k = s.get_job("k").await.unwrap().unwrap();
    assert_eq!(
        (k.state, k.error_kind),
        (JobState::Failed, Some(ErrorKind::Input))
    );
    s.delete_job("k").await.unwrap();

    rounds(&*s, t0).await;
}

/// A fine-tune round's parts are a shard set of their job: planned and leased only
/// while the job is in that round, apart from the identify shards; a part that fails
/// for good fails the job; cancel and delete take the round with the job.
async fn rounds(s: &dyn StateStore, t0: u64) {
    let r0 = Stage::Round(0);
    let r1 = Stage::Round(1);
    s.create_job(&JobRecord {
        step: Phase::FineTune(0),
        ..job("h")
    })
    .await
    .unwrap();
    s.plan_shards("h", r1, 2, t0, 9).await.unwrap();
    assert_eq!(s.counts("h", r1).await.unwrap().total, 0, "not its round");
    // each round's checkpoint hash is recorded, beside the job (not in the bucket)
    assert_eq!(s.checkpoint_sha256("h", 0).await.unwrap(), None);
    s.put_checkpoint_sha256("h", 0, SHA).await.unwrap();
    s.put_checkpoint_sha256("h", 0, SHA).await.unwrap(); // a step run again
    assert_eq!(
        s.checkpoint_sha256("h", 0).await.unwrap().as_deref(),
        Some(SHA)
    );
    assert_eq!(s.checkpoint_sha256("h", 1).await.unwrap(), None);
    assert!(matches!(
        s.put_checkpoint_sha256("no-such-job", 0, SHA).await,
        Err(StoreError::Lost(_))
    ));
    s.plan_shards("h", r0, 2, t0, 9).await.unwrap();
    s.plan_shards("h", r0, 5, t0, 9).await.unwrap(); // idempotent
    assert_eq!(s.counts("h", r0).await.unwrap().total, 2);
    assert_eq!(s.get_job("h").await.unwrap().unwrap().n_shards, 0);
    assert_eq!(s.counts("h", Stage::Identify).await.unwrap().total, 0);
    assert_eq!(
        s.lease("h", Stage::Identify, "w", t0, 10).await.unwrap(),
        None
    );
    for p in 0..2 {
        let l = s.lease("h", r0, "w", t0, 10).await.unwrap().unwrap();
        assert_eq!((l.shard, l.attempt), (p, 1));
        // an identify attempt of the same number is another shard: stale
        assert_eq!(
            s.complete(&at("h", p, "w", 1), "x", SHA).await.unwrap(),
            Fenced::Stale
        );
        assert_eq!(
            s.complete(&part("h", 0, p, "w", 1), &format!("r0/{p}"), SHA)
                .await
                .unwrap(),
            Fenced::Accepted
        );
    }
    assert_eq!(s.counts("h", r0).await.unwrap().done, 2);
    // the next round: round 0 is over, round 1 leases
    s.set_job_state("h", JobState::Running, Phase::FineTune(1), "", None, t0, 9)
        .await
        .unwrap();
    assert_eq!(s.lease("h", r0, "w", t0, 10).await.unwrap(), None);
    s.plan_shards("h", r1, 3, t0, 9).await.unwrap();
    let l = s.lease("h", r1, "w", t0, 10).await.unwrap().unwrap();
    assert_eq!((l.shard, l.attempt), (0, 1));
    assert_eq!(
        s.shards("h", r0).await.unwrap()[1].output,
        "r0/1",
        "a round's results stay"
    );
    // its lease expires with no tries left: the job fails, naming the part
    let e = s.reap("h", r1, t0 + 100, 1, 9).await.unwrap();
    assert_eq!((e.len(), e[0].requeued), (1, false));
    let h = s.get_job("h").await.unwrap().unwrap();
    assert_eq!(h.state, JobState::Failed);
    assert!(
        h.error.starts_with("round 1 part 0 failed: lease expired"),
        "{}",
        h.error
    );

    // cancel during a round ends its parts; their holders' renewals are refused
    s.create_job(&JobRecord {
        step: Phase::FineTune(2),
        ..job("i")
    })
    .await
    .unwrap();
    s.plan_shards("i", Stage::Round(2), 3, t0, 9).await.unwrap();
    let l = s
        .lease("i", Stage::Round(2), "w", t0, 10)
        .await
        .unwrap()
        .unwrap();
    s.cancel("i", t0 + 1).await.unwrap();
    let c = s.counts("i", Stage::Round(2)).await.unwrap();
    assert_eq!((c.pending, c.leased, c.failed), (0, 0, 3));
    assert_eq!(
        s.renew(&part("i", 2, l.shard, "w", l.attempt), t0 + 2, 10)
            .await
            .unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        s.lease("i", Stage::Round(2), "w", t0, 10).await.unwrap(),
        None
    );

    // a failed job's holders are told to stop too
    s.create_job(&job("k")).await.unwrap();
    s.plan_shards("k", Stage::Identify, 2, t0, 9).await.unwrap();
    let l0 = s
        .lease("k", Stage::Identify, "w", t0, 10)
        .await
        .unwrap()
        .unwrap();
    let l1 = s
        .lease("k", Stage::Identify, "v", t0, 10)
        .await
        .unwrap()
        .unwrap();
    s.fail(&at("k", l0.shard, "w", 1), Failure::Fatal, "bad", 3)
        .await
        .unwrap();
    assert_eq!(
        s.renew(&at("k", l1.shard, "v", 1), t0 + 1, 10)
            .await
            .unwrap(),
        Fenced::Stale
    );

    // delete takes every round with the job
    for id in ["h", "i", "k"] {
        s.delete_job(id).await.unwrap();
        assert!(matches!(s.counts(id, r1).await, Err(StoreError::Lost(_))));
    }
}

#[tokio::test]
async fn memory_store() {
    suite(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn redis_store() {
    let r = Redis::start(false);
    suite(Arc::new(RedisStore::connect(&r.url()).await.unwrap())).await;
    // nothing is left of the jobs deleted, rounds included
    let mut c = ::redis::Client::open(r.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for id in ["a", "h", "i", "k"] {
        let left: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{{job:{id}}}*"))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(left.is_empty(), "{id}: {left:?}");
    }
    let round_keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*:round:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(round_keys.is_empty(), "{round_keys:?}");
}

#[tokio::test]
async fn redis_restart_with_aof_keeps_state_and_a_flush_loses_it_loudly() {
    let mut r = Redis::start(true);
    let s = RedisStore::connect(&r.url()).await.unwrap();
    s.create_job(&job("j")).await.unwrap();
    s.plan_shards("j", Stage::Identify, 2, 10, 1).await.unwrap();
    let l = s
        .lease("j", Stage::Identify, "w", 10, 1000)
        .await
        .unwrap()
        .unwrap();
    r.restart();
    // the connection manager reconnects; scripts are loaded again (NOSCRIPT)
    let mut ok = None;
    for _ in 0..50 {
        match s
            .complete(&at("j", l.shard, "w", l.attempt), "out", SHA)
            .await
        {
            Ok(f) => {
                ok = Some(f);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert_eq!(ok, Some(Fenced::Accepted), "state survived the restart");
    assert_eq!(s.counts("j", Stage::Identify).await.unwrap().done, 1);
    // a server that lost everything
    let mut c = ::redis::Client::open(r.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = ::redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    assert!(matches!(
        s.lease("j", Stage::Identify, "w", 20, 1000).await,
        Err(StoreError::Lost(_))
    ));
    assert!(matches!(
        s.counts("j", Stage::Identify).await,
        Err(StoreError::Lost(_))
    ));
    r.stop();
}

#[tokio::test]
async fn redis_drops_the_round_sub_jobs_of_older_releases() {
    let r = Redis::start(false);
    let mut c = ::redis::Client::open(r.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // what a release before schema 3 left: a round kept as a job of its own, and a
    // job whose step this release cannot read
    for (id, step) in [("j--round-0", "finetune-part"), ("odd", "some-future-step")] {
        let _: () = ::redis::cmd("HSET")
            .arg(format!("{{job:{id}}}:meta"))
            .arg(&["id", id, "name", id, "state", "running", "step", step])
            .query_async(&mut c)
            .await
            .unwrap();
        for set in ["defuse:jobs", "defuse:jobs:active"] {
            let _: () = ::redis::cmd("SADD")
                .arg(set)
                .arg(id)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }
    let _: () = ::redis::cmd("SET")
        .arg("defuse:schema")
        .arg(2)
        .query_async(&mut c)
        .await
        .unwrap();
    let s = RedisStore::connect(&r.url()).await.unwrap();
    assert_eq!(s.job_ids().await.unwrap(), ["odd"], "the old round is gone");
    assert_eq!(s.get_job("j--round-0").await.unwrap(), None);
    // a job in a phase this release cannot read can still be cancelled
    s.cancel("odd", 5).await.unwrap();
    assert_eq!(
        s.get_job("odd").await.unwrap().unwrap().state,
        JobState::Cancelled
    );
}
