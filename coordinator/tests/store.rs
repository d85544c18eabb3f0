//! One suite, two state stores: memory and a real Redis started for the test. Times
//! are passed in, so lease expiry is tested without sleeping.
use std::sync::Arc;

use defuse_coordinator::store::memory::MemoryStore;
use defuse_coordinator::store::redis::RedisStore;
use defuse_coordinator::store::*;
use defuse_testkit::Redis;

fn job(id: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        name: "n".into(),
        state: JobState::Running,
        step: "identify".into(),
        config_toml: "x = 1".into(),
        n_shards: 0,
        error: String::new(),
        created_ms: 1,
        updated_ms: 1,
    }
}

async fn suite(s: Arc<dyn StateStore>) {
    let t0 = 1_000_000u64;
    s.create_job(&job("a")).await.unwrap();
    assert!(matches!(
        s.create_job(&job("a")).await,
        Err(StoreError::Exists(_))
    ));
    s.plan_shards("a", 3, t0).await.unwrap();
    s.plan_shards("a", 5, t0).await.unwrap(); // idempotent
    assert_eq!(s.get_job("a").await.unwrap().unwrap().n_shards, 3);
    assert_eq!(
        s.counts("a").await.unwrap(),
        ShardCounts {
            total: 3,
            pending: 3,
            ..Default::default()
        }
    );

    // leases in order, attempt 1, until none is left
    let l0 = s.lease("a", "w1", t0, 100).await.unwrap().unwrap();
    assert_eq!((l0.shard, l0.attempt, l0.deadline_ms), (0, 1, t0 + 100));
    let l1 = s.lease("a", "w2", t0, 100).await.unwrap().unwrap();
    let l2 = s.lease("a", "w1", t0, 100).await.unwrap().unwrap();
    assert_eq!((l1.shard, l2.shard), (1, 2));
    assert_eq!(s.lease("a", "w3", t0, 100).await.unwrap(), None);

    // fencing: another owner or attempt is stale
    assert_eq!(
        s.complete("a", 0, "w2", 1, "k").await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        s.complete("a", 0, "w1", 2, "k").await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        s.renew("a", 0, "w1", 1, t0 + 50, 100).await.unwrap(),
        Fenced::Accepted
    );
    assert_eq!(
        s.complete("a", 0, "w1", 1, "jobs/a/0/1").await.unwrap(),
        Fenced::Accepted
    );
    assert_eq!(
        s.complete("a", 0, "w1", 1, "jobs/a/0/1").await.unwrap(),
        Fenced::Stale,
        "accepted once"
    );

    // expiry: shard 1 (deadline t0+100) and 2 expire at t0+120; shard 0 is done
    let mut exp = s.reap("a", t0 + 120, 3).await.unwrap();
    exp.sort_by_key(|e| e.shard);
    assert_eq!(
        exp.iter()
            .map(|e| (e.shard, e.attempt, e.owner.as_str(), e.requeued))
            .collect::<Vec<_>>(),
        vec![(1, 1, "w2", true), (2, 1, "w1", true)]
    );
    assert!(
        s.reap("a", t0 + 120, 3).await.unwrap().is_empty(),
        "one reaper pass only"
    );
    // the old owner's completion is now stale
    assert_eq!(
        s.complete("a", 1, "w2", 1, "late").await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        s.renew("a", 1, "w2", 1, t0 + 130, 100).await.unwrap(),
        Fenced::Stale
    );
    let c = s.counts("a").await.unwrap();
    assert_eq!((c.pending, c.leased, c.done), (2, 0, 1));

    // retryable failure requeues, until the attempts run out
    let l = s.lease("a", "w3", t0 + 200, 100).await.unwrap().unwrap();
    assert_eq!((l.shard, l.attempt), (1, 2));
    assert_eq!(
        s.fail("a", 1, "w9", 2, true, "x", 3).await.unwrap(),
        FailOutcome::Stale
    );
    assert_eq!(
        s.fail("a", 1, "w3", 2, true, "io hiccup", 3).await.unwrap(),
        FailOutcome::Requeued
    );
    let l = s.lease("a", "w3", t0 + 300, 100).await.unwrap().unwrap();
    assert_eq!((l.shard, l.attempt), (2, 2));
    assert_eq!(
        s.complete("a", 2, "w3", 2, "jobs/a/2/2").await.unwrap(),
        Fenced::Accepted
    );
    let l = s.lease("a", "w3", t0 + 300, 100).await.unwrap().unwrap();
    assert_eq!((l.shard, l.attempt), (1, 3));
    assert_eq!(
        s.fail("a", 1, "w3", 3, true, "model broken", 3)
            .await
            .unwrap(),
        FailOutcome::JobFailed
    );
    let j = s.get_job("a").await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.error.contains("shard 1") && j.error.contains("model broken"),
        "{}",
        j.error
    );
    // a final state is never left
    s.set_job_state("a", JobState::Running, "identify", "", t0)
        .await
        .unwrap();
    assert_eq!(
        s.get_job("a").await.unwrap().unwrap().state,
        JobState::Failed
    );
    let sh = s.shards("a").await.unwrap();
    assert_eq!(
        sh.iter().map(|x| x.accepted).collect::<Vec<_>>(),
        vec![1, 0, 1]
    );
    assert_eq!(sh[2].output, "jobs/a/2/2");

    // a non-retryable failure fails at once; lease expiry out of attempts fails too
    s.create_job(&job("b")).await.unwrap();
    s.plan_shards("b", 2, t0).await.unwrap();
    let l = s.lease("b", "w", t0, 10).await.unwrap().unwrap();
    assert_eq!(
        s.fail("b", l.shard, "w", 1, false, "bad config", 3)
            .await
            .unwrap(),
        FailOutcome::JobFailed
    );
    s.create_job(&job("c")).await.unwrap();
    s.plan_shards("c", 1, t0).await.unwrap();
    for k in 1..=2u64 {
        let l = s.lease("c", "w", t0 + 100 * k, 10).await.unwrap().unwrap();
        assert_eq!(l.attempt as u64, k);
        let e = s.reap("c", t0 + 100 * k + 20, 2).await.unwrap();
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
    s.plan_shards("d", 2, t0).await.unwrap();
    assert_eq!(s.lease("d", "w", t0, 10).await.unwrap(), None);
    s.set_job_state("d", JobState::Running, "identify", "", t0)
        .await
        .unwrap();
    let l = s.lease("d", "w", t0, 10).await.unwrap().unwrap();
    s.cancel("d", t0 + 1).await.unwrap();
    let c = s.counts("d").await.unwrap();
    assert_eq!((c.pending, c.leased), (0, 0));
    assert_eq!(
        s.get_job("d").await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        s.complete("d", l.shard, "w", l.attempt, "k").await.unwrap(),
        Fenced::Stale
    );
    assert!(s.reap("d", t0 + 1000, 3).await.unwrap().is_empty());

    // unknown jobs are lost, not silently empty
    assert!(matches!(
        s.lease("zz", "w", t0, 10).await,
        Err(StoreError::Lost(_))
    ));
    assert!(matches!(
        s.complete("zz", 0, "w", 1, "k").await,
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
    assert_eq!(ids, ["a", "b", "c", "d"]);

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
}

#[tokio::test]
async fn memory_store() {
    suite(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn redis_store() {
    let r = Redis::start(false);
    suite(Arc::new(RedisStore::connect(&r.url()).await.unwrap())).await;
}

#[tokio::test]
async fn redis_restart_with_aof_keeps_state_and_a_flush_loses_it_loudly() {
    let mut r = Redis::start(true);
    let s = RedisStore::connect(&r.url()).await.unwrap();
    s.create_job(&job("j")).await.unwrap();
    s.plan_shards("j", 2, 10).await.unwrap();
    let l = s.lease("j", "w", 10, 1000).await.unwrap().unwrap();
    r.restart();
    // the connection manager reconnects; scripts are loaded again (NOSCRIPT)
    let mut ok = None;
    for _ in 0..50 {
        match s.complete("j", l.shard, "w", l.attempt, "out").await {
            Ok(f) => {
                ok = Some(f);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert_eq!(ok, Some(Fenced::Accepted), "state survived the restart");
    assert_eq!(s.counts("j").await.unwrap().done, 1);
    // a server that lost everything
    let mut c = ::redis::Client::open(r.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = ::redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    assert!(matches!(
        s.lease("j", "w", 20, 1000).await,
        Err(StoreError::Lost(_))
    ));
    assert!(matches!(s.counts("j").await, Err(StoreError::Lost(_))));
    r.stop();
}
