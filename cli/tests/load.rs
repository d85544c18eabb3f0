//! Load: 50 simulated workers (gRPC clients that complete at once, no compute)
//! against one coordinator process on Redis, for a job of 10,000 shards. Every shard
//! must be accepted exactly once, and the coordinator's memory must stay bounded. The
//! lease and completion latencies are printed (p50/p99), never asserted; `make bench`
//! measures them properly.
use std::time::Duration;

use defuse_testkit::load::{quantile, simulate_workers};
use defuse_testkit::rss_kib;

mod common;
use common::*;

#[test]
fn fifty_workers_ten_thousand_shards_each_accepted_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fx = repo().join("core/tests/fixtures");
    let cfg = dir.join("load.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
name = "load"
[data]
path = "{data}"
limit_test = 10000
[models]
classifier = "{fx}/classifier_ok.pt"
vae = "{fx}/encoder_ok.pt"
vae_decoder = "{fx}/decoder_ok.pt"
[identify]
search = "all"
hold_out = 0
shard_size = 1
"#,
            data = repo().join("data/mnist").display(),
            fx = fx.display()
        ),
    )
    .unwrap();
    let c = Cluster::start(dir);
    let pid = c.coordinator.as_ref().unwrap().pid();
    let rss_start = rss_kib(pid).unwrap();
    let job = c.submit(&cfg);
    c.wait_for(
        &job,
        "10,000 shards planned",
        Duration::from_secs(120),
        |s| identify(s)["shards"]["total"] == 10000,
    );
    let rss_planned = rss_kib(pid).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt
        .block_on(simulate_workers(
            &c.url(),
            None,
            50,
            10_000,
            Duration::from_secs(300),
        ))
        .unwrap();
    let rss_end = rss_kib(pid).unwrap();
    eprintln!(
        "{} leases + {} completions in {:.1} s ({:.0}/s); lease p50 {} us p99 {} us; complete p50 {} us p99 {} us; stale {}, errors {}, empty polls {}",
        r.leases,
        r.completions,
        r.seconds,
        r.ops_per_s(),
        quantile(&r.lease_us, 0.5),
        quantile(&r.lease_us, 0.99),
        quantile(&r.complete_us, 0.5),
        quantile(&r.complete_us, 0.99),
        r.stale,
        r.errors,
        r.empty_polls
    );
    eprintln!("coordinator RSS: {rss_start} KiB at start, {rss_planned} planned, {rss_end} after");

    // every shard accepted exactly once, seen from the workers and from Redis
    assert_eq!(r.completions, 10_000);
    assert_eq!(r.accepted.len(), 10_000);
    assert!(r.accepted.values().all(|&n| n == 1));
    // a lease can expire (3 s) on a loaded machine and be granted again; acceptance
    // stays exactly once either way
    assert!(r.leases >= 10_000);
    let fields = redis_shards(&c.redis.url(), &job);
    let accepted: Vec<&(String, String)> = fields
        .iter()
        .filter(|(k, _)| k.ends_with(":accepted"))
        .collect();
    assert_eq!(accepted.len(), 10_000);
    assert!(accepted.iter().all(|(_, v)| v == "1"));
    // bounded: what the coordinator holds per shard is in Redis, not in its memory
    assert!(
        rss_end < rss_planned + 64 * 1024,
        "coordinator grew from {rss_planned} to {rss_end} KiB over 20,000 calls"
    );
}
