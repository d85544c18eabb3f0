//! The artifact store: where shard outputs, models, scenarios and reports live. One
//! trait, two implementations with one key layout (`jobs/<job>/...`): a local folder
//! (the embedded default) and S3-compatible object storage (MinIO, Garage, Ceph, AWS).
//!
//! An artifact store is named by a URL: `file:///abs/path` (or a plain path) or
//! `s3://bucket/prefix`. S3 settings come from the environment as every S3 tool reads
//! them: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`; path-style addressing unless
//! `DEFUSE_S3_VIRTUAL_HOSTED=1`.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// Errors of an artifact store; `retryable` tells a caller whether trying again
/// (later, or elsewhere) can help.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact {key} not found in {store}")]
    NotFound { store: String, key: String },
    #[error("artifact store {store}, key {key}: {msg}")]
    Io {
        store: String,
        key: String,
        msg: String,
    },
    /// An error that trying again cannot fix: an invalid key, access denied, no such
    /// bucket (S3 4xx answers).
    #[error("artifact store {store}, key {key}: {msg}")]
    Refused {
        store: String,
        key: String,
        msg: String,
    },
    #[error("artifact store URL '{0}': expected file:///path, a path, or s3://bucket/prefix")]
    BadUrl(String),
    /// An accepted artifact whose content is no longer what was accepted: someone
    /// with write access to the store replaced it.
    #[error("artifact store {store}, key {key}: its content changed after it was accepted (SHA-256 {found}, recorded {expected}); it was replaced in the store")]
    Changed {
        store: String,
        key: String,
        expected: String,
        found: String,
    },
}

impl ArtifactError {
    pub fn retryable(&self) -> bool {
        matches!(self, ArtifactError::Io { .. })
    }
}

pub type ArtifactResult<T> = std::result::Result<T, ArtifactError>;

#[async_trait]
pub trait ArtifactStore: Send + Sync + std::fmt::Debug {
    /// Writes `bytes` at `key`; a reader sees the whole object or none of it.
    async fn put(&self, key: &str, bytes: Bytes) -> ArtifactResult<()>;
    async fn get(&self, key: &str) -> ArtifactResult<Bytes>;
    async fn exists(&self, key: &str) -> ArtifactResult<bool>;
    /// Keys under `prefix`, sorted.
    async fn list(&self, prefix: &str) -> ArtifactResult<Vec<String>>;
    async fn delete(&self, key: &str) -> ArtifactResult<()>;
    /// The URL that names this store (given to workers).
    fn url(&self) -> String;

    /// Uploads a local file.
    async fn put_file(&self, key: &str, path: &Path) -> ArtifactResult<()> {
        let bytes = tokio::fs::read(path).await.map_err(|e| ArtifactError::Io {
            store: self.url(),
            key: key.into(),
            msg: format!("cannot read {}: {e}", path.display()),
        })?;
        self.put(key, Bytes::from(bytes)).await
    }

    /// Downloads to a local file (through a temporary file and a rename).
    async fn get_file(&self, key: &str, path: &Path) -> ArtifactResult<()> {
        let bytes = self.get(key).await?;
        let io = |e: std::io::Error| ArtifactError::Io {
            store: self.url(),
            key: key.into(),
            msg: format!("{}: {e}", path.display()),
        };
        if let Some(d) = path.parent() {
            tokio::fs::create_dir_all(d).await.map_err(io)?;
        }
        let tmp = path.with_extension(format!("part-{}", std::process::id()));
        tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
        tokio::fs::rename(&tmp, path).await.map_err(io)
    }
}

/// Opens the store a URL names (metered: see [`Metered`]).
pub async fn open(url: &str) -> ArtifactResult<Arc<dyn ArtifactStore>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ArtifactError::BadUrl(url.into()));
        }
        Ok(Metered::wrap(S3Store::from_env(bucket, prefix).await))
    } else if let Some(p) = url.strip_prefix("file://") {
        Ok(Metered::wrap(LocalStore::new(p)))
    } else if url.contains("://") {
        Err(ArtifactError::BadUrl(url.into()))
    } else {
        Ok(Metered::wrap(LocalStore::new(url)))
    }
}

