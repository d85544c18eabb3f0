//! Parquet files as the Hugging Face `datasets` library exports them
//! (`Dataset.to_parquet`, or a hub repository's `data/train-00000-of-00004.parquet`):
//! an image column that is a struct of `bytes` (the encoded image) and `path`, or a
//! plain binary column, and an integer label column. Class names come from
//! `data.class_names` or from the `huggingface` metadata that `datasets` writes into
//! the schema (the label's `ClassLabel` names).
//!
//! Files: every `*.parquet` under the data folder whose name or folder says its split
//! (`train…`, `test…`; `validation…`/`val…` when there is no test split), each split's
//! files in path order, rows in file order.
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};

use super::pixels::{decode, Pixels};
use super::{Part, RawDataset, Scanned};
use crate::error::{Error, Result};

/// Which columns hold the image and the label.
#[derive(Debug, Clone, Default)]
pub(crate) struct Columns {
    pub image: Option<String>,
    pub label: Option<String>,
}

/// The Parquet files of each split, in order: (train, test).
pub(crate) fn files(root: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut all = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let p = e.map_err(|e| Error::io(&dir, e))?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".parquet") {
                all.push(p);
            }
        }
    }
    all.sort();
    let split_of = |p: &Path| -> Option<&'static str> {
        let rel = p.strip_prefix(root).unwrap_or(p);
        rel.components().rev().find_map(|c| {
            let n = c.as_os_str().to_string_lossy().to_lowercase();
            [
                ("train", "train"),
                ("test", "test"),
                ("validation", "val"),
                ("valid", "val"),
                ("val", "val"),
            ]
            .iter()
            .find(|(pre, _)| n.starts_with(pre))
            .map(|(_, s)| *s)
        })
    };
    let pick = |s: &str| -> Vec<PathBuf> {
        all.iter()
            .filter(|p| split_of(p) == Some(s))
            .cloned()
            .collect()
    };
    let train = pick("train");
    let test = match pick("test") {
        t if t.is_empty() => pick("val"),
        t => t,
    };
    if train.is_empty() || test.is_empty() {
        return Err(Error::format(
            root,
            format!(
                "Parquet: {} train and {} test files found among {} .parquet files; a file's name or folder must start with train, test or validation",
                train.len(),
                test.len(),
                all.len()
            ),
        ));
    }
    Ok((train, test))
}

fn open(path: &Path) -> Result<SerializedFileReader<std::fs::File>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    SerializedFileReader::new(f)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))
}

/// The image and label column names of a file, checked against its schema.
fn columns(
    reader: &SerializedFileReader<std::fs::File>,
    path: &Path,
    want: &Columns,
) -> Result<(String, String)> {
    let schema = reader.metadata().file_metadata().schema_descr();
    let fields = schema.root_schema().get_fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    let has_bytes = |f: &parquet::schema::types::Type| {
        !f.is_group() || f.get_fields().iter().any(|c| c.name() == "bytes")
    };
    let image = match &want.image {
        Some(n) => {
            let f = fields.iter().find(|f| f.name() == n).ok_or_else(|| {
                Error::format(path, format!("no image column '{n}' (data.image_column); the columns are {names:?}"))
            })?;
            if !has_bytes(f) {
                return Err(Error::format(path, format!("column '{n}' (data.image_column) is a struct without 'bytes'")));
            }
            n.clone()
        }
        None => fields
            .iter()
            .filter(|f| f.is_group() && has_bytes(f))
            .map(|f| f.name().to_string())
            .find(|n| n == "image" || n == "img")
            .or_else(|| fields.iter().find(|f| f.is_group() && has_bytes(f)).map(|f| f.name().to_string()))
            .or_else(|| ["image", "img"].iter().find(|n| names.contains(n)).map(|n| n.to_string()))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!("no image column (a struct with 'bytes', as datasets' Image feature writes, or set data.image_column); the columns are {names:?}"),
                )
            })?,
    };
    let label = match &want.label {
        Some(n) if names.contains(&n.as_str()) => n.clone(),
        Some(n) => {
            return Err(Error::format(path, format!("no label column '{n}' (data.label_column); the columns are {names:?}")))
        }
        None => ["label", "labels", "fine_label", "cls", "class"]
            .iter()
            .find(|n| names.contains(n))
            .map(|n| n.to_string())
            .ok_or_else(|| {
                Error::format(path, format!("no label column (label, labels, fine_label, cls or class; or set data.label_column); the columns are {names:?}"))
            })?,
    };
    Ok((image, label))
}

