//! The identity of a data set on disk: every regular file under `data.path` (links
//! followed, names starting with `.` skipped), with its size and SHA-256, and one
//! digest over them. A job records its data's manifest when it is planned; a worker
//! whose copy differs refuses the job's tasks, naming the first file that differs,
//! instead of searching other images than the coordinator planned.
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Files of a data folder, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataManifest {
    pub files: Vec<DataFile>,
    /// Where each image is, by file, once the data was read (the plan adds it): what
    /// lets a worker read only its shard. Not part of the digest (it follows from the
    /// files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<super::DataLayout>,
}

/// One file of a data folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// Path below the data folder, `/`-separated.
    pub name: String,
    pub size: u64,
    /// SHA-256 of the content, hex (a local file; empty for an object in a bucket).
    pub sha256: String,
    /// The object's ETag (data in a bucket; empty for a local file): a bucket's data
    /// is identified by its listing, without reading it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub etag: String,
}

impl DataManifest {
    /// The manifest of the folder `dir` (reads every file once).
    pub fn of(dir: &Path) -> Result<DataManifest> {
        Self::of_within(dir, &|_| true)
    }

    /// The manifest of `dir`, refusing any file or folder whose real path (links
    /// resolved) `allowed` rejects: a link inside the data folder that leads out of
    /// the folders a coordinator lets jobs read. A folder reached twice (a link
    /// cycle) is walked once.
    pub fn of_within(dir: &Path, allowed: &dyn Fn(&Path) -> bool) -> Result<DataManifest> {
        if let Some(bucket) = super::remote::S3Data::parse(dir)? {
            return bucket.manifest();
        }
        let bad = |p: &Path, e: std::io::Error| {
            Error::invalid("data.path", format!("{}: {e}", p.display()))
        };
        let mut files = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![(dir.to_path_buf(), String::new())];
        while let Some((folder, prefix)) = stack.pop() {
            let real = std::fs::canonicalize(&folder).map_err(|e| bad(&folder, e))?;
            if !allowed(&real) {
                return Err(Error::invalid(
                    "data.path",
                    format!(
                        "{} leads to {}, outside the folders jobs may read",
                        folder.display(),
                        real.display()
                    ),
                ));
            }
            if !seen.insert(real) {
                continue;
            }
            let entries = std::fs::read_dir(&folder).map_err(|e| bad(&folder, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| bad(&folder, e))?;
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with('.') {
                    continue;
                }
                let path = entry.path();
                // links followed: a data folder is often a link into a cache
                let meta = std::fs::metadata(&path).map_err(|e| bad(&path, e))?;
                let rel = format!("{prefix}{name}");
                if meta.is_dir() {
                    stack.push((path, format!("{rel}/")));
                } else if meta.is_file() {
                    let real = std::fs::canonicalize(&path).map_err(|e| bad(&path, e))?;
                    if !allowed(&real) {
                        return Err(Error::invalid(
                            "data.path",
                            format!(
                                "{} leads to {}, outside the folders jobs may read",
                                path.display(),
                                real.display()
                            ),
                        ));
                    }
                    let sha256 = crate::artifacts::sha256_file(&path).map_err(|e| bad(&path, e))?;
                    files.push(DataFile {
                        name: rel,
                        size: meta.len(),
                        sha256,
                        etag: String::new(),
                    });
                }
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(DataManifest {
            files,
            layout: None,
        })
    }

    /// One SHA-256 (hex) over every file's name, size and hash.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            if f.etag.is_empty() {
                h.update(format!("{}\t{}\t{}\n", f.name, f.size, f.sha256).as_bytes());
            } else {
                h.update(
                    format!("{}\t{}\t{}\tetag:{}\n", f.name, f.size, f.sha256, f.etag).as_bytes(),
                );
            }
        }
        format!("{:x}", h.finalize())
    }

    /// How the data `seen` here differs from this manifest (the one the job was
    /// planned with), naming the first file that differs; `None` when they are equal.
    pub fn difference(&self, seen: &DataManifest) -> Option<String> {
        let planned: std::collections::BTreeMap<&str, &DataFile> =
            self.files.iter().map(|f| (f.name.as_str(), f)).collect();
        let here: std::collections::BTreeMap<&str, &DataFile> =
            seen.files.iter().map(|f| (f.name.as_str(), f)).collect();
        for (name, p) in &planned {
            match here.get(name) {
                None => return Some(format!("{name} is missing here")),
                Some(h) if h.size != p.size => {
                    return Some(format!(
                        "{name} has {} bytes here, {} in the job's data",
                        h.size, p.size
                    ))
                }
                Some(h) if h.sha256 != p.sha256 => {
                    return Some(format!(
                        "{name} differs (SHA-256 {} here, {} in the job's data)",
                        h.sha256, p.sha256
                    ))
                }
                Some(h) if h.etag != p.etag => {
                    return Some(format!(
                        "{name} was replaced (ETag {} here, {} in the job's data)",
                        h.etag, p.etag
                    ))
                }
                Some(_) => {}
            }
        }
        here.keys()
            .find(|n| !planned.contains_key(*n))
            .map(|n| format!("{n} is here but not in the job's data"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("a")).unwrap();
        std::fs::write(d.join("a/x.png"), b"one").unwrap();
        std::fs::write(d.join("labels.txt"), b"0 1").unwrap();
        std::fs::write(d.join(".hidden"), b"skipped").unwrap();
        let planned = DataManifest::of(d).unwrap();
        assert_eq!(
            planned
                .files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            ["a/x.png", "labels.txt"]
        );
        assert_eq!(planned.difference(&DataManifest::of(d).unwrap()), None);
        let digest = planned.digest();

        std::fs::write(d.join("a/x.png"), b"two").unwrap();
        let seen = DataManifest::of(d).unwrap();
        assert_ne!(seen.digest(), digest);
        let why = planned.difference(&seen).unwrap();
        assert!(why.contains("a/x.png") && why.contains("differs"), "{why}");

        std::fs::remove_file(d.join("labels.txt")).unwrap();
        std::fs::write(d.join("a/x.png"), b"one").unwrap();
        let why = planned.difference(&DataManifest::of(d).unwrap()).unwrap();
        assert!(
            why.contains("labels.txt") && why.contains("missing"),
            "{why}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn links_out_of_the_allowed_folders_are_refused_and_cycles_walked_once() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("data");
        std::fs::create_dir_all(d.join("a")).unwrap();
        std::fs::write(d.join("a/x.png"), b"one").unwrap();
        // a cycle: walked once, no endless walk
        std::os::unix::fs::symlink(&d, d.join("a/again")).unwrap();
        let root = std::fs::canonicalize(&d).unwrap();
        let inside = |p: &Path| p.starts_with(&root);
        let m = DataManifest::of_within(&d, &inside).unwrap();
        assert_eq!(m.files.len(), 1, "{m:?}");
        // a link out of the data folder is refused, naming it
        std::fs::write(tmp.path().join("secret.txt"), b"not data").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.txt"), d.join("a/leak")).unwrap();
        let e = DataManifest::of_within(&d, &inside)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a/leak") && e.contains("outside"), "{e}");
    }
}