/// A store whose calls are measured and retried.
///
/// Measured: `defuse_artifact_call_seconds{store,op}` and
/// `defuse_artifact_errors_total{store,op}` (store: `s3` or `file`), recorded into
/// whatever metrics recorder the process installed (none: nothing is kept).
///
/// Retried: a transient error (anything but "not found") is tried again with
/// exponential backoff (0.2 s doubling to 5 s) for up to `DEFUSE_ARTIFACT_RETRY_SECONDS`
/// (default 30 s), so that S3 down for a moment costs a shard or a central step time,
/// not an attempt. Every call is idempotent (whole-object put, get, delete).
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    kind: &'static str,
    retry_for: std::time::Duration,
}

/// How long transient artifact errors are retried (`DEFUSE_ARTIFACT_RETRY_SECONDS`).
pub fn retry_budget() -> std::time::Duration {
    let secs = std::env::var("DEFUSE_ARTIFACT_RETRY_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(30.0);
    std::time::Duration::from_secs_f64(secs)
}

impl<S: ArtifactStore + 'static> Metered<S> {
    pub fn wrap(inner: S) -> Arc<dyn ArtifactStore> {
        let kind = if inner.url().starts_with("s3://") {
            "s3"
        } else {
            "file"
        };
        Arc::new(Metered {
            inner,
            kind,
            retry_for: retry_budget(),
        })
    }

    async fn retrying<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> ArtifactResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ArtifactResult<T>>,
    {
        let end = std::time::Instant::now() + self.retry_for;
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            let t = std::time::Instant::now();
            let r = f().await;
            self.record(op, t, &r);
            match r {
                Err(e) if e.retryable() && std::time::Instant::now() + delay < end => {
                    tracing::warn!(store = self.kind, op, key, error = %e, retry_in_ms = delay.as_millis() as u64, "artifact call failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
                r => return r,
            }
        }
    }

    fn record<T>(&self, op: &'static str, started: std::time::Instant, r: &ArtifactResult<T>) {
        metrics::histogram!("defuse_artifact_call_seconds", "store" => self.kind, "op" => op)
            .record(started.elapsed().as_secs_f64());
        if r.is_err() {
            metrics::counter!("defuse_artifact_errors_total", "store" => self.kind, "op" => op)
                .increment(1);
        }
    }
}

#[async_trait]
impl<S: ArtifactStore + 'static> ArtifactStore for Metered<S> {
    async fn put(&self, key: &str, bytes: Bytes) -> ArtifactResult<()> {
        self.retrying("put", key, || self.inner.put(key, bytes.clone()))
            .await
    }
    async fn get(&self, key: &str) -> ArtifactResult<Bytes> {
        self.retrying("get", key, || self.inner.get(key)).await
    }
    async fn exists(&self, key: &str) -> ArtifactResult<bool> {
        self.retrying("exists", key, || self.inner.exists(key))
            .await
    }
    async fn list(&self, prefix: &str) -> ArtifactResult<Vec<String>> {
        self.retrying("list", prefix, || self.inner.list(prefix))
            .await
    }
    async fn delete(&self, key: &str) -> ArtifactResult<()> {
        self.retrying("delete", key, || self.inner.delete(key))
            .await
    }
    fn url(&self) -> String {
        self.inner.url()
    }
}

/// The SHA-256 of a file, in hex: what an accepted output is recorded with.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Whether `s` is a SHA-256 in hex (64 lowercase hex digits).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Downloads an accepted artifact to `path` and checks it is what was accepted:
/// its SHA-256 must be `expected` (empty: recorded before hashes were, not checked).
/// On a mismatch the file is removed and the error names the key.
pub async fn get_file_checked(
    store: &dyn ArtifactStore,
    key: &str,
    path: &Path,
    expected: &str,
) -> ArtifactResult<()> {
    store.get_file(key, path).await?;
    if expected.is_empty() {
        return Ok(());
    }
    let found = sha256_file(path).map_err(|e| ArtifactError::Io {
        store: store.url(),
        key: key.into(),
        msg: format!("reading {} back: {e}", path.display()),
    })?;
    if found != expected {
        let _ = std::fs::remove_file(path);
        return Err(ArtifactError::Changed {
            store: store.url(),
            key: key.into(),
            expected: expected.into(),
            found,
        });
    }
    Ok(())
}