/// Class names from the `huggingface` schema metadata (`ClassLabel` names), if any.
fn hf_class_names(
    reader: &SerializedFileReader<std::fs::File>,
    label: &str,
) -> Option<Vec<String>> {
    let kv = reader.metadata().file_metadata().key_value_metadata()?;
    let text = kv.iter().find(|k| k.key == "huggingface")?.value.as_ref()?;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let names = v
        .get("info")?
        .get("features")?
        .get(label)?
        .get("names")?
        .as_array()?;
    names.iter().map(|n| n.as_str().map(String::from)).collect()
}

/// Visits the rows `skip..skip + take` of `path` that `keep` wants, in order, each as
/// (decoded image, label, where); reads only the row groups that hold them.
pub(crate) fn read_file(
    path: &Path,
    cols: &Columns,
    skip: usize,
    take: usize,
    keep: &dyn Fn(usize) -> bool,
    visit: &mut dyn FnMut(image::DynamicImage, i64, &str) -> Result<()>,
) -> Result<Option<Vec<String>>> {
    let reader = open(path)?;
    let (image, label) = columns(&reader, path, cols)?;
    let names = hf_class_names(&reader, &label);
    let bad =
        |e: parquet::errors::ParquetError| Error::format(path, format!("cannot read rows: {e}"));
    let mut first = 0usize;
    let end = skip.saturating_add(take);
    for g in 0..reader.num_row_groups() {
        let n = reader.metadata().row_group(g).num_rows().max(0) as usize;
        let range = first..first + n;
        first += n;
        if range.end <= skip || range.start >= end || !range.clone().any(keep) {
            continue;
        }
        let group = reader.get_row_group(g).map_err(bad)?;
        for (i, row) in group.get_row_iter(None).map_err(bad)?.enumerate() {
            let index = range.start + i;
            if index < skip {
                continue;
            }
            if index >= end {
                break;
            }
            if !keep(index) {
                continue;
            }
            let row = row.map_err(bad)?;
            let what = format!(" (row {index})");
            let (bytes, y) = row_values(&row, &image, &label, path, &what)?;
            let img = decode(&bytes, path, &what)?;
            visit(img, y, &what)?;
        }
    }
    Ok(names)
}

fn row_values(
    row: &Row,
    image: &str,
    label: &str,
    path: &Path,
    what: &str,
) -> Result<(Vec<u8>, i64)> {
    let (mut bytes, mut y) = (None, None);
    for (name, field) in row.get_column_iter() {
        if name == image {
            bytes = Some(match field {
                Field::Bytes(b) => b.data().to_vec(),
                Field::Group(g) => g
                    .get_column_iter()
                    .find_map(|(n, f)| match (n.as_str(), f) {
                        ("bytes", Field::Bytes(b)) => Some(b.data().to_vec()),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        let p = g.get_column_iter().find_map(|(n, f)| match (n.as_str(), f) {
                            ("path", Field::Str(s)) => Some(s.clone()),
                            _ => None,
                        });
                        Error::format(
                            path,
                            format!(
                                "image{what} has no bytes{}: export with the images embedded (datasets' Image feature with decode=False keeps them)",
                                p.map(|p| format!(" (only the path '{p}')")).unwrap_or_default()
                            ),
                        )
                    })?,
                other => return Err(Error::format(path, format!("image{what} in column '{image}' is {other}, expected bytes"))),
            });
        } else if name == label {
            y = Some(match field {
                Field::Byte(v) => *v as i64,
                Field::Short(v) => *v as i64,
                Field::Int(v) => *v as i64,
                Field::Long(v) => *v,
                Field::UByte(v) => *v as i64,
                Field::UShort(v) => *v as i64,
                Field::UInt(v) => *v as i64,
                other => {
                    return Err(Error::format(
                        path,
                        format!(
                        "label{what} in column '{label}' is {other}, expected an integer class id"
                    ),
                    ))
                }
            });
        }
    }
    match (bytes, y) {
        (Some(b), Some(y)) => Ok((b, y)),
        _ => Err(Error::format(
            path,
            format!("row{what} lacks its image or label"),
        )),
    }
}

