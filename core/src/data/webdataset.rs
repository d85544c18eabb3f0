//! WebDataset shards: tar files of samples, each sample the members that share a key
//! (the member's path up to the first `.` of its file name): an image (`key.png`,
//! `.jpg`, `.jpeg` or `.webp`) and a label (`key.cls`, the class id as text, or
//! `key.json` with an integer `label`, `cls` or `class`). Other members (`.txt`,
//! `.json` without a label beside a `.cls`, ...) are ignored.
//!
//! Shards are `train*.tar` and `test*.tar` (or `val*.tar`) in the data folder, or any
//! `*.tar` under `train/` and `test/`, each split's shards in name order. Class names
//! come from `data.class_names` or a `classes.txt` beside the shards (one per line).
use std::io::Read;
use std::path::{Path, PathBuf};

use super::pixels::{decode, Pixels};
use super::{Part, RawDataset, Scanned};
use crate::error::{Error, Result};

/// The shards of each split, in order: (train, test).
pub(crate) fn shards(root: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let tars = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "tar"))
            .collect();
        v.sort();
        Ok(v)
    };
    let (train, test) = if root.join("train").is_dir() && root.join("test").is_dir() {
        (tars(&root.join("train"))?, tars(&root.join("test"))?)
    } else {
        let all = tars(root)?;
        let named = |pre: &[&str]| -> Vec<PathBuf> {
            all.iter()
                .filter(|p| {
                    let n = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_lowercase();
                    pre.iter().any(|s| n.starts_with(s))
                })
                .cloned()
                .collect()
        };
        let test = match named(&["test"]) {
            t if t.is_empty() => named(&["val"]),
            t => t,
        };
        (named(&["train"]), test)
    };
    if train.is_empty() || test.is_empty() {
        return Err(Error::format(
            root,
            format!(
                "WebDataset shards: {} train and {} test tar files found; expected train*.tar and test*.tar (or val*.tar) here, or *.tar under train/ and test/",
                train.len(),
                test.len()
            ),
        ));
    }
    Ok((train, test))
}

/// One sample as it is read: its key, and the bytes of its image and label members.
#[derive(Default)]
struct Sample {
    key: String,
    image: Option<(String, Vec<u8>)>,
    cls: Option<Vec<u8>>,
    json: Option<Vec<u8>>,
}

/// Visits the samples `skip..skip + take` of the shard `path` that `keep` (asked with
/// the sample's index in the shard) wants, in order (`take` = `usize::MAX`: to the
/// end), each as (decoded image, label); returns how many samples the shard has up to
/// where it stopped reading. The members of samples not kept are not read.
pub(crate) fn read_shard(
    path: &Path,
    skip: usize,
    take: usize,
    keep: &dyn Fn(usize) -> bool,
    visit: &mut dyn FnMut(image::DynamicImage, i64, &str) -> Result<()>,
) -> Result<usize> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let bad = |e: std::io::Error| Error::format(path, format!("not a readable tar file: {e}"));
    let mut seen = 0usize;
    let mut cur: Option<Sample> = None;
    let mut finish = |s: Sample, seen: &mut usize| -> Result<bool> {
        let index = *seen;
        *seen += 1;
        if index < skip {
            return Ok(true);
        }
        if index - skip >= take {
            return Ok(false);
        }
        if !keep(index) {
            return Ok(index + 1 - skip < take);
        }
        let what = format!(" (sample '{}')", s.key);
        let (member, bytes) = s.image.ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "sample '{}' has no image (.png, .jpg, .jpeg or .webp member)",
                    s.key
                ),
            )
        })?;
        let label = label_of(&s.key, s.cls.as_deref(), s.json.as_deref(), path)?;
        let img = decode(&bytes, path, &format!(" (member {member})"))?;
        visit(img, label, &what)?;
        Ok(index + 1 - skip < take)
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let (dir, base) = match name.rfind('/') {
            Some(i) => name.split_at(i + 1),
            None => ("", name.as_str()),
        };
        if base.starts_with('.') {
            continue;
        }
        let Some(dot) = base.find('.') else { continue };
        let key = format!("{dir}{}", &base[..dot]);
        let ext = base[dot + 1..].to_ascii_lowercase();
        if cur.as_ref().is_some_and(|s| s.key != key) && !finish(cur.take().unwrap(), &mut seen)? {
            return Ok(seen);
        }
        let s = cur.get_or_insert_with(|| Sample {
            key: key.clone(),
            ..Sample::default()
        });
        let wanted = matches!(
            ext.as_str(),
            "png" | "jpg" | "jpeg" | "webp" | "cls" | "json"
        );
        // members past the range are not read: only their headers are
        if !wanted || seen < skip || !keep(seen) {
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(bad)?;
        match ext.as_str() {
            "cls" => s.cls = Some(bytes),
            "json" => s.json = Some(bytes),
            _ if s.image.is_some() => {
                return Err(Error::format(
                    path,
                    format!(
                        "sample '{key}' has two images ({} and {name})",
                        s.image.as_ref().unwrap().0
                    ),
                ))
            }
            _ => s.image = Some((name.clone(), bytes)),
        }
    }
    if let Some(s) = cur.take() {
        finish(s, &mut seen)?;
    }
    Ok(seen)
}

