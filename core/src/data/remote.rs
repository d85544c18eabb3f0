//! Data in S3-compatible storage: `data.path = "s3://bucket/prefix"`, any of the
//! formats a local folder may hold, under that prefix. The S3 settings are the artifact
//! store's (`AWS_ENDPOINT_URL`, `AWS_REGION`, credentials from the environment).
//!
//! - **Identity without reading.** The data's manifest is the bucket's listing: every
//!   object's name below the prefix, size and ETag (`DataManifest`). The coordinator
//!   plans from it; a worker lists again and refuses a task when an object was added,
//!   removed or replaced, naming it.
//! - **A local copy per process.** Readers read files, so the objects are mirrored into
//!   a cache folder (`set_mirror_root`; the worker's `--cache-dir`, the coordinator's
//!   `--work-dir`, else `~/.cache/defuse/data`, `$DEFUSE_CACHE/data` when set): only objects whose size or ETag the
//!   copy does not have are downloaded, each with `If-Match` on the listed ETag (an
//!   object replaced mid-copy is an error, not a mix of two versions), through a
//!   temporary file. Objects no longer listed are removed from the copy.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use super::manifest::{DataFile, DataManifest};
use crate::artifacts::{ArtifactError, ObjectMeta, S3Store};
use crate::error::{Error, Result};
use crate::sources::{block_on, S3Url};

/// A data set in a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Data {
    pub bucket: String,
    /// The prefix, without slashes at either end (empty: the whole bucket).
    pub prefix: String,
}

static MIRROR_ROOT: RwLock<Option<PathBuf>> = RwLock::new(None);
/// One mirror at a time in a process (the embedded run's pipeline and its in-process
/// workers share one cache folder).
static MIRRORING: Mutex<()> = Mutex::new(());

/// Where this process keeps its copies of data sets in buckets.
pub fn set_mirror_root(dir: impl Into<PathBuf>) {
    *MIRROR_ROOT.write().unwrap() = Some(dir.into());
}

fn mirror_root() -> PathBuf {
    if let Some(d) = MIRROR_ROOT.read().unwrap().clone() {
        return d;
    }
    crate::sources::cache_root().join("data")
}

/// A file name of the copy's record of what it holds (hidden: readers skip it).
const RECORD: &str = ".defuse-mirror.json";

