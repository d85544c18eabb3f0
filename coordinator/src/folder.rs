//! The durable copy of a job folder.
//!
//! Central steps (models, distill, pictures, label, correct, report) run the pipeline
//! in a local job folder, which resumes a step from its `done.json`. On a cluster that
//! folder is a cache: after every central step the coordinator **publishes** it to the
//! artifact store (`jobs/<job>/folder/<path>`, then the manifest `folder.json` last, so
//! a manifest only names objects that are whole), and before every central step it
//! **restores** what the manifest names and the local folder lacks. A coordinator
//! restarted on an empty disk so finds the models it trained, the scenarios, the
//! pictures and the round results where the last one left them, and never trains or
//! distills again what was published.
//!
//! The manifest keeps each file's size and SHA-256: only changed files are uploaded
//! or downloaded. Publishing merges into the manifest (a file missing locally keeps
//! its entry), so a coordinator that restored part of a folder cannot drop the rest.
//! The embedded mode (`defuse run`) does neither: its folder is the user's `out`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use defuse_core::artifacts::{ArtifactError, ArtifactStore};
use serde::{Deserialize, Serialize};

use crate::error::StepError;
use crate::keys;
use crate::state::Coordinator;
use crate::store::JobRecord;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Path relative to the job folder (with `/`) -> what was published.
    files: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    sha256: String,
}

fn io_error(store: &dyn ArtifactStore, path: &Path, e: impl std::fmt::Display) -> ArtifactError {
    ArtifactError::Io {
        store: store.url(),
        key: path.display().to_string(),
        msg: e.to_string(),
    }
}

async fn manifest(store: &dyn ArtifactStore, job: &str) -> Result<Manifest, ArtifactError> {
    match store.get(&keys::folder_manifest(job)).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ArtifactError::Refused {
            store: store.url(),
            key: keys::folder_manifest(job),
            msg: format!("not a folder manifest: {e}"),
        }),
        Err(ArtifactError::NotFound { .. }) => Ok(Manifest::default()),
        Err(e) => Err(e),
    }
}

fn hash_file(path: &Path) -> std::io::Result<Entry> {
    Ok(Entry {
        size: std::fs::metadata(path)?.len(),
        sha256: defuse_core::artifacts::sha256_file(path)?,
    })
}

fn is_scratch(rel: &str) -> bool {
    rel == MARKER
        || keys::files::SCRATCH.iter().any(|s| rel.starts_with(s))
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

/// Uploads what changed in `dir` since the last publication, then the manifest.
/// Returns how many files were uploaded.
pub(crate) async fn publish(
    store: &dyn ArtifactStore,
    job: &str,
    dir: &Path,
) -> Result<usize, ArtifactError> {
    let mut m = manifest(store, job).await?;
    let d = dir.to_path_buf();
    let local = tokio::task::spawn_blocking(move || scan(&d))
        .await
        .map_err(|e| io_error(store, dir, e))?
        .map_err(|e| io_error(store, dir, e))?;
    let mut uploaded = 0;
    for (rel, path, entry) in local {
        if m.files.get(&rel) == Some(&entry) {
            continue;
        }
        store.put_file(&keys::folder_file(job, &rel), &path).await?;
        m.files.insert(rel, entry);
        uploaded += 1;
    }
    if uploaded > 0 {
        let json = serde_json::to_vec_pretty(&m).expect("manifest serialises");
        store.put(&keys::folder_manifest(job), json.into()).await?;
    }
    tracing::info!(job, uploaded, files = m.files.len(), "job folder published");
    Ok(uploaded)
}

/// Downloads into `dir` every published file it lacks or holds in another version.
/// Returns how many files were downloaded.
pub(crate) async fn restore(
    store: &dyn ArtifactStore,
    job: &str,
    dir: &Path,
) -> Result<usize, ArtifactError> {
    let m = manifest(store, job).await?;
    let (d, wanted) = (dir.to_path_buf(), m.files.clone());
    let stale: Vec<String> = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .filter(|(rel, e)| hash_file(&d.join(rel)).ok().as_ref() != Some(e))
            .map(|(rel, _)| rel)
            .collect()
    })
    .await
    .map_err(|e| io_error(store, dir, e))?;
    for rel in &stale {
        store
            .get_file(&keys::folder_file(job, rel), &dir.join(rel))
            .await?;
    }
    if !stale.is_empty() {
        tracing::info!(
            job,
            downloaded = stale.len(),
            files = m.files.len(),
            "job folder restored from the artifact store"
        );
    }
    Ok(stale.len())
}

/// Whether the job folder has a durable copy (not in the embedded mode, whose folder
/// is the user's `out`).
fn durable(c: &Coordinator) -> bool {
    !c.inner.cfg.use_job_out
}

/// The marker of which job a cached folder belongs to: a job deleted and submitted
/// again under the same id must not find the old job's files (its `done.json`).
const MARKER: &str = ".defuse-job";

/// Before a central step: the job folder as the last step published it.
pub(crate) async fn restore_job(
    c: &Coordinator,
    rec: &JobRecord,
    dir: &Path,
) -> Result<(), StepError> {
    if durable(c) {
        let mark = rec.created_ms.to_string();
        let marker = dir.join(MARKER);
        let io = |e: std::io::Error| StepError::fatal(format!("{}: {e}", dir.display()));
        match std::fs::read_to_string(&marker) {
            Ok(m) if m == mark => {}
            Ok(_) => {
                tracing::info!(job = %rec.id, "cached folder of an earlier job of this id removed");
                std::fs::remove_dir_all(dir).map_err(io)?;
            }
            Err(_) => {}
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(&marker, mark).map_err(io)?;
        restore(c.inner.artifacts.as_ref(), &rec.id, dir)
            .await
            .map_err(|e| StepError::from(e).context("restoring the job folder"))?;
    }
    Ok(())
}

/// After a central step: the job folder's durable copy brought up to date.
pub(crate) async fn publish_job(c: &Coordinator, job: &str, dir: &Path) -> Result<(), StepError> {
    if durable(c) {
        publish(c.inner.artifacts.as_ref(), job, dir)
            .await
            .map_err(|e| StepError::from(e).context("publishing the job folder"))?;
    }
    Ok(())
}