fn label_of(key: &str, cls: Option<&[u8]>, json: Option<&[u8]>, path: &Path) -> Result<i64> {
    if let Some(b) = cls {
        let t = String::from_utf8_lossy(b);
        return t.trim().parse::<i64>().map_err(|_| {
            Error::format(
                path,
                format!(
                    "sample '{key}': {key}.cls holds '{}', expected a class id",
                    t.trim()
                ),
            )
        });
    }
    if let Some(b) = json {
        let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| {
            Error::format(path, format!("sample '{key}': {key}.json is not JSON: {e}"))
        })?;
        for field in ["label", "cls", "class"] {
            if let Some(x) = v.get(field) {
                return x.as_i64().ok_or_else(|| {
                    Error::format(path, format!("sample '{key}': {key}.json field '{field}' is {x}, expected an integer class id"))
                });
            }
        }
        return Err(Error::format(
            path,
            format!("sample '{key}': {key}.json has no integer 'label', 'cls' or 'class'"),
        ));
    }
    Err(Error::format(
        path,
        format!("sample '{key}' has no label (.cls or .json member)"),
    ))
}

/// Class names from a `classes.txt` beside the shards (one per line), if there is one.
pub(crate) fn class_names(root: &Path) -> Result<Option<Vec<String>>> {
    let p = root.join("classes.txt");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    Ok(Some(
        text.lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
    ))
}

/// The shards' layout without decoding them: each shard's samples counted from its
/// members' headers (no member is read), the shape of the first sample, the class
/// names of `classes.txt`.
pub(crate) fn scan(root: &Path, resize: Option<[u32; 2]>) -> Result<Scanned> {
    let (train_shards, test_shards) = shards(root)?;
    let mut pixels = Pixels::new(resize);
    let mut count = |shards: &[PathBuf]| -> Result<Vec<Part>> {
        let mut parts = Vec::new();
        for shard in shards {
            let n = if pixels.shape().is_none() {
                read_shard(shard, 0, usize::MAX, &|i| i == 0, &mut |img, _, what| {
                    pixels.add(&mut Vec::new(), img, shard, what)
                })?
            } else {
                read_shard(shard, 0, usize::MAX, &|_| false, &mut |_, _, _| Ok(()))?
            };
            parts.push(Part::of(shard, n));
        }
        Ok(parts)
    };
    let parts = [count(&train_shards)?, count(&test_shards)?];
    let shape = pixels
        .shape()
        .ok_or_else(|| Error::format(root, "the train shards hold no samples"))?;
    if parts.iter().any(|p| p.iter().all(|p| p.count == 0)) {
        return Err(Error::format(
            root,
            "the train and test shards both need samples",
        ));
    }
    Ok(Scanned {
        shape,
        class_names: class_names(root)?,
        max_label: None,
        parts,
    })
}

pub(crate) fn load(root: &Path, resize: Option<[u32; 2]>) -> Result<RawDataset> {
    let (train_shards, test_shards) = shards(root)?;
    let mut pixels = Pixels::new(resize);
    let mut read = |shards: &[PathBuf]| -> Result<(Vec<u8>, Vec<i64>, Vec<Part>)> {
        let (mut bytes, mut labels, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for shard in shards {
            let n = read_shard(shard, 0, usize::MAX, &|_| true, &mut |img, label, what| {
                labels.push(label);
                pixels.add(&mut bytes, img, shard, what)
            })?;
            parts.push(Part::of(shard, n));
        }
        Ok((bytes, labels, parts))
    };
    let (train_x, train_y, train_parts) = read(&train_shards)?;
    let (test_x, test_y, test_parts) = read(&test_shards)?;
    let (train, test) = ((train_x, train_y), (test_x, test_y));
    let shape = pixels
        .shape()
        .ok_or_else(|| Error::format(root, "the shards hold no samples"))?;
    if train.1.is_empty() || test.1.is_empty() {
        return Err(Error::format(
            root,
            format!(
                "{} train and {} test samples: both splits need images",
                train.1.len(),
                test.1.len()
            ),
        ));
    }
    Ok(RawDataset {
        shape,
        train,
        test,
        class_names: class_names(root)?,
        parts: Some([train_parts, test_parts]),
        train_labels_file: train_shards[0].clone(),
        test_labels_file: test_shards[0].clone(),
    })
}
