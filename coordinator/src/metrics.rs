//! Prometheus metrics of the coordinator (names, in one place). The exporter is
//! installed by the binary (`defuse coordinator --metrics-listen`), which serves them
//! as text on `/metrics`.
use metrics::{counter, gauge, histogram};

use crate::store::{JobRecord, ShardCounts};

pub fn lease(job: &str) {
    counter!("defuse_shard_leases_total", "job" => job.to_string()).increment(1);
}

pub fn completion(job: &str, accepted: bool) {
    let result = if accepted { "accepted" } else { "stale" };
    counter!("defuse_shard_completions_total", "job" => job.to_string(), "result" => result)
        .increment(1);
}

pub fn task_failure(job: &str, retryable: bool, outcome: &str) {
    counter!("defuse_task_failures_total", "job" => job.to_string(), "retryable" => retryable.to_string(), "outcome" => outcome.to_string())
        .increment(1);
}

pub fn lease_expired(job: &str, requeued: bool) {
    counter!("defuse_lease_expiries_total", "job" => job.to_string()).increment(1);
    if requeued {
        counter!("defuse_shard_retries_total", "job" => job.to_string()).increment(1);
    }
}

/// What an accepted shard found (from the worker's statistics).
pub fn shard_found(job: &str, images: u64, perturbations: u64, failures: u64) {
    counter!("defuse_images_searched_total", "job" => job.to_string()).increment(images);
    counter!("defuse_perturbations_total", "job" => job.to_string()).increment(perturbations);
    counter!("defuse_failures_found_total", "job" => job.to_string()).increment(failures);
}

pub fn shards(job: &str, c: &ShardCounts) {
    for (state, v) in [
        ("pending", c.pending),
        ("leased", c.leased),
        ("done", c.done),
        ("failed", c.failed),
    ] {
        gauge!("defuse_shards", "job" => job.to_string(), "state" => state).set(v as f64);
    }
}

/// Active jobs by state, and the finished jobs kept (`state="finished"`).
pub fn jobs(active: &[JobRecord], finished: u64) {
    for state in ["queued", "running", "awaiting_labels"] {
        let n = active.iter().filter(|j| j.state.as_str() == state).count();
        gauge!("defuse_jobs", "state" => state).set(n as f64);
    }
    gauge!("defuse_jobs", "state" => "finished").set(finished as f64);
    // kept alive (the exporter drops series idle for an hour): dashboards rate them
    for state in ["done", "failed", "cancelled"] {
        counter!("defuse_jobs_finished_total", "state" => state).increment(0);
    }
}

/// A job reached a final state (`done`, `failed`, `cancelled`).
pub fn finished(state: &'static str) {
    counter!("defuse_jobs_finished_total", "state" => state).increment(1);
}

pub fn workers(n: usize, ages_s: &[(String, f64)]) {
    gauge!("defuse_workers").set(n as f64);
    for (w, age) in ages_s {
        gauge!("defuse_worker_heartbeat_age_seconds", "worker" => w.clone()).set(*age);
    }
}

/// Latency of a state-store call, by operation and outcome.
pub fn store_call(op: &'static str, seconds: f64, ok: bool) {
    histogram!("defuse_store_call_seconds", "op" => op).record(seconds);
    if !ok {
        counter!("defuse_store_errors_total", "op" => op).increment(1);
    }
}

/// Fine-tune rounds recorded (finished and running), and the one a job is in.
pub fn rounds(n: usize) {
    gauge!("defuse_finetune_rounds").set(n as f64);
}

pub fn round(job: &str, round: usize, ce_train: f64, ce_scenario: f64) {
    gauge!("defuse_finetune_round", "job" => job.to_string()).set(round as f64);
    gauge!("defuse_finetune_loss", "job" => job.to_string(), "term" => "train").set(ce_train);
    gauge!("defuse_finetune_loss", "job" => job.to_string(), "term" => "scenario").set(ce_scenario);
}

/// 1 while this coordinator holds the leader lease (drives the jobs), else 0.
pub fn leader(leading: bool) {
    gauge!("defuse_coordinator_leader").set(if leading { 1.0 } else { 0.0 });
}
