//! The Redis state store. All keys of a job share the hash tag `{job:<id>}` so that
//! the multi-key Lua scripts also run on Redis Cluster; scripts never build key names.
//!
//! Per job: `{job:ID}:meta` (hash: the record; `n_shards` and `round:R:n` count the
//! shards of each set, `rounds` how many rounds were planned,
//! `round:R:checkpoint_sha256` the hash of round R's checkpoint), `{job:ID}:labels` (the
//! labels' JSON, set once), and per shard set (identify: `{job:ID}:<name>`, round R:
//! `{job:ID}:round:R:<name>`): `pending` (list of shard ids), `shards` (hash:
//! `<n>:state|attempt|owner|output|sha256|accepted|handbacks|error`), `leases` (sorted set:
//! shard by deadline). Global: `defuse:jobs` (set of
//! ids), `defuse:jobs:active` (set: jobs not retired, what the driver reads each tick),
//! `defuse:jobs:finished` (sorted set: retired jobs by the time they finished), `defuse:workers` (hash: id -> info JSON), `defuse:workers:seen` (id -> ms),
//! `defuse:leader` (hash: owner, token, until: the leader lease).
use std::collections::HashMap;

use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, Script};
use async_trait::async_trait;

use super::*;

const LOST: &str = "DEFUSE_LOST";
const FENCED: &str = "DEFUSE_FENCED";

const FENCE: &str = r#"
local function fenced(shards, shard, worker, attempt)
  local v = redis.call('HMGET', shards, shard .. ':state', shard .. ':owner', shard .. ':attempt')
  return v[1] == 'leased' and v[2] == worker and v[3] == attempt
end
local function need(meta)
  if redis.call('EXISTS', meta) == 0 then return false end
  return true
end
-- a leader token older than the newest this job has seen is refused
local function fence_ok(meta, token)
  local f = tonumber(redis.call('HGET', meta, 'fence') or '0')
  local t = tonumber(token)
  if t < f then return false end
  if t > f then redis.call('HSET', meta, 'fence', t) end
  return true
end
local function fail_job(meta, msg, now)
  local st = redis.call('HGET', meta, 'state')
  if st ~= 'done' and st ~= 'failed' and st ~= 'cancelled' then
    redis.call('HSET', meta, 'state', 'failed', 'error', msg, 'error_kind', 'runtime', 'updated_ms', now)
  end
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{FENCE}\n{body}"))
}

struct Scripts {
    set_state: Script,
    plan: Script,
    lease: Script,
    renew: Script,
    complete: Script,
    fail: Script,
    reap: Script,
    cancel: Script,
    put_labels: Script,
    put_checkpoint: Script,
    lead: Script,
    resign: Script,
    claim: Script,
    create: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            // KEYS meta; ARGV state step error now fence error_kind
            set_state: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
if not fence_ok(KEYS[1], ARGV[5]) then return redis.error_reply('DEFUSE_FENCED') end
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'done' or st == 'failed' or st == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'step', ARGV[2], 'error', ARGV[3], 'updated_ms', ARGV[4],
  'error_kind', ARGV[6])
return 1"#,
            ),
            // KEYS meta pending shards; ARGV n now fence n_field step rounds
            // (step: the phase the job must be in, '' for any; rounds: '' or the rounds
            // planned once this one is)
            plan: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
if not fence_ok(KEYS[1], ARGV[3]) then return redis.error_reply('DEFUSE_FENCED') end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'step') ~= ARGV[5] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or '0') > 0 then return 0 end
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  redis.call('RPUSH', KEYS[2], i)
  redis.call('HSET', KEYS[3], i .. ':state', 'pending', i .. ':attempt', 0, i .. ':accepted', 0)
end
redis.call('HSET', KEYS[1], ARGV[4], n, 'updated_ms', ARGV[2])
if ARGV[6] ~= '' and tonumber(ARGV[6]) > tonumber(redis.call('HGET', KEYS[1], 'rounds') or '0') then
  redis.call('HSET', KEYS[1], 'rounds', ARGV[6])
