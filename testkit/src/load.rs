//! Simulated workers: many gRPC clients that lease shards from a real coordinator and
//! complete them at once (no compute, no output), to measure what the coordinator and
//! its store sustain (`defuse-bench coordinator`) and to check that every shard is
//! accepted exactly once under that load (`cli/tests/load.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use defuse_proto::auth::{AuthChannel, Bearer};
use defuse_proto::worker_service_client::WorkerServiceClient;
use defuse_proto::{Acceptance, CompleteRequest, LeaseRequest, RegisterRequest, PROTOCOL_VERSION};
use tonic::transport::Endpoint;

/// What the simulated workers saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub workers: usize,
    pub leases: u64,
    pub completions: u64,
    pub stale: u64,
    pub empty_polls: u64,
    pub errors: u64,
    /// From the first lease to the last accepted completion.
    pub seconds: f64,
    /// Latency of each granted lease and each completion, microseconds, sorted.
    pub lease_us: Vec<u64>,
    pub complete_us: Vec<u64>,
    /// Accepted completions per (job, shard).
    pub accepted: HashMap<(String, u32), u32>,
}

impl LoadReport {
    /// Leases plus completions per second.
    pub fn ops_per_s(&self) -> f64 {
        (self.leases + self.completions) as f64 / self.seconds.max(1e-9)
    }
}

/// The `p`-quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default)]
struct Shared {
    lease_us: Vec<u64>,
    complete_us: Vec<u64>,
    accepted: HashMap<(String, u32), u32>,
    last_accept: Option<Instant>,
    first_lease: Option<Instant>,
}

/// Runs `workers` simulated workers against the coordinator at `endpoint` until
/// `target` completions were accepted (or `deadline` passes: the report then shows
/// fewer). Each worker has its own connection, as real workers do.
pub async fn simulate_workers(
    endpoint: &str,
    token: Option<&str>,
    workers: usize,
    target: u64,
    deadline: Duration,
) -> Result<LoadReport, String> {
    let accepted = Arc::new(AtomicU64::new(0));
    let counters: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let end = Instant::now() + deadline;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("endpoint {endpoint}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connect {endpoint}: {e}"))?;
        let mut client = WorkerServiceClient::new(AuthChannel::new(channel, Bearer::new(token)?));
        let id = format!("sim-{w}-{}", std::process::id());
        client
            .register(RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: id.clone(),
                host: "simulated".into(),
                device: "cpu".into(),
                memory_bytes: 0,
                threads: 1,
            })
            .await
            .map_err(|e| format!("register {id}: {e}"))?;
        let (accepted, counters, shared) = (accepted.clone(), counters.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lease_us, mut complete_us) = (Vec::new(), Vec::new());
            let mut mine: Vec<(String, u32)> = Vec::new();
            let mut first: Option<Instant> = None;
            let mut last: Option<Instant> = None;
            while accepted.load(Ordering::SeqCst) < target && Instant::now() < end {
                let t = Instant::now();
                let r = client
                    .lease(LeaseRequest {
                        worker_id: id.clone(),
                    })
                    .await;
                let r = match r {
                    Ok(r) => r.into_inner(),
                    Err(_) => {
                        counters[4].fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Some(task) = r.task else {
                    counters[3].fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(r.retry_after_ms.clamp(5, 50))).await;
                    continue;
                };
                lease_us.push(t.elapsed().as_micros() as u64);
                first.get_or_insert(t);
                counters[0].fetch_add(1, Ordering::Relaxed);
                let tr = task.task.clone().unwrap_or_default();
                let t = Instant::now();
                let c = client
                    .complete(CompleteRequest {
                        worker_id: id.clone(),
                        task: Some(tr.clone()),
                        output_key: task.output_key.clone(),
                        stats_json: "{}".into(),
                        output_sha256: "0".repeat(64),
                    })
                    .await;
                match c {
                    Ok(c) if c.get_ref().acceptance == Acceptance::Accepted as i32 => {
                        complete_us.push(t.elapsed().as_micros() as u64);
                        counters[1].fetch_add(1, Ordering::Relaxed);
                        accepted.fetch_add(1, Ordering::SeqCst);
                        mine.push((tr.job.clone(), tr.index().unwrap_or(u32::MAX)));
                        last = Some(Instant::now());
                    }
                    Ok(_) => {
                        counters[2].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        counters[4].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let mut s = shared.lock().unwrap();
            s.lease_us.extend(lease_us);
            s.complete_us.extend(complete_us);
            for k in mine {
                *s.accepted.entry(k).or_default() += 1;
            }
            if let Some(f) = first {
                s.first_lease = Some(s.first_lease.map_or(f, |x| x.min(f)));
            }
            if let Some(l) = last {
                s.last_accept = Some(s.last_accept.map_or(l, |x| x.max(l)));
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("simulated worker: {e}"))?;
    }
    let mut s = std::mem::take(&mut *shared.lock().unwrap());
    s.lease_us.sort_unstable();
    s.complete_us.sort_unstable();
    Ok(LoadReport {
        workers,
        leases: counters[0].load(Ordering::SeqCst),
        completions: counters[1].load(Ordering::SeqCst),
        stale: counters[2].load(Ordering::SeqCst),
        empty_polls: counters[3].load(Ordering::SeqCst),
        errors: counters[4].load(Ordering::SeqCst),
        seconds: match (s.first_lease, s.last_accept) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        },
        lease_us: s.lease_us,
        complete_us: s.complete_us,
        accepted: s.accepted,
    })
}