/// Whether `key` is an artifact key: a relative path of plain parts (no empty, `.` or
/// `..` part, no leading `/`). Stores refuse others, and so do the places that turn a
/// key into a local path (workers, `defuse results`).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('/')
        && !key
            .split('/')
            .any(|p| p == ".." || p == "." || p.is_empty())
}

fn check_key(store: &str, key: &str) -> ArtifactResult<()> {
    if !valid_key(key) {
        return Err(ArtifactError::Refused {
            store: store.into(),
            key: key.into(),
            msg: "invalid key".into(),
        });
    }
    Ok(())
}

/// A local folder.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root: PathBuf = root.into();
        let root = std::path::absolute(&root).unwrap_or(root);
        LocalStore { root }
    }

    fn path(&self, key: &str) -> ArtifactResult<PathBuf> {
        check_key(&self.url(), key)?;
        Ok(self.root.join(key))
    }

    fn io(&self, key: &str, e: std::io::Error) -> ArtifactError {
        if e.kind() == std::io::ErrorKind::NotFound {
            ArtifactError::NotFound {
                store: self.url(),
                key: key.into(),
            }
        } else {
            ArtifactError::Io {
                store: self.url(),
                key: key.into(),
                msg: e.to_string(),
            }
        }
    }
}

#[async_trait]
impl ArtifactStore for LocalStore {
    async fn put(&self, key: &str, bytes: Bytes) -> ArtifactResult<()> {
        let p = self.path(key)?;
        if let Some(d) = p.parent() {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(|e| self.io(key, e))?;
        }
        let tmp = p.with_file_name(format!(
            ".{}.tmp-{}-{}",
            p.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id(),
            rand::random::<u32>()
        ));
        tokio::fs::write(&tmp, &bytes)
            .await
            .map_err(|e| self.io(key, e))?;
        tokio::fs::rename(&tmp, &p)
            .await
            .map_err(|e| self.io(key, e))
    }

    async fn get(&self, key: &str) -> ArtifactResult<Bytes> {
        let p = self.path(key)?;
        tokio::fs::read(&p)
            .await
            .map(Bytes::from)
            .map_err(|e| self.io(key, e))
    }

    async fn exists(&self, key: &str) -> ArtifactResult<bool> {
        Ok(tokio::fs::try_exists(self.path(key)?)
            .await
            .unwrap_or(false))
    }