end
return 1"#,
            ),
            // KEYS meta pending shards leases; ARGV worker now lease_ms step
            lease: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
local v = redis.call('HMGET', KEYS[1], 'state', 'step')
if v[1] ~= 'running' or v[2] ~= ARGV[4] then return false end
local shard = redis.call('LPOP', KEYS[2])
if not shard then return false end
local attempt = redis.call('HINCRBY', KEYS[3], shard .. ':attempt', 1)
local deadline = tonumber(ARGV[2]) + tonumber(ARGV[3])
redis.call('HSET', KEYS[3], shard .. ':state', 'leased', shard .. ':owner', ARGV[1])
redis.call('ZADD', KEYS[4], deadline, shard)
return {tonumber(shard), attempt, deadline}"#,
            ),
            // KEYS meta shards leases; ARGV shard worker attempt now lease_ms
            renew: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if not fenced(KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[1])
return 1"#,
            ),
            // KEYS meta shards leases; ARGV shard worker attempt output sha256
            complete: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
local v = redis.call('HMGET', KEYS[2], ARGV[1] .. ':state', ARGV[1] .. ':owner', ARGV[1] .. ':attempt', ARGV[1] .. ':output')
if v[1] == 'done' and v[2] == ARGV[2] and v[3] == ARGV[3] and v[4] == ARGV[4] then return 1 end
if not fenced(KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1] .. ':state', 'done', ARGV[1] .. ':output', ARGV[4], ARGV[1] .. ':sha256', ARGV[5])
redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':accepted', 1)
redis.call('ZREM', KEYS[3], ARGV[1])
return 1"#,
            ),
            // KEYS meta shards leases pending; ARGV shard worker attempt kind message max now
            // unit (kind: retry | fatal | handback; a hand-back is not a try; unit: how
            // the job's error names the set's shards)
            fail: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
if not fenced(KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 'stale' end
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[4] == 'handback' then
  redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':handbacks', 1)
  redis.call('HSET', KEYS[2], ARGV[1] .. ':state', 'pending')
  redis.call('HDEL', KEYS[2], ARGV[1] .. ':owner')
  redis.call('RPUSH', KEYS[4], ARGV[1])
  return 'requeued'
end
redis.call('HSET', KEYS[2], ARGV[1] .. ':error', ARGV[5])
local tries = tonumber(ARGV[3]) - tonumber(redis.call('HGET', KEYS[2], ARGV[1] .. ':handbacks') or '0')
if ARGV[4] == 'retry' and tries < tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[2], ARGV[1] .. ':state', 'pending')
  redis.call('HDEL', KEYS[2], ARGV[1] .. ':owner')
  redis.call('RPUSH', KEYS[4], ARGV[1])
  return 'requeued'
end
redis.call('HSET', KEYS[2], ARGV[1] .. ':state', 'failed')
fail_job(KEYS[1], ARGV[8] .. ARGV[1] .. ' failed on attempt ' .. ARGV[3] .. ': ' .. ARGV[5], ARGV[7])
return 'failed'"#,
            ),
            // KEYS meta shards leases pending; ARGV now max fence unit
            reap: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
if not fence_ok(KEYS[1], ARGV[3]) then return redis.error_reply('DEFUSE_FENCED') end
local out = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
for _, shard in ipairs(expired) do
  redis.call('ZREM', KEYS[3], shard)
  local attempt = tonumber(redis.call('HGET', KEYS[2], shard .. ':attempt') or '0')
  local tries = attempt - tonumber(redis.call('HGET', KEYS[2], shard .. ':handbacks') or '0')
  local owner = redis.call('HGET', KEYS[2], shard .. ':owner') or ''
  redis.call('HDEL', KEYS[2], shard .. ':owner')
  local requeued = 0
  if tries < tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[2], shard .. ':state', 'pending')
    redis.call('RPUSH', KEYS[4], shard)
    requeued = 1
  else
    local msg = 'lease expired ' .. attempt .. ' times (workers lost or hung)'
    redis.call('HSET', KEYS[2], shard .. ':state', 'failed', shard .. ':error', msg)
    fail_job(KEYS[1], ARGV[4] .. shard .. ' failed: ' .. msg, ARGV[1])
  end
  table.insert(out, tonumber(shard)); table.insert(out, attempt); table.insert(out, owner); table.insert(out, requeued)
