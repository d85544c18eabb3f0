//! A job's files by URL: besides local paths, `models.*` and `label.file` may name an
//! object (`s3://bucket/key`) and `out` a prefix (`s3://bucket/prefix`), read and
//! written with the artifact store's S3 settings (`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! credentials from the environment). `data.path` in a bucket is `data::remote`'s.
//!
//! - **Inputs are pinned to the job.** The models step copies each input object into
//!   the job folder (`inputs/<field>-<etag hash>.<ext>`, recorded in
//!   `inputs/inputs.json`) and the job reads that copy from then on: an object replaced
//!   in the bucket mid-job changes nothing, and a rerun (the embedded mode) that finds
//!   a new version copies it and, the file name being new, redoes the steps that
//!   depend on the models. The copy is part of the job folder, so a coordinator
//!   restarted on an empty disk restores it with the rest.
//! - **An output prefix is a copy of the job folder**, the same files an `out` folder
//!   on disk would hold, kept up to date with `folder_copy` (changed files only).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifacts::{ArtifactError, S3Store};
use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::layout;

/// An `s3://bucket/key` URL (for a prefix, `key` is the prefix: no slashes at either end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl S3Url {
    /// `Some` when `path` is an `s3://` URL, an error naming `field` when it is a
    /// malformed one.
    pub fn parse(field: &str, path: &Path) -> Result<Option<S3Url>> {
        let Some(rest) = path.to_str().and_then(|s| s.strip_prefix("s3://")) else {
            return Ok(None);
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok_bucket {
            return Err(Error::invalid(
                field,
                format!("{}: '{bucket}' is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')", path.display()),
            ));
        }
        let key = key.trim_matches('/').to_string();
        if key.split('/').any(|p| p == ".." || p == ".") {
            return Err(Error::invalid(
                field,
                format!("{}: '.' and '..' are not parts of a key", path.display()),
            ));
        }
        Ok(Some(S3Url {
            bucket: bucket.into(),
            key,
        }))
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// A store rooted at this URL (for a prefix).
    pub async fn store(&self) -> S3Store {
        S3Store::from_env(&self.bucket, &self.key).await
    }

    /// An error about this URL, the job's to fix when the store refused.
    pub fn err(&self, field: &str, e: ArtifactError) -> Error {
        match e {
            ArtifactError::Refused { .. } | ArtifactError::NotFound { .. } => {
                Error::invalid(field, format!("{}: {e}", self.url()))
            }
            e => Error::io(self.url(), std::io::Error::other(e.to_string())),
        }
    }
}

/// A file a client uploaded with its job (`defuse submit`, the `PutInput` call):
/// `upload://<sha256>/<name>` in the job's config, stored with the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub sha256: String,
    pub name: String,
}

impl Upload {
    /// `Some` when `path` is an `upload://` URL, an error naming `field` when it is a
    /// malformed one.
    pub fn parse(field: &str, path: &Path) -> Result<Option<Upload>> {
        let Some(rest) = path.to_str().and_then(|s| s.strip_prefix("upload://")) else {
            return Ok(None);
        };
        match rest.split_once('/') {
            Some((sha, name)) if crate::artifacts::is_sha256(sha) && valid_upload_name(name) => {
                Ok(Some(Upload {
                    sha256: sha.into(),
                    name: name.into(),
                }))
            }
            _ => Err(Error::invalid(
                field,
                format!(
                    "{}: expected upload://<sha256>/<file name> (what `defuse submit` writes)",
                    path.display()
                ),
            )),
        }
    }

    pub fn url(&self) -> String {
        format!("upload://{}/{}", self.sha256, self.name)
    }

    /// Its copy in the job folder, for the job file's `field`.
    pub fn local_file(&self, field: &str) -> String {
        let ext = Path::new(&self.name)
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        format!("{}/{field}-{}{ext}", layout::INPUTS, &self.sha256[..12])
    }
}

/// A file name an upload may have: one plain part, not hidden, at most 200 bytes.
pub fn valid_upload_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
}