impl S3Data {
    /// `Some` when `path` is an `s3://bucket[/prefix]` URL, an error when it is a
    /// malformed one.
    pub fn parse(path: &Path) -> Result<Option<S3Data>> {
        Ok(S3Url::parse("data.path", path)?.map(|u| S3Data {
            bucket: u.bucket,
            prefix: u.key,
        }))
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn err(&self, e: ArtifactError) -> Error {
        match e {
            // a refusal (no such bucket, no access) is the job's to fix
            ArtifactError::Refused { .. } | ArtifactError::NotFound { .. } => {
                Error::invalid("data.path", format!("{}: {e}", self.url()))
            }
            e => Error::io(self.url(), std::io::Error::other(e.to_string())),
        }
    }

    /// The objects under the prefix (names starting with `.` skipped, as in a folder).
    fn list(&self) -> Result<Vec<crate::artifacts::ObjectMeta>> {
        let (bucket, prefix) = (self.bucket.clone(), self.prefix.clone());
        let listed = block_on(async move {
            S3Store::from_env(&bucket, &prefix)
                .await
                .list_objects()
                .await
        })
        .map_err(|e| self.err(e))?;
        let objects: Vec<_> = listed
            .into_iter()
            .filter(|o| !o.key.split('/').any(|p| p.starts_with('.') || p.is_empty()))
            .collect();
        if objects.is_empty() {
            return Err(Error::invalid(
                "data.path",
                format!("{}: no objects under this prefix", self.url()),
            ));
        }
        Ok(objects)
    }

    /// The data's identity: its listing (names, sizes, ETags).
    pub fn manifest(&self) -> Result<DataManifest> {
        Ok(DataManifest {
            files: self
                .list()?
                .into_iter()
                .map(|o| DataFile {
                    name: o.key,
                    size: o.size,
                    sha256: String::new(),
                    etag: o.etag,
                })
                .collect(),
            layout: None,
        })
    }

    /// The local copy's folder, brought up to date with the bucket.
    pub fn mirror(&self) -> Result<PathBuf> {
        self.mirror_only(None)
    }

    /// The local copy's folder with the objects `only` names (all: `None`) up to date,
    /// as the bucket lists them now.
    pub fn mirror_only(&self, only: Option<&[String]>) -> Result<PathBuf> {
        let _one = MIRRORING.lock().unwrap_or_else(|e| e.into_inner());
        let objects = self.list()?;
        if let Some(names) = only {
            if let Some(n) = names.iter().find(|n| !objects.iter().any(|o| &&o.key == n)) {
                return Err(Error::invalid(
                    "data.path",
                    format!("{}: {n} is not in the bucket any more", self.url()),
                ));
            }
        }
        let wanted: Vec<ObjectMeta> = objects
            .iter()
            .filter(|o| only.is_none_or(|names| names.contains(&o.key)))
            .cloned()
            .collect();
        // what the bucket no longer has goes from a whole copy
        let listed: Option<std::collections::HashSet<&str>> = only
            .is_none()
            .then(|| objects.iter().map(|o| o.key.as_str()).collect());
        self.copy(&wanted, listed.as_ref(), false)
    }

    /// The local copy's folder with `files` (a plan's manifest: names, sizes, ETags) up
    /// to date, without listing the bucket: each missing one is downloaded with
    /// `If-Match` on the planned ETag, so an object replaced since the plan is an
    /// error naming it, never a copy of other bytes.
    pub fn mirror_planned(&self, files: &[DataFile]) -> Result<PathBuf> {
        let _one = MIRRORING.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: Vec<ObjectMeta> = files
            .iter()
            .map(|f| ObjectMeta {
                key: f.name.clone(),
                size: f.size,
                etag: f.etag.clone(),
            })
            .collect();
        self.copy(&wanted, None, true)
    }

    /// Brings the copy of `objects` up to date (those whose size or ETag it lacks);
    /// with `listed`, removes the files the bucket no longer has. `planned`: the ETags
    /// are a plan's (a refusal is an object replaced since).
    fn copy(
        &self,
        objects: &[ObjectMeta],
        listed: Option<&std::collections::HashSet<&str>>,
        planned: bool,
    ) -> Result<PathBuf> {
        let dir = mirror_root()
            .join("s3")
            .join(&self.bucket)
            .join(if self.prefix.is_empty() {
                "_"
            } else {
                &self.prefix
            });
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let record_path = dir.join(RECORD);
        let mut record: BTreeMap<String, String> = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let wanted: Vec<ObjectMeta> = objects
            .iter()
            .filter(|o| {
                let have = std::fs::metadata(dir.join(&o.key)).map(|m| m.len()).ok();
                record.get(&o.key) != Some(&o.etag) || have != Some(o.size)
            })
            .cloned()
            .collect();
        if wanted.is_empty() && listed.is_none() {
            return Ok(dir);
        }
        if !wanted.is_empty() {
            tracing::info!(data = %self.url(), objects = wanted.len(), bytes = wanted.iter().map(|o| o.size).sum::<u64>(), "copying data from the bucket");
            let (bucket, prefix, d) = (self.bucket.clone(), self.prefix.clone(), dir.clone());
            let got = wanted.clone();
            block_on(async move {
                let store = S3Store::from_env(&bucket, &prefix).await;
                let mut tasks = tokio::task::JoinSet::new();
                let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
                for o in got {
                    let (store, path, slots) = (store.clone(), d.join(&o.key), slots.clone());
                    tasks.spawn(async move {
                        let _slot = slots.acquire_owned().await;
                        store.get_file_if_match(&o.key, &o.etag, &path).await
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.map_err(|e| ArtifactError::Io {
                        store: format!("s3://{bucket}/{prefix}"),
                        key: String::new(),
                        msg: e.to_string(),
                    })??;
                }
                Ok::<_, ArtifactError>(())
            })
            .map_err(|e| match e {
                ArtifactError::Refused { key, .. } if planned => Error::invalid(
                    "data.path",
                    format!(
                        "{}: {key} is not the object the job was planned with (replaced or deleted since the plan)",
                        self.url()
                    ),
                ),
                e => self.err(e),
            })?;
            for o in &wanted {
                record.insert(o.key.clone(), o.etag.clone());
            }
        }
        if let Some(listed) = listed {
            record.retain(|k, _| listed.contains(k.as_str()));
            for name in local_files(&dir, "") {
                if !listed.contains(name.as_str()) {
                    let _ = std::fs::remove_file(dir.join(&name));
                }
            }
        }
        let tmp = dir.join(".defuse-mirror.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&record).expect("serialisable"))
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &record_path).map_err(|e| Error::io(&record_path, e))?;
        Ok(dir)
    }
}

/// The files under `dir` (names below it, `/`-separated), hidden ones left out.
fn local_files(dir: &Path, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let rel = format!("{prefix}{name}");
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(local_files(&e.path(), &format!("{rel}/"))),
            Ok(_) => out.push(rel),
            Err(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(S3Data::parse(Path::new("/data/mnist")).unwrap(), None);
        let d = S3Data::parse(Path::new("s3://my-bucket/sets/mnist/"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (d.bucket.as_str(), d.prefix.as_str()),
            ("my-bucket", "sets/mnist")
        );
        assert_eq!(d.url(), "s3://my-bucket/sets/mnist");
        for (bad, why) in [
            ("s3://B/x", "not a bucket name"),
            ("s3://ab", "not a bucket name"),
            ("s3://bucket/a/../b", "'..'"),
        ] {
            let e = S3Data::parse(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("data.path") && e.contains(why), "{bad}: {e}");
        }
    }
}