end
return out"#,
            ),
            // KEYS meta, then (shards leases pending) per set; ARGV now step, then the
            // n_field per set. -1: the job left `step` meanwhile (read it again).
            cancel: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
local v = redis.call('HMGET', KEYS[1], 'state', 'step')
if v[1] == 'done' or v[1] == 'failed' or v[1] == 'cancelled' then return 0 end
if ARGV[2] ~= '' and v[2] ~= ARGV[2] then return -1 end
for k = 0, (#KEYS - 1) / 3 - 1 do
  local shards, leases, pending = KEYS[2 + 3 * k], KEYS[3 + 3 * k], KEYS[4 + 3 * k]
  local n = tonumber(redis.call('HGET', KEYS[1], ARGV[3 + k]) or '0')
  for i = 0, n - 1 do
    local s = redis.call('HGET', shards, i .. ':state')
    if s == 'pending' or s == 'leased' then
      redis.call('HSET', shards, i .. ':state', 'cancelled')
      redis.call('HDEL', shards, i .. ':owner')
    end
  end
  redis.call('DEL', leases, pending)
end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'updated_ms', ARGV[1])
return 1"#,
            ),
            // KEYS leader; ARGV node now ttl. The leader hash: owner, token, until.
            lead: Script::new(
                r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
local till = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
local now = tonumber(ARGV[2])
if owner == ARGV[1] and till >= now then
  redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[3]))
  return tonumber(redis.call('HGET', KEYS[1], 'token'))
end
if owner and till >= now then return false end
local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'until', now + tonumber(ARGV[3]))
return token"#,
            ),
            // KEYS meta; ARGV fence
            claim: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
if not fence_ok(KEYS[1], ARGV[1]) then return redis.error_reply('DEFUSE_FENCED') end
return 1"#,
            ),
            // KEYS meta; ARGV id name state step config n_shards error created updated
            // traceparent error_kind:
            // the whole record or nothing
            create: Script::new(
                r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'state', ARGV[3], 'step', ARGV[4],
  'config_toml', ARGV[5], 'n_shards', ARGV[6], 'error', ARGV[7], 'created_ms', ARGV[8],
  'updated_ms', ARGV[9], 'trace_parent', ARGV[10], 'error_kind', ARGV[11])
return 1"#,
            ),
            // KEYS leader; ARGV node: the lease ends now if node holds it
            resign: Script::new(
                r#"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'until', 0)
  return 1
end
return 0"#,
            ),
            // KEYS meta labels; ARGV json
            put_labels: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
if redis.call('SET', KEYS[2], ARGV[1], 'NX') then return 1 end
return 0"#,
            ),
            // KEYS meta; ARGV field sha256 (a lost job gets no half-written meta)
            put_checkpoint: script(
                r#"
if not need(KEYS[1]) then return redis.error_reply('DEFUSE_LOST') end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1"#,
            ),
        }
    }
}

/// The meta field of round `round`'s checkpoint hash.
fn checkpoint_field(round: u32) -> String {
    format!("round:{round}:checkpoint_sha256")
}

pub struct RedisStore {
    conn: ConnectionManager,
    url: String,
    scripts: Scripts,
}