/// The files' layout without decoding them: rows per file from the footers, the
/// columns checked against each schema, the class names of the Hugging Face metadata,
/// the shape of the first row's image.
pub(crate) fn scan(root: &Path, resize: Option<[u32; 2]>, cols: &Columns) -> Result<Scanned> {
    let (train_files, test_files) = files(root)?;
    let mut pixels = Pixels::new(resize);
    let mut names = None;
    let mut count = |files: &[PathBuf]| -> Result<Vec<Part>> {
        let mut parts = Vec::new();
        for file in files {
            let reader = open(file)?;
            let (_, label) = columns(&reader, file, cols)?;
            if names.is_none() {
                names = hf_class_names(&reader, &label);
            }
            let n: i64 = reader.metadata().file_metadata().num_rows();
            let n = usize::try_from(n)
                .map_err(|_| Error::format(file, format!("{n} rows in the footer")))?;
            if pixels.shape().is_none() && n > 0 {
                read_file(file, cols, 0, 1, &|_| true, &mut |img, _, what| {
                    pixels.add(&mut Vec::new(), img, file, what)
                })?;
            }
            parts.push(Part::of(file, n));
        }
        Ok(parts)
    };
    let parts = [count(&train_files)?, count(&test_files)?];
    let shape = pixels
        .shape()
        .ok_or_else(|| Error::format(root, "the Parquet files hold no rows"))?;
    if parts.iter().any(|p| p.iter().all(|p| p.count == 0)) {
        return Err(Error::format(
            root,
            "the train and test files both need rows",
        ));
    }
    Ok(Scanned {
        shape,
        class_names: names,
        max_label: None,
        parts,
    })
}

pub(crate) fn load(root: &Path, resize: Option<[u32; 2]>, cols: &Columns) -> Result<RawDataset> {
    let (train_files, test_files) = files(root)?;
    let mut pixels = Pixels::new(resize);
    let mut names = None;
    let mut read = |files: &[PathBuf]| -> Result<(Vec<u8>, Vec<i64>, Vec<Part>)> {
        let (mut bytes, mut labels, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for file in files {
            let before = labels.len();
            let n = read_file(file, cols, 0, usize::MAX, &|_| true, &mut |img, y, what| {
                labels.push(y);
                pixels.add(&mut bytes, img, file, what)
            })?;
            if names.is_none() {
                names = n;
            }
            parts.push(Part::of(file, labels.len() - before));
        }
        Ok((bytes, labels, parts))
    };
    let (train_x, train_y, train_parts) = read(&train_files)?;
    let (test_x, test_y, test_parts) = read(&test_files)?;
    let (train, test) = ((train_x, train_y), (test_x, test_y));
    let shape = pixels
        .shape()
        .ok_or_else(|| Error::format(root, "the Parquet files hold no rows"))?;
    if train.1.is_empty() || test.1.is_empty() {
        return Err(Error::format(
            root,
            format!(
                "{} train and {} test rows: both splits need images",
                train.1.len(),
                test.1.len()
            ),
        ));
    }
    Ok(RawDataset {
        shape,
        train,
        test,
        class_names: names,
        parts: Some([train_parts, test_parts]),
        train_labels_file: train_files[0].clone(),
        test_labels_file: test_files[0].clone(),
    })
}
