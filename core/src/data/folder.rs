//! The image-folder layout: `root/<class>/*.png|jpg|jpeg`, or the same under
//! `root/train/` and `root/test/`. Classes are the sorted folder names. All images must
//! have one size; colour is kept when any image of the first class has colour.
use std::path::{Path, PathBuf};

use super::RawDataset;
use crate::error::{Error, Result};

/// Image files with their class index.
type Labelled = Vec<(PathBuf, i64)>;

pub(crate) fn load(root: &Path, test_fraction: f64) -> Result<RawDataset> {
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
    let first = decode(&train_files[0].0)?;
    let channels = if first.color().has_color() { 3 } else { 1 };
    let size = (first.width(), first.height());
    let read = |files: Vec<(PathBuf, i64)>| -> Result<(Vec<u8>, Vec<i64>)> {
        let mut bytes = Vec::new();
        let mut labels = Vec::with_capacity(files.len());
        for (path, class) in files {
            let img = decode(&path)?;
            if (img.width(), img.height()) != size {
                return Err(Error::format(
                    &path,
                    format!(
                        "image is {}x{} but {} is {}x{}: all images must have one size",
                        img.width(),
                        img.height(),
                        train_files[0].0.display(),
                        size.0,
                        size.1
                    ),
                ));
            }
            if channels == 1 {
                bytes.extend_from_slice(img.to_luma8().as_raw())
            } else {
                bytes.extend_from_slice(img.to_rgb8().as_raw())
            }
            labels.push(class);
        }
        Ok((bytes, labels))
    };
    let train = read(train_files.clone())?;
    let test = read(test_files)?;
    Ok(RawDataset {
        shape: [size.1 as usize, size.0 as usize, channels],
        train,
        test,
        class_names: Some(classes),
        train_labels_file: root.to_path_buf(),
        test_labels_file: root.to_path_buf(),
    })
}

fn decode(path: &Path) -> Result<image::DynamicImage> {
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