/// `url` with the password (if any) replaced by `***`: the form that may be logged.
/// The userinfo ends at the last `@` (a password may hold `/`, `?` or `#`); a
/// `password=` or `pass=` query parameter is masked too.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => rest.to_string(),
    };
    let masked = match rest.split_once('?') {
        Some((head, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k == "password" || k == "pass" => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{head}?{}", q.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{masked}")
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisStore({})", self.url)
    }
}

struct Keys {
    meta: String,
    labels: String,
}

fn keys(id: &str) -> Keys {
    let tag = format!("{{job:{id}}}");
    Keys {
        meta: format!("{tag}:meta"),
        labels: format!("{tag}:labels"),
    }
}

/// The keys of one shard set of a job, and the meta field that counts its shards.
struct SetKeys {
    pending: String,
    shards: String,
    leases: String,
    n_field: String,
}

fn set_keys(id: &str, stage: Stage) -> SetKeys {
    let (prefix, n_field) = match stage {
        Stage::Identify => (format!("{{job:{id}}}"), "n_shards".to_string()),
        Stage::Round(r) => (format!("{{job:{id}}}:round:{r}"), format!("round:{r}:n")),
    };
    SetKeys {
        pending: format!("{prefix}:pending"),
        shards: format!("{prefix}:shards"),
        leases: format!("{prefix}:leases"),
        n_field,
    }
}

const JOBS: &str = "defuse:jobs";
const WORKERS: &str = "defuse:workers";
const SEEN: &str = "defuse:workers:seen";
const LEADER: &str = "defuse:leader";
const ACTIVE: &str = "defuse:jobs:active";
const FINISHED: &str = "defuse:jobs:finished";
/// Set once the job indexes exist (a store written by an older release has none:
/// its jobs are made active at connect).
const SCHEMA: &str = "defuse:schema";