    async fn list(&self, prefix: &str) -> ArtifactResult<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let mut rd = match tokio::fs::read_dir(&dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(prefix, e)),
            };
            while let Some(e) = rd.next_entry().await.map_err(|e| self.io(prefix, e))? {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&self.root) {
                    let key = rel.to_string_lossy().into_owned();
                    let hidden = rel
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                    if key.starts_with(prefix) && !hidden {
                        out.push(key);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> ArtifactResult<()> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// S3-compatible object storage through `aws-sdk-s3`. Large objects go up in parts;
/// the SDK retries throttling and transient errors with exponential backoff.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub etag: String,
}

/// Objects above this size are uploaded in parts of this size.
const PART_BYTES: usize = 8 * 1024 * 1024;

impl S3Store {
    pub async fn from_env(bucket: &str, prefix: &str) -> Self {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(5)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .load()
            .await;
        let virtual_hosted = std::env::var("DEFUSE_S3_VIRTUAL_HOSTED").is_ok_and(|v| v == "1");
        let mut b = aws_sdk_s3::config::Builder::from(&conf).force_path_style(!virtual_hosted);
        if conf.region().is_none() {
            b = b.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        S3Store {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
        }
    }

    fn full(&self, key: &str) -> ArtifactResult<String> {
        check_key(&self.url(), key)?;
        Ok(self.joined(key))
    }

    /// `key` below this store's prefix, unchecked: for keys a listing of the bucket
    /// gave (a user's data or models, whose names are theirs, not artifact keys).
    fn joined(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.into()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn err(&self, key: &str, e: impl std::fmt::Display) -> ArtifactError {
        ArtifactError::Io {
            store: self.url(),
            key: key.into(),
            msg: e.to_string(),
        }
    }

    /// An SDK error: a 4xx answer (but 408 and 429) is final, anything else (no
    /// connection, a timeout, 5xx) may pass.
    fn sdk_err<E: std::error::Error + Send + Sync + 'static>(
        &self,
        key: &str,
        e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> ArtifactError {
        let status = e.raw_response().map(|r| r.status().as_u16());
        let msg = aws_sdk_s3::error::DisplayErrorContext(&e).to_string();
        match status {
            Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => ArtifactError::Refused {
                store: self.url(),
                key: key.into(),
                msg,
            },
            _ => self.err(key, msg),
        }
    }

    /// Every object under this store's prefix: its key below the prefix, size and
    /// ETag, sorted by key (what a data set in a bucket is identified by). An object
    /// listed without an ETag is asked for it (`HEAD`).
    pub async fn list_objects(&self) -> ArtifactResult<Vec<ObjectMeta>> {
        let full = self.joined("");
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|x| self.sdk_err("", x))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let key = &k[full.len().min(k.len())..];
                if key.is_empty() || key.ends_with('/') {
                    continue;
                }
                out.push(ObjectMeta {
                    key: key.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
                });
            }
        }
        // some S3-compatible servers (s3s-fs among them) list no ETags: ask each object
        for o in out.iter_mut().filter(|o| o.etag.is_empty()) {
            o.etag = self.head(&o.key).await?.etag;
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// One object's size and ETag (`NotFound` when there is none).
    pub async fn head(&self, key: &str) -> ArtifactResult<ObjectMeta> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.joined(key))
            .send()
            .await
        {
            Ok(h) => Ok(ObjectMeta {
                key: key.to_string(),
                size: h.content_length().unwrap_or(0).max(0) as u64,
                etag: h.e_tag().unwrap_or_default().trim_matches('"').to_string(),
            }),
            Err(x) if x.as_service_error().is_some_and(|s| s.is_not_found()) => {
                Err(ArtifactError::NotFound {
                    store: self.url(),
                    key: key.into(),
                })
            }
            Err(x) => Err(self.sdk_err(key, x)),
        }
    }

    /// Downloads `key` to `path` (through a temporary file) if its ETag is still
    /// `etag`: an object replaced since it was listed is an error, not a mixed copy.
    pub async fn get_file_if_match(
        &self,
        key: &str,
        etag: &str,
        path: &Path,
    ) -> ArtifactResult<()> {
        let full = self.joined(key);
        let r = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .if_match(format!("\"{etag}\""))
            .send()
            .await
            .map_err(|x| self.sdk_err(key, x))?;
        // a server that ignores If-Match (s3s-fs does) still says which version it sent
        let sent = r.e_tag().map(|t| t.trim_matches('"'));
        if sent.is_some_and(|t| t != etag.trim_matches('"')) {
            return Err(ArtifactError::Refused {
                store: self.url(),
                key: key.to_string(),
                msg: format!(
                    "ETag {} where {etag} was asked for (If-Match)",
                    sent.unwrap_or_default()
                ),
            });
        }
        let io = |e: std::io::Error| self.err(key, format!("{}: {e}", path.display()));
        if let Some(d) = path.parent() {
            tokio::fs::create_dir_all(d).await.map_err(io)?;
        }
        let tmp = path.with_extension(format!("part-{}", std::process::id()));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut body = r.body;
        while let Some(chunk) = body.try_next().await.map_err(|x| self.err(key, x))? {
            tokio::io::AsyncWriteExt::write_all(&mut f, &chunk)
                .await
                .map_err(io)?;
        }
        tokio::io::AsyncWriteExt::flush(&mut f).await.map_err(io)?;
        drop(f);
        tokio::fs::rename(&tmp, path).await.map_err(io)
    }

    /// Creates the bucket when it does not exist (tests, local clusters).
    pub async fn ensure_bucket(&self) -> ArtifactResult<()> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| self.err("", aws_sdk_s3::error::DisplayErrorContext(e)))?;
        Ok(())
    }

    async fn put_multipart(&self, key: &str, full: &str, bytes: Bytes) -> ArtifactResult<()> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let e = |x| self.err(key, aws_sdk_s3::error::DisplayErrorContext(x));
        let up = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|x| self.sdk_err(key, x))?;
        let id = up.upload_id().unwrap_or_default().to_string();
        let mut parts = Vec::new();
        for (i, chunk) in bytes.chunks(PART_BYTES).enumerate() {
            let n = i as i32 + 1;
            let r = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&id)
                .part_number(n)
                .body(bytes.slice_ref(chunk).into())
                .send()
                .await;
            match r {
                Ok(r) => parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(r.e_tag().map(str::to_string))
                        .build(),
                ),
                Err(x) => {
                    let _ = self
                        .client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(full)
                        .upload_id(&id)
                        .send()
                        .await;
                    return Err(e(x));
                }
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|x| self.sdk_err(key, x))?;
        Ok(())
    }
}

