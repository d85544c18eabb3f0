//! The image-folder layout: `root/<class>/*.png|jpg|jpeg`, or the same under
//! `root/train/` and `root/test/`. Classes are the sorted folder names. All images must
//! have one size unless `data.resize` is set (`pixels.rs`); colour is kept when the
//! first image has colour.
use std::path::{Path, PathBuf};

use super::pixels::Pixels;
use super::{Part, RawDataset, Scanned};
use crate::error::{Error, Result};

/// Image files with their class index.
type Labelled = Vec<(PathBuf, i64)>;

pub(crate) fn load(
    root: &Path,
    test_fraction: f64,
    resize: Option<[u32; 2]>,
) -> Result<RawDataset> {
    let (classes, train_files, test_files) = split_files(root, test_fraction)?;
    let mut pixels = Pixels::new(resize);
    let mut read = |files: Vec<(PathBuf, i64)>| -> Result<(Vec<u8>, Vec<i64>)> {
        let mut bytes = Vec::new();
        let mut labels = Vec::with_capacity(files.len());
        for (path, class) in files {
            pixels.add(&mut bytes, decode(&path)?, &path, "")?;
            labels.push(class);
        }
        Ok((bytes, labels))
    };
    let parts = Some([parts(&train_files), parts(&test_files)]);
    let train = read(train_files)?;
    let test = read(test_files)?;
    Ok(RawDataset {
        shape: pixels.shape().expect("both splits have images"),
        train,
        test,
        class_names: Some(classes),
        parts,
        train_labels_file: root.to_path_buf(),
        test_labels_file: root.to_path_buf(),
    })
}

/// The folder's layout from its listing and its first image alone (no other image is
/// decoded: one of another size is found when a window holding it is read).
pub(crate) fn scan(root: &Path, test_fraction: f64, resize: Option<[u32; 2]>) -> Result<Scanned> {
    let (classes, train_files, test_files) = split_files(root, test_fraction)?;
    let mut pixels = Pixels::new(resize);
    let (first, _) = &train_files[0];
    pixels.add(&mut Vec::new(), decode(first)?, first, "")?;
    Ok(Scanned {
        shape: pixels.shape().expect("one image added"),
        class_names: Some(classes),
        max_label: None,
        parts: [parts(&train_files), parts(&test_files)],
    })
}

fn parts(files: &Labelled) -> Vec<Part> {
    files
        .iter()
        .map(|(p, c)| Part {
            label: Some(*c),
            ..Part::of(p, 1)
        })
        .collect()
}

/// The class names and the train and test image files (neither empty).
fn split_files(root: &Path, test_fraction: f64) -> Result<(Vec<String>, Labelled, Labelled)> {
    let (train_dir, test_dir) = (root.join("train"), root.join("test"));
    let (classes, train_files, test_files) = if train_dir.is_dir() && test_dir.is_dir() {
        let (classes, train) = list(&train_dir)?;
        let (test_classes, test) = list(&test_dir)?;
        if let Some(extra) = test_classes.iter().find(|c| !classes.contains(c)) {
            return Err(Error::format(
                &test_dir,
                format!("class folder '{extra}' is not among the train classes {classes:?}"),
            ));
        }
        let test = test
            .into_iter()
            .map(|(p, c)| {
                (
                    p,
                    classes
                        .iter()
                        .position(|x| *x == test_classes[c as usize])
                        .unwrap() as i64,
                )
            })
            .collect();
        (classes, train, test)
    } else {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::invalid(
                "data.test_fraction",
                format!("{test_fraction} is not in (0, 1)"),
            ));
        }
        let every = (1.0 / test_fraction).round().max(2.0) as usize;
        let (classes, all) = list(root)?;
        let (mut train, mut test) = (Vec::new(), Vec::new());
        let mut seen = vec![0usize; classes.len()];
        for (p, c) in all {
            let k = &mut seen[c as usize];
            if *k % every == every - 1 {
                test.push((p, c))
            } else {
                train.push((p, c))
            }
            *k += 1;
        }
        (classes, train, test)
    };
    if train_files.is_empty() || test_files.is_empty() {
        return Err(Error::format(
            root,
            format!(
                "{} train and {} test images: both splits need images",
                train_files.len(),
                test_files.len()
            ),
        ));
    }
    Ok((classes, train_files, test_files))
}

pub(crate) fn decode(path: &Path) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::format(path, format!("cannot decode image: {e}")))
}

/// Sorted class folder names and every image file under them, with its class index.
fn list(root: &Path) -> Result<(Vec<String>, Labelled)> {
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(Error::format(
            root,
            "no class folders (expected <class>/*.png or IDX files)",
        ));
    }
    let mut files = Vec::new();
    for (i, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut imgs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension()
                        .and_then(|x| x.to_str())
                        .map(|x| x.to_ascii_lowercase())
                        .as_deref(),
                    Some("png" | "jpg" | "jpeg")
                )
            })
            .collect();
        imgs.sort();
        files.extend(imgs.into_iter().map(|p| (p, i as i64)));
    }
    Ok((classes, files))
}