impl RedisStore {
    pub async fn connect(url: &str) -> StoreResult<RedisStore> {
        let shown = redact_url(url);
        let client = ::redis::Client::open(url)
            .map_err(|e| StoreError::Backend(format!("redis URL '{shown}': {e}")))?;
        let cfg = ::redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(3)
            .set_connection_timeout(std::time::Duration::from_secs(3))
            .set_response_timeout(std::time::Duration::from_secs(5));
        let mut conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(|e| StoreError::Backend(format!("cannot connect to redis at {shown}: {e}")))?;
        let schema: Option<u32> = conn.get(SCHEMA).await?;
        if schema.is_none() {
            // one key at a time (the global keys may sit in different cluster slots)
            let ids: Vec<String> = conn.smembers(JOBS).await?;
            for id in ids {
                let _: () = conn.sadd(ACTIVE, id).await?;
            }
            let _: () = conn.set(SCHEMA, 2).await?;
        }
        if schema.unwrap_or(0) < 3 {
            // releases before 3 kept fine-tune rounds as jobs `<job>--round-<r>` (step
            // `finetune-part`); their parts now live in the job itself
            let ids: Vec<String> = conn.smembers(JOBS).await?;
            for id in ids.iter().filter(|id| id.contains("--round-")) {
                let k = keys(id);
                let step: Option<String> = conn.hget(&k.meta, "step").await?;
                if step.as_deref() == Some("finetune-part") {
                    let s = set_keys(id, Stage::Identify);
                    let _: () = conn
                        .del(&[&k.meta, &k.labels, &s.pending, &s.shards, &s.leases])
                        .await?;
                    let _: () = conn.srem(JOBS, id).await?;
                    let _: () = conn.srem(ACTIVE, id).await?;
                    let _: () = conn.zrem(FINISHED, id).await?;
                }
            }
            let _: () = conn.set(SCHEMA, 3).await?;
        }
        Ok(RedisStore {
            conn,
            url: shown,
            scripts: Scripts::new(),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The ids in the set `set`, sorted.
    async fn sorted_members(&self, set: &str) -> StoreResult<Vec<String>> {
        let mut ids: Vec<String> = self.conn().smembers(set).await?;
        ids.sort();
        Ok(ids)
    }

    /// The records of the jobs in the set `set`, in id order (ids whose record is gone
    /// are left out).
    async fn records_in(&self, set: &str) -> StoreResult<Vec<JobRecord>> {
        let mut out = Vec::new();
        for id in self.sorted_members(set).await? {
            if let Some(r) = self.get_job(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }
}

fn lost(id: &str, e: ::redis::RedisError) -> StoreError {
    if e.to_string().contains(LOST) {
        StoreError::Lost(id.into())
    } else if e.to_string().contains(FENCED) {
        StoreError::Fenced(id.into())
    } else {
        StoreError::Backend(e.to_string())
    }
}

/// A fenced script's reply: 1 accepted, 0 stale.
fn fenced_reply(r: i64) -> Fenced {
    if r == 1 {
        Fenced::Accepted
    } else {
        Fenced::Stale
    }
}

fn record(map: HashMap<String, String>) -> Option<JobRecord> {
    if map.is_empty() {
        return None;
    }
    let g = |k: &str| map.get(k).cloned().unwrap_or_default();
    let n = |k: &str| map.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(JobRecord {
        id: g("id"),
        name: g("name"),
        state: JobState::parse(&g("state")).unwrap_or(JobState::Failed),
        step: Phase::parse(&g("step")).unwrap_or(Phase::Lost),
        config_toml: g("config_toml"),
        n_shards: n("n_shards") as u32,
        error: g("error"),
        error_kind: ErrorKind::parse(&g("error_kind")),
        created_ms: n("created_ms"),
        updated_ms: n("updated_ms"),
        trace_parent: g("trace_parent"),
    })
}

#[async_trait]
impl StateStore for RedisStore {
    async fn create_job(&self, j: &JobRecord) -> StoreResult<()> {
        let k = keys(&j.id);
        let mut c = self.conn();
        let created: i64 = self
            .scripts
            .create
            .key(&k.meta)
            .arg(&j.id)
            .arg(&j.name)
            .arg(j.state.as_str())
            .arg(j.step.to_string())
            .arg(&j.config_toml)
            .arg(0)
            .arg(&j.error)
            .arg(j.created_ms)
            .arg(j.updated_ms)
            .arg(&j.trace_parent)
            .arg(j.error_kind.map_or("", |k| k.as_str()))
            .invoke_async(&mut c)
            .await?;
        if created == 0 {
            return Err(StoreError::Exists(j.id.clone()));
        }
        let _: () = c.sadd(JOBS, &j.id).await?;
        let _: () = c.sadd(ACTIVE, &j.id).await?;
        Ok(())
    }

    async fn job_ids(&self) -> StoreResult<Vec<String>> {
        self.sorted_members(JOBS).await
    }

    async fn active_jobs(&self) -> StoreResult<Vec<JobRecord>> {
        self.records_in(ACTIVE).await
    }

    async fn retire(&self, id: &str, finished_ms: Option<u64>) -> StoreResult<()> {
        let mut c = self.conn();
        if let Some(t) = finished_ms {
            let _: () = c.zadd(FINISHED, id, t).await?;
        }
        let _: () = c.srem(ACTIVE, id).await?;
        Ok(())
    }

    async fn expired_jobs(&self, before_ms: u64, keep: usize) -> StoreResult<Vec<String>> {
        let mut c = self.conn();
        let mut ids: Vec<String> = c
            .zrangebyscore(FINISHED, "-inf", format!("({before_ms}"))
            .await?;
        let n: usize = c.zcard(FINISHED).await?;
        if n > keep {
            let oldest: Vec<String> = c.zrange(FINISHED, 0, (n - keep - 1) as isize).await?;
            ids.extend(oldest);
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    async fn finished_count(&self) -> StoreResult<u64> {
        Ok(self.conn().zcard(FINISHED).await?)
    }

    async fn delete_job(&self, id: &str) -> StoreResult<()> {
        let k = keys(id);
        let mut c = self.conn();
        let rounds: Option<u32> = c.hget(&k.meta, "rounds").await?;
        let sets =
            std::iter::once(Stage::Identify).chain((0..rounds.unwrap_or(0)).map(Stage::Round));
        for stage in sets {
            let s = set_keys(id, stage);
            let _: () = c.del(&[&s.pending, &s.shards, &s.leases]).await?;
        }
        // the record last: a delete that stopped half way is found and finished
        let _: () = c.del(&[&k.labels, &k.meta]).await?;
        let _: () = c.srem(JOBS, id).await?;
        let _: () = c.srem(ACTIVE, id).await?;
        let _: () = c.zrem(FINISHED, id).await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        let map: HashMap<String, String> = self.conn().hgetall(keys(id).meta).await?;
        Ok(record(map))
    }

    async fn list_jobs(&self) -> StoreResult<Vec<JobRecord>> {
        self.records_in(JOBS).await
    }

    async fn set_job_state(
        &self,
        id: &str,
        state: JobState,
        step: Phase,
        error: &str,
        kind: Option<ErrorKind>,
        now_ms: u64,
        fence: u64,
    ) -> StoreResult<()> {
        let k = keys(id);
        let _: i64 = self
            .scripts
            .set_state
            .key(&k.meta)
            .arg(state.as_str())
            .arg(step.to_string())
            .arg(error)
            .arg(now_ms)
            .arg(fence)
            .arg(kind.map_or("", |k| k.as_str()))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(id, e))?;
        Ok(())
    }

    async fn plan_shards(
        &self,
        id: &str,
        stage: Stage,
        n: u32,
        now_ms: u64,
        fence: u64,
    ) -> StoreResult<()> {
        let (k, sk) = (keys(id), set_keys(id, stage));
        let (step, rounds) = match stage {
            Stage::Identify => (String::new(), String::new()),
            Stage::Round(r) => (stage.phase().to_string(), (r + 1).to_string()),
        };
        let _: i64 = self
            .scripts
            .plan
            .key(&k.meta)
            .key(&sk.pending)
            .key(&sk.shards)
            .arg(n)
            .arg(now_ms)
            .arg(fence)
            .arg(&sk.n_field)
            .arg(step)
            .arg(rounds)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(id, e))?;
        Ok(())
    }

    async fn lease(
        &self,
        id: &str,
        stage: Stage,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> StoreResult<Option<Lease>> {
        let (k, sk) = (keys(id), set_keys(id, stage));
        let r: Option<(u32, u32, u64)> = self
            .scripts
            .lease
            .key(&k.meta)
            .key(&sk.pending)
            .key(&sk.shards)
            .key(&sk.leases)
            .arg(worker)
            .arg(now_ms)
            .arg(lease_ms)
            .arg(stage.phase().to_string())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(id, e))?;
        Ok(r.map(|(shard, attempt, deadline_ms)| Lease {
            shard,
            attempt,
            deadline_ms,
        }))
    }

    async fn renew(&self, a: &Attempt<'_>, now_ms: u64, lease_ms: u64) -> StoreResult<Fenced> {
        let (k, sk) = (keys(a.job), set_keys(a.job, a.stage));
        let r: i64 = self
            .scripts
            .renew
            .key(&k.meta)
            .key(&sk.shards)
            .key(&sk.leases)
            .arg(a.shard)
            .arg(a.worker)
            .arg(a.attempt)
            .arg(now_ms)
            .arg(lease_ms)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(a.job, e))?;
        Ok(fenced_reply(r))
    }

    async fn complete(&self, a: &Attempt<'_>, output: &str, sha256: &str) -> StoreResult<Fenced> {
        let (k, sk) = (keys(a.job), set_keys(a.job, a.stage));
        let r: i64 = self
            .scripts
            .complete
            .key(&k.meta)
            .key(&sk.shards)
            .key(&sk.leases)
            .arg(a.shard)
            .arg(a.worker)
            .arg(a.attempt)
            .arg(output)
            .arg(sha256)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(a.job, e))?;
        Ok(fenced_reply(r))
    }

    async fn fail(
        &self,
        a: &Attempt<'_>,
        failure: Failure,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome> {
        let (k, sk) = (keys(a.job), set_keys(a.job, a.stage));
        let r: String = self
            .scripts
            .fail
            .key(&k.meta)
            .key(&sk.shards)
            .key(&sk.leases)
            .key(&sk.pending)
            .arg(a.shard)
            .arg(a.worker)
            .arg(a.attempt)
            .arg(failure.as_str())
            .arg(message)
            .arg(max_attempts)
            .arg(now_ms())
            .arg(a.stage.unit_prefix())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(a.job, e))?;
        Ok(match r.as_str() {
            "requeued" => FailOutcome::Requeued,
            "failed" => FailOutcome::JobFailed,
            _ => FailOutcome::Stale,
        })
    }

    async fn reap(
        &self,
        id: &str,
        stage: Stage,
        now_ms: u64,
        max_attempts: u32,
        fence: u64,
    ) -> StoreResult<Vec<Expired>> {
        let (k, sk) = (keys(id), set_keys(id, stage));
        let flat: Vec<::redis::Value> = self
            .scripts
            .reap
            .key(&k.meta)
            .key(&sk.shards)
            .key(&sk.leases)
            .key(&sk.pending)
            .arg(now_ms)
            .arg(max_attempts)
            .arg(fence)
            .arg(stage.unit_prefix())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(id, e))?;
        let mut out = Vec::new();
        for c in flat.chunks(4) {
            let [s, a, o, r] = c else { break };
            let num = |v: &::redis::Value| ::redis::from_redis_value::<u64>(v).unwrap_or(0);
            out.push(Expired {
                shard: num(s) as u32,
                attempt: num(a) as u32,
                owner: ::redis::from_redis_value::<String>(o).unwrap_or_default(),
                requeued: num(r) == 1,
            });
        }
        Ok(out)
    }

    async fn shards(&self, id: &str, stage: Stage) -> StoreResult<Vec<ShardInfo>> {
        let (k, sk) = (keys(id), set_keys(id, stage));
        let mut c = self.conn();
        let exists: bool = c.exists(&k.meta).await?;
        if !exists {
            return Err(StoreError::Lost(id.into()));
        }
        let n: u32 = c
            .hget::<_, _, Option<u32>>(&k.meta, &sk.n_field)
            .await?
            .unwrap_or(0);
        let map: HashMap<String, String> = c.hgetall(&sk.shards).await?;
        let mut out: Vec<ShardInfo> = (0..n)
            .map(|s| ShardInfo {
                shard: s,
                ..Default::default()
            })
            .collect();
        for (field, v) in map {
            let Some((s, f)) = field.split_once(':') else {
                continue;
            };
            let Some(info) = s.parse::<usize>().ok().and_then(|s| out.get_mut(s)) else {
                continue;
            };
            match f {
                // a state no release wrote reads as failed, never as done
                "state" => info.state = ShardState::parse(&v).unwrap_or(ShardState::Failed),
                "attempt" => info.attempt = v.parse().unwrap_or(0),
                "owner" => info.owner = v,
                "output" => info.output = v,
                "sha256" => info.output_sha256 = v,
                "accepted" => info.accepted = v.parse().unwrap_or(0),
                "handbacks" => info.handbacks = v.parse().unwrap_or(0),
                "error" => info.error = v,
                _ => {}
            }
        }
        Ok(out)
    }

    async fn put_labels(&self, id: &str, labels_json: &str) -> StoreResult<bool> {
        let k = keys(id);
        let r: i64 = self
            .scripts
            .put_labels
            .key(&k.meta)
            .key(&k.labels)
            .arg(labels_json)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(id, e))?;
        Ok(r == 1)
    }

    async fn labels(&self, id: &str) -> StoreResult<Option<String>> {
        Ok(self.conn().get(keys(id).labels).await?)
    }

    async fn put_checkpoint_sha256(&self, id: &str, round: u32, sha256: &str) -> StoreResult<()> {
        let _: i64 = self
            .scripts
            .put_checkpoint
            .key(keys(id).meta)
            .arg(checkpoint_field(round))
            .arg(sha256)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(id, e))?;
        Ok(())
    }

