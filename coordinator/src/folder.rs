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
//! The copying itself (a manifest of sizes and SHA-256s, changed files only) is
//! `defuse_core::folder_copy`'s.
//! The embedded mode (`defuse run`) does neither: its folder is the user's `out`.
//!
//! A job whose `out` is a bucket prefix (`s3://bucket/prefix`) gets a copy of its
//! folder there too, after every central step.
use std::path::Path;

use defuse_core::config::JobConfig;
use defuse_core::folder_copy::{FolderCopy, Restore};
use defuse_core::sources::S3Url;

use crate::error::StepError;
use crate::keys;
use crate::state::Coordinator;
use crate::store::JobRecord;

fn copy_of<'a>(c: &'a Coordinator, job: &str) -> FolderCopy<'a> {
    FolderCopy {
        store: c.inner.artifacts.as_ref(),
        files: keys::folder_file(job, ""),
        manifest: keys::folder_manifest(job),
    }
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
        copy_of(c, &rec.id)
            .restore(dir, Restore::Replace)
            .await
            .map_err(|e| StepError::from(e).context("restoring the job folder"))?;
    }
    Ok(())
}

/// After a central step: the job folder's durable copy brought up to date, and the
/// job's `out` when it is a bucket prefix (the files an `out` folder would hold).
pub(crate) async fn publish_job(
    c: &Coordinator,
    rec: &JobRecord,
    dir: &Path,
) -> Result<(), StepError> {
    if durable(c) {
        copy_of(c, &rec.id)
            .publish(dir)
            .await
            .map_err(|e| StepError::from(e).context("publishing the job folder"))?;
    }
    let cfg: JobConfig = toml::from_str(&rec.config_toml)
        .map_err(|e| StepError::fatal(format!("job config: {e}")))?;
    let out = match &cfg.out {
        Some(p) => S3Url::parse("out", p).map_err(|e| StepError::fatal(e.to_string()))?,
        None => None,
    };
    if let Some(out) = out {
        let store = out.store().await;
        FolderCopy {
            store: &store,
            files: String::new(),
            manifest: defuse_core::layout::FOLDER_MANIFEST.into(),
        }
        .publish(dir)
        .await
        .map_err(|e| {
            StepError::from(e).context(format!("copying the job folder to out = {}", out.url()))
        })?;
    }
    Ok(())
}