#[async_trait]
impl ArtifactStore for S3Store {
    async fn put(&self, key: &str, bytes: Bytes) -> ArtifactResult<()> {
        let full = self.full(key)?;
        if bytes.len() > PART_BYTES {
            return self.put_multipart(key, &full, bytes).await;
        }
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(bytes.into())
            .send()
            .await
            .map_err(|x| self.sdk_err(key, x))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> ArtifactResult<Bytes> {
        let full = self.full(key)?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(r) => Ok(r
                .body
                .collect()
                .await
                .map_err(|x| self.err(key, x))?
                .into_bytes()),
            Err(x) if x.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                Err(ArtifactError::NotFound {
                    store: self.url(),
                    key: key.into(),
                })
            }
            Err(x) => Err(self.sdk_err(key, x)),
        }
    }

    async fn exists(&self, key: &str) -> ArtifactResult<bool> {
        let full = self.full(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(x) if x.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(x) => Err(self.sdk_err(key, x)),
        }
    }

    async fn list(&self, prefix: &str) -> ArtifactResult<Vec<String>> {
        let full = self.joined(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|x| self.sdk_err(prefix, x))?;
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(|k| k[strip..].to_string()),
            );
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> ArtifactResult<()> {
        let full = self.full(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|x| self.sdk_err(key, x))?;
        Ok(())
    }

    fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_accepted_artifact_swapped_in_the_store_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("store"));
        let out = tmp.path().join("out.bin");
        std::fs::write(&out, b"the accepted output").unwrap();
        let recorded = sha256_file(&out).unwrap();
        assert!(is_sha256(&recorded));
        store
            .put_file("jobs/j/shard-0.safetensors", &out)
            .await
            .unwrap();
        let got = tmp.path().join("got.bin");
        get_file_checked(&store, "jobs/j/shard-0.safetensors", &got, &recorded)
            .await
            .unwrap();
        // someone with write access replaces it
        store
            .put(
                "jobs/j/shard-0.safetensors",
                Bytes::from_static(b"a forged output"),
            )
            .await
            .unwrap();
        let e = get_file_checked(&store, "jobs/j/shard-0.safetensors", &got, &recorded)
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::Changed { .. }) && !e.retryable());
        let m = e.to_string();
        assert!(
            m.contains("jobs/j/shard-0.safetensors") && m.contains("changed"),
            "{m}"
        );
        assert!(!got.exists(), "the forged file is not left for a reader");
        // no recorded hash (accepted by an older release): not checked
        get_file_checked(&store, "jobs/j/shard-0.safetensors", &got, "")
            .await
            .unwrap();
    }
}