    async fn checkpoint_sha256(&self, id: &str, round: u32) -> StoreResult<Option<String>> {
        Ok(self
            .conn()
            .hget(keys(id).meta, checkpoint_field(round))
            .await?)
    }

    async fn cancel(&self, id: &str, now_ms: u64) -> StoreResult<()> {
        let k = keys(id);
        // the sets to end depend on the job's phase, read first; the script refuses
        // (-1) when the job moved on in between, and the phase is read again
        for _ in 0..10 {
            let Some(rec) = self.get_job(id).await? else {
                return Err(StoreError::Lost(id.into()));
            };
            let mut sets = vec![Stage::Identify];
            sets.extend(Stage::of(rec.step).filter(|s| *s != Stage::Identify));
            let mut inv = self.scripts.cancel.key(&k.meta);
            for stage in &sets {
                let sk = set_keys(id, *stage);
                inv.key(&sk.shards).key(&sk.leases).key(&sk.pending);
            }
            // a step this release cannot read (Lost) has no round to end: no check
            let step = match rec.step {
                Phase::Lost => String::new(),
                p => p.to_string(),
            };
            inv.arg(now_ms).arg(step);
            for stage in &sets {
                inv.arg(set_keys(id, *stage).n_field);
            }
            let r: i64 = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| lost(id, e))?;
            if r >= 0 {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!(
            "job {id}: cannot cancel: its phase keeps changing"
        )))
    }

    async fn lead(&self, node: &str, now_ms: u64, ttl_ms: u64) -> StoreResult<Option<u64>> {
        let token: Option<u64> = self
            .scripts
            .lead
            .key(LEADER)
            .arg(node)
            .arg(now_ms)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(token)
    }

    async fn claim(&self, id: &str, fence: u64) -> StoreResult<()> {
        let _: i64 = self
            .scripts
            .claim
            .key(keys(id).meta)
            .arg(fence)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| lost(id, e))?;
        Ok(())
    }

    async fn resign(&self, node: &str) -> StoreResult<()> {
        let _: i64 = self
            .scripts
            .resign
            .key(LEADER)
            .arg(node)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn register_worker(&self, worker: &str, info_json: &str, now_ms: u64) -> StoreResult<()> {
        let mut c = self.conn();
        let _: () = c.hset(WORKERS, worker, info_json).await?;
        let _: () = c.hset(SEEN, worker, now_ms).await?;
        Ok(())
    }

    async fn touch_worker(&self, worker: &str, now_ms: u64) -> StoreResult<bool> {
        let mut c = self.conn();
        let known: bool = c.hexists(WORKERS, worker).await?;
        if known {
            let _: () = c.hset(SEEN, worker, now_ms).await?;
        }
        Ok(known)
    }

    async fn workers(&self) -> StoreResult<Vec<(String, String, u64)>> {
        let mut c = self.conn();
        let info: HashMap<String, String> = c.hgetall(WORKERS).await?;
        let seen: HashMap<String, u64> = c.hgetall(SEEN).await?;
        let mut v: Vec<_> = info
            .into_iter()
            .map(|(k, i)| {
                let t = seen.get(&k).copied().unwrap_or(0);
                (k, i, t)
            })
            .collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact_url("redis://:s3cret@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            redact_url("redis://user:s3cret@redis/"),
            "redis://user:***@redis/"
        );
        assert_eq!(redact_url("rediss://tok@redis"), "rediss://***@redis");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("redis://:pa/ss?w#d@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?db=1&pass=s3cret"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
    }
}
