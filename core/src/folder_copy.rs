//! A folder's copy in an object store: the coordinator's durable copy of each job
//! folder (`jobs/<job>/folder/` in the artifact store), and a job's `out` in a bucket
//! (`sources.rs`).
//!
//! A manifest (written last, so it only names objects that are whole) keeps each
//! file's size and SHA-256: only changed files are uploaded or downloaded. Publishing
//! merges into the manifest (a file missing locally keeps its entry), so a process that
//! restored part of a folder cannot drop the rest. Hidden files (names starting with
//! `.`), temporary files and the coordinator's scratch folders (`layout::SCRATCH`) are
//! not copied.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::artifacts::{sha256_file, ArtifactError, ArtifactStore};
use crate::layout;

/// Where a folder's copy lives in a store.
#[derive(Debug, Clone)]
pub struct FolderCopy<'a> {
    pub store: &'a dyn ArtifactStore,
    /// Key of file `rel`: `files` + `rel` (`files` empty or ending in `/`).
    pub files: String,
    /// Key of the manifest.
    pub manifest: String,
}

/// Which local files a restore replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// Missing ones and those that differ from the copy (a coordinator's folder is a
    /// cache: what differs is an earlier leadership's).
    Replace,
    /// Missing ones only (the embedded run's folder is the working copy: what differs
    /// is newer, e.g. labels a person wrote).
    MissingOnly,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Path relative to the folder (with `/`) -> what was published.
    files: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    sha256: String,
}

fn hash_file(path: &Path) -> std::io::Result<Entry> {
    Ok(Entry {
        size: std::fs::metadata(path)?.len(),
        sha256: sha256_file(path)?,
    })
}

fn is_scratch(rel: &str) -> bool {
    rel.split('/').any(|p| p.starts_with('.'))
        || layout::SCRATCH.iter().any(|s| rel.starts_with(s))
        || rel.ends_with(".tmp")
        || rel.contains(".part-")
}

/// Every file under `dir` worth keeping, with its entry.
fn scan(dir: &Path) -> std::io::Result<Vec<(String, PathBuf, Entry)>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let path = e.path();
            let kind = e.file_type()?;
            if kind.is_dir() {
                todo.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .expect("under dir")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            if is_scratch(&rel) {
                continue;
            }
            let entry = hash_file(&path)?;
            out.push((rel, path, entry));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

impl FolderCopy<'_> {
    fn io_error(&self, path: &Path, e: impl std::fmt::Display) -> ArtifactError {
        ArtifactError::Io {
            store: self.store.url(),
            key: path.display().to_string(),
            msg: e.to_string(),
        }
    }

    async fn read_manifest(&self) -> Result<Manifest, ArtifactError> {
        match self.store.get(&self.manifest).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ArtifactError::Refused {
                store: self.store.url(),
                key: self.manifest.clone(),
                msg: format!("not a folder manifest: {e}"),
            }),
            Err(ArtifactError::NotFound { .. }) => Ok(Manifest::default()),
            Err(e) => Err(e),
        }
    }

    /// Uploads what changed in `dir` since the last publication, then the manifest.
    /// Returns how many files were uploaded.
    pub async fn publish(&self, dir: &Path) -> Result<usize, ArtifactError> {
        let mut m = self.read_manifest().await?;
        let d = dir.to_path_buf();
        let local = tokio::task::spawn_blocking(move || scan(&d))
            .await
            .map_err(|e| self.io_error(dir, e))?
            .map_err(|e| self.io_error(dir, e))?;
        let mut uploaded = 0;
        for (rel, path, entry) in local {
            if m.files.get(&rel) == Some(&entry) {
                continue;
            }
            self.store
                .put_file(&format!("{}{rel}", self.files), &path)
                .await?;
            m.files.insert(rel, entry);
            uploaded += 1;
        }
        if uploaded > 0 {
            let json = serde_json::to_vec_pretty(&m).expect("manifest serialises");
            self.store.put(&self.manifest, json.into()).await?;
        }
        tracing::info!(store = %self.store.url(), files = %self.files, uploaded, total = m.files.len(), "folder published");
        Ok(uploaded)
    }

    /// Downloads into `dir` the published files it lacks (and, with
    /// `Restore::Replace`, those it holds in another version). Returns how many.
    pub async fn restore(&self, dir: &Path, how: Restore) -> Result<usize, ArtifactError> {
        let m = self.read_manifest().await?;
        let (d, wanted) = (dir.to_path_buf(), m.files.clone());
        let stale: Vec<String> = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .filter(|(rel, e)| match how {
                    Restore::Replace => hash_file(&d.join(rel)).ok().as_ref() != Some(e),
                    Restore::MissingOnly => !d.join(rel).exists(),
                })
                .map(|(rel, _)| rel)
                .collect()
        })
        .await
        .map_err(|e| self.io_error(dir, e))?;
        for rel in &stale {
            self.store
                .get_file(&format!("{}{rel}", self.files), &dir.join(rel))
                .await?;
        }
        if !stale.is_empty() {
            tracing::info!(
                store = %self.store.url(),
                downloaded = stale.len(),
                files = m.files.len(),
                "folder restored"
            );
        }
        Ok(stale.len())
    }
}