/// The job file's fields that name one input file.
pub fn input_fields(cfg: &mut JobConfig) -> [(&'static str, &mut Option<PathBuf>); 4] {
    [
        ("models.classifier", &mut cfg.models.classifier),
        ("models.vae", &mut cfg.models.vae),
        ("models.vae_decoder", &mut cfg.models.vae_decoder),
        ("label.file", &mut cfg.label.file),
    ]
}

/// The same fields, read only.
fn input_paths(cfg: &JobConfig) -> [(&'static str, Option<&Path>); 4] {
    [
        ("models.classifier", cfg.models.classifier.as_deref()),
        ("models.vae", cfg.models.vae.as_deref()),
        ("models.vae_decoder", cfg.models.vae_decoder.as_deref()),
        ("label.file", cfg.label.file.as_deref()),
    ]
}

/// Checks the `s3://` URLs a job names (inputs, `out`): a malformed one is refused
/// before anything runs.
pub fn check_urls(cfg: &JobConfig) -> Result<()> {
    for (field, p) in input_paths(cfg) {
        let Some(p) = p else { continue };
        Upload::parse(field, p)?;
        if let Some(u) = S3Url::parse(field, p)? {
            if u.key.is_empty() {
                return Err(Error::invalid(
                    field,
                    format!("{}: names a bucket, not an object", p.display()),
                ));
            }
        }
    }
    if let Some(out) = &cfg.out {
        S3Url::parse("out", out)?;
    }
    Ok(())
}

/// Whether any input of the job is in a bucket.
pub fn has_remote_inputs(cfg: &JobConfig) -> bool {
    input_paths(cfg).into_iter().any(|(_, p)| {
        p.and_then(Path::to_str)
            .is_some_and(|s| s.starts_with("s3://"))
    })
}

/// An input copied into the job folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pinned {
    url: String,
    etag: String,
    /// Below the job folder.
    file: String,
}

/// When to ask the bucket for an input's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Every time (the models step: a rerun picks up a replaced object).
    Always,
    /// Only for an input the job folder has no copy of (the steps after it).
    IfMissing,
}

/// Replaces every `s3://` input of `cfg` by its copy in the job folder `dir`, copying
/// what is missing (or, with `Refresh::Always`, replaced in the bucket).
pub fn localise_inputs(cfg: &mut JobConfig, dir: &Path, refresh: Refresh) -> Result<()> {
    if !has_remote_inputs(cfg) {
        return Ok(());
    }
    let record_path = dir.join(layout::INPUTS_RECORD);
    let mut record: BTreeMap<String, Pinned> = std::fs::read(&record_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let before = record.clone();
    for (field, p) in input_fields(cfg) {
        let Some(path) = p.as_deref() else { continue };
        let Some(url) = S3Url::parse(field, path)? else {
            continue;
        };
        let have = record
            .get(field)
            .filter(|pin| pin.url == url.url() && dir.join(&pin.file).is_file());
        let pin = match (have, refresh) {
            (Some(pin), Refresh::IfMissing) => pin.clone(),
            _ => {
                let pin = fetch(field, &url, dir, have)?;
                record.insert(field.to_string(), pin.clone());
                pin
            }
        };
        *p = Some(dir.join(&pin.file));
    }
    if record != before {
        // older copies of a replaced object go
        let keep: Vec<&str> = record.values().map(|p| p.file.as_str()).collect();
        let folder = dir.join(layout::INPUTS);
        for e in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let rel = format!("{}/{}", layout::INPUTS, e.file_name().to_string_lossy());
            if rel != layout::INPUTS_RECORD && !keep.contains(&rel.as_str()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        layout::write_json(&record_path, &record)?;
    }
    Ok(())
}

/// Copies the object at `url` into `dir/inputs/` unless `have` is its current version.
fn fetch(field: &str, url: &S3Url, dir: &Path, have: Option<&Pinned>) -> Result<Pinned> {
    let (u, f) = (url.clone(), field.to_string());
    let meta = block_on(async move { S3Store::from_env(&u.bucket, "").await.head(&u.key).await })
        .map_err(|e| url.err(&f, e))?;
    if let Some(pin) = have.filter(|p| p.etag == meta.etag) {
        return Ok(pin.clone());
    }
    // the extension says what the file is (`.safetensors`: a built-in model)
    let ext = Path::new(&url.key)
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tag = format!("{:x}", Sha256::digest(meta.etag.as_bytes()));
    let file = format!("{}/{field}-{}{ext}", layout::INPUTS, &tag[..12]);
    let to = dir.join(&file);
    tracing::info!(%field, url = %url.url(), bytes = meta.size, "copying a job input from the bucket");
    let (u, etag, path) = (url.clone(), meta.etag.clone(), to.clone());
    block_on(async move {
        S3Store::from_env(&u.bucket, "")
            .await
            .get_file_if_match(&u.key, &etag, &path)
            .await
    })
    .map_err(|e| url.err(field, e))?;
    Ok(Pinned {
        url: url.url(),
        etag: meta.etag,
        file,
    })
}

/// This user's cache of Defuse: `$DEFUSE_CACHE`, else `~/.cache/defuse`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("DEFUSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join(".cache/defuse")
        })
}

