//! Which paths on the coordinator's disk a submitted job may read
//! (`CoordinatorConfig::allowed_roots`). Checked at submit (before anything looks at
//! the disk) and again when the job's models step reads them (a path created, or a
//! folder swapped for a link, in between); the data folder's own links are checked
//! file by file as its manifest is taken (`within`).
use std::path::{Component, Path, PathBuf};

use defuse_core::config::JobConfig;

use crate::error::CoordinatorError;

/// Refuses a job that names a path outside `roots`, naming the field.
pub(crate) fn check_job(cfg: &JobConfig, roots: &[PathBuf]) -> Result<(), CoordinatorError> {
    for (field, path) in job_paths(cfg) {
        allowed_path(field, path, roots)?;
    }
    Ok(())
}

/// Whether a file's real path (links resolved) lies under one of `roots`.
pub(crate) fn within(real: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| {
        std::fs::canonicalize(r)
            .map(|r| real.starts_with(r))
            .unwrap_or(false)
    })
}

/// The paths a job names that a coordinator reads (its `out` is not used by a
/// served coordinator: results go to the artifact store).
pub(crate) fn job_paths(cfg: &JobConfig) -> Vec<(&'static str, &std::path::Path)> {
    // data in a bucket is read with the coordinator's S3 credentials, not from its disk
    let mut v = Vec::new();
    if !cfg.data.in_bucket() {
        v.push(("data.path", cfg.data.path.as_path()));
    }
    let m = &cfg.models;
    for (field, p) in [
        ("models.classifier", &m.classifier),
        ("models.vae", &m.vae),
        ("models.vae_decoder", &m.vae_decoder),
        ("label.file", &cfg.label.file),
    ] {
        // an object in a bucket is read with the coordinator's S3 credentials, an upload
        // is the job's own
        if let Some(p) = p.as_deref().filter(|p| !is_url(p)) {
            v.push((field, p));
        }
    }
    v
}

fn is_url(p: &Path) -> bool {
    p.to_str()
        .is_some_and(|s| s.starts_with("s3://") || s.starts_with("upload://"))
}

/// Whether a job may read `path` (the job file's `field`; a relative one from the
/// coordinator's working directory): under one of `roots` both as written (`..` taken away) and with its links resolved (a link
/// inside a root that points outside is refused too).
pub(crate) fn allowed_path(
    field: &str,
    path: &std::path::Path,
    roots: &[std::path::PathBuf],
) -> Result<(), CoordinatorError> {
    let refuse = |why: String| {
        Err(CoordinatorError::invalid(format!(
            "job config: {field}: {why}"
        )))
    };
    if roots.is_empty() {
        return refuse(format!(
            "{} is on the coordinator's disk, and this coordinator lets jobs read no folder there (its operator allows folders with --allow-path or DEFUSE_ALLOW_PATHS)",
            path.display()
        ));
    }
    // a relative path is read from the coordinator's working directory
    let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // `a/b/../c` is `a/c`
    let lexical = |p: &std::path::Path| {
        let mut out = std::path::PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                c => out.push(c),
            }
        }
        out
    };
    let outside = || {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        refuse(format!(
            "{} is outside the folders this coordinator lets jobs read ({})",
            path.display(),
            list.join(", ")
        ))
    };
    let written = lexical(path);
    if !roots.iter().any(|r| written.starts_with(lexical(r))) {
        return outside();
    }
    // links resolved: only when the path exists (a missing one is reported later,
    // and checked again when the job reads it)
    if let Ok(real) = std::fs::canonicalize(path) {
        if !within(&real, roots) {
            return outside();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_reads_only_inside_the_allowed_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join("mnist")).unwrap();
        let roots = vec![root.clone()];
        assert!(allowed_path("data.path", &root.join("mnist"), &roots).is_ok());
        assert!(allowed_path("data.path", &root.join("x/../mnist"), &roots).is_ok());
        // a missing path inside is allowed here (submit says it is missing)
        assert!(allowed_path("data.path", &root.join("nope"), &roots).is_ok());
        for (path, says) in [
            (std::path::PathBuf::from("/etc"), "outside the folders"),
            (root.join("../elsewhere"), "outside the folders"),
        ] {
            let e = allowed_path("data.path", &path, &roots)
                .unwrap_err()
                .to_string();
            assert!(e.contains("data.path") && e.contains(says), "{e}");
        }
        // a link inside the root that leads out is outside
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
            let e = allowed_path("models.vae", &root.join("etc"), &roots)
                .unwrap_err()
                .to_string();
            assert!(e.contains("models.vae") && e.contains("outside"), "{e}");
        }
        // no folder allowed: every path refused, saying how to allow one
        let e = allowed_path("data.path", &root, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--allow-path"), "{e}");
    }
}