/// The working copy on this machine of an `out` in a bucket:
/// `~/.cache/defuse/out/<bucket>/<prefix>` (`$DEFUSE_CACHE` instead of
/// `~/.cache/defuse` when set).
pub fn local_out(out: &S3Url) -> PathBuf {
    let mut p = cache_root().join("out").join(&out.bucket);
    for part in out.key.split('/').filter(|p| !p.is_empty()) {
        p.push(part);
    }
    p
}

/// Brings the working copy of an `out` in a bucket up to date before a run: the files
/// the bucket's copy has and this machine lacks (a run started elsewhere carries on).
pub fn restore_out(out: &S3Url, dir: &Path) -> Result<usize> {
    let (u, d) = (out.clone(), dir.to_path_buf());
    block_on(async move {
        let store = u.store().await;
        crate::folder_copy::FolderCopy {
            store: &store,
            files: String::new(),
            manifest: layout::FOLDER_MANIFEST.into(),
        }
        .restore(&d, crate::folder_copy::Restore::MissingOnly)
        .await
    })
    .map_err(|e| out.err("out", e))
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own: callable
/// from any context (a blocking step, a plain thread, inside a runtime's worker).
pub(crate) fn block_on<F>(f: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(f)
    })
    .join()
    .expect("the S3 thread does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_name_the_field() {
        assert_eq!(S3Url::parse("out", Path::new("/runs/x")).unwrap(), None);
        let u = S3Url::parse("models.vae", Path::new("s3://my-bucket/m/vae.pt"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.key.as_str()),
            ("my-bucket", "m/vae.pt")
        );
        assert_eq!(u.url(), "s3://my-bucket/m/vae.pt");
        for (bad, why) in [
            ("s3://B/x", "not a bucket name"),
            ("s3://ab", "not a bucket name"),
            ("s3://bucket/a/../b", "'..'"),
        ] {
            let e = S3Url::parse("models.vae", Path::new(bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains("models.vae") && e.contains(why), "{bad}: {e}");
        }
        let mut cfg: JobConfig =
            toml::from_str("[data]\npath = \"/d\"\n[models]\nclassifier = \"s3://bucket\"\n")
                .unwrap();
        let e = check_urls(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("models.classifier") && e.contains("not an object"),
            "{e}"
        );
        cfg.models.classifier = Some("s3://bucket/c.pt".into());
        cfg.out = Some("s3://X/runs".into());
        let e = check_urls(&cfg).unwrap_err().to_string();
        assert!(e.contains("out") && e.contains("not a bucket name"), "{e}");
        cfg.out = Some("s3://bucket/runs".into());
        check_urls(&cfg).unwrap();
        assert!(has_remote_inputs(&cfg));
        // uploads
        let sha = "ab".repeat(32);
        let u = Upload::parse("models.vae", Path::new(&format!("upload://{sha}/vae.pt")))
            .unwrap()
            .unwrap();
        assert_eq!(
            u.local_file("models.vae"),
            "inputs/models.vae-abababababab.pt"
        );
        for bad in [
            "upload://abc/vae.pt",
            "upload://{sha}/a/b.pt",
            "upload://{sha}/.x",
        ] {
            let bad = bad.replace("{sha}", &sha);
            cfg.models.vae = Some(bad.clone().into());
            let e = check_urls(&cfg).unwrap_err().to_string();
            assert!(
                e.contains("models.vae") && e.contains("upload://<sha256>"),
                "{bad}: {e}"
            );
        }
    }
}
