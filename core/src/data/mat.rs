//! SVHN's official MAT files (format 2, cropped digits): `train_32x32.mat` and
//! `test_32x32.mat`, MATLAB level-5 files read with the `matfile` crate. `X` is
//! 32x32x3xN uint8 in MATLAB's column-major order (row, column, channel, image) and
//! `y` holds labels 1..10, where 10 stands for the digit 0. Read as 32x32 RGB images
//! with labels 0..9 (the digit itself).
use std::path::{Path, PathBuf};

use super::RawDataset;
use crate::error::{Error, Result};

pub const TRAIN_FILE: &str = "train_32x32.mat";
pub const TEST_FILE: &str = "test_32x32.mat";

/// True when `dir` holds SVHN's MAT files.
pub fn is_svhn_dir(dir: &Path) -> bool {
    dir.join(TRAIN_FILE).is_file() || dir.join(TEST_FILE).is_file()
}

pub(crate) fn load(dir: &Path) -> Result<RawDataset> {
    let need = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::format(
                dir,
                format!("no {name} in this SVHN folder (expected {TRAIN_FILE} and {TEST_FILE})"),
            ))
        }
    };
    let (train_file, test_file) = (need(TRAIN_FILE)?, need(TEST_FILE)?);
    let (shape, train) = read_split(&train_file)?;
    let (test_shape, test) = read_split(&test_file)?;
    if shape != test_shape {
        return Err(Error::format(
            &test_file,
            format!("images are {test_shape:?} (HWC) but the train images are {shape:?}"),
        ));
    }
    Ok(RawDataset {
        shape,
        train,
        test,
        class_names: Some((0..10).map(|d| d.to_string()).collect()),
        train_labels_file: train_file,
        test_labels_file: test_file,
        // one MAT file per split, column-major: no window of it can be read alone
        parts: None,
    })
}

/// Images as NHWC bytes, and their labels.
pub type SplitData = (Vec<u8>, Vec<i64>);

/// One MAT file: the HWC shape, NHWC bytes and labels 0..9.
pub fn read_split(path: &Path) -> Result<([usize; 3], SplitData)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // matfile 0.5 panics on some malformed headers (an overflowing product of the
    // dimensions, found by tests/fuzz.rs): such a file is an error like any other.
    let parsed = std::panic::catch_unwind(|| {
        matfile::MatFile::parse(std::io::BufReader::new(file)).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|_| Err("the parser failed on a malformed header".into()));
    let mat = parsed.map_err(|e| {
        Error::format(
            path,
            format!("not a MATLAB level-5 MAT file ({e}); SVHN's format-2 files are"),
        )
    })?;
    let x = mat.find_by_name("X").ok_or_else(|| {
        Error::format(path, "no array X (the images, 32x32x3xN uint8)".to_string())
    })?;
    let y = mat
        .find_by_name("y")
        .ok_or_else(|| Error::format(path, "no array y (the labels, Nx1)".to_string()))?;
    let (h, w, c, n) = match x.size()[..] {
        [h, w, c, n] if c == 3 || c == 1 => (h, w, c, n),
        [h, w, c] if c == 3 || c == 1 => (h, w, c, 1),
        ref s => {
            return Err(Error::format(
                path,
                format!("X is {s:?}; expected H x W x 3 x N"),
            ))
        }
    };
    if h == 0 || w == 0 {
        return Err(Error::format(path, format!("X has empty images ({h}x{w})")));
    }
    let matfile::NumericData::UInt8 { real: pixels, .. } = x.data() else {
        return Err(Error::format(path, "X must be uint8".to_string()));
    };
    if pixels.len() != h * w * c * n {
        return Err(Error::format(
            path,
            format!(
                "X holds {} values, its size says {}",
                pixels.len(),
                h * w * c * n
            ),
        ));
    }
    let labels = numeric_as_i64(y.data())
        .ok_or_else(|| Error::format(path, "y must hold real numbers".to_string()))?;
    if labels.len() != n || y.size().iter().product::<usize>() != n {
        return Err(Error::format(
            path,
            format!(
                "y has {} labels ({:?}) for {n} images",
                labels.len(),
                y.size()
            ),
        ));
    }
    let mut digits = Vec::with_capacity(n);
    for (i, &l) in labels.iter().enumerate() {
        if !(1..=10).contains(&l) {
            return Err(Error::format(
                path,
                format!("label {l} of image {i} is outside 1..10"),
            ));
        }
        digits.push(l % 10);
    }
    // column-major (row, column, channel, image) to row-major (image, row, column, channel)
    let mut out = vec![0u8; pixels.len()];
    let (plane, image) = (h * w, h * w * c);
    for i in 0..n {
        for ch in 0..c {
            for col in 0..w {
                for row in 0..h {
                    out[i * image + (row * w + col) * c + ch] =
                        pixels[i * image + ch * plane + col * h + row];
                }
            }
        }
    }
    Ok(([h, w, c], (out, digits)))
}

fn numeric_as_i64(d: &matfile::NumericData) -> Option<Vec<i64>> {
    use matfile::NumericData as N;
    fn whole(v: f64) -> Option<i64> {
        (v.fract() == 0.0 && v.is_finite()).then_some(v as i64)
    }
    Some(match d {
        N::UInt8 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        N::Int8 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        N::UInt16 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        N::Int16 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        N::UInt32 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        N::Int32 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        N::Int64 { real, .. } => real.clone(),
        N::UInt64 { real, .. } => real.iter().map(|&v| v as i64).collect(),
        N::Single { real, .. } => real
            .iter()
            .map(|&v| whole(v as f64))
            .collect::<Option<_>>()?,
        N::Double { real, .. } => real.iter().map(|&v| whole(v)).collect::<Option<_>>()?,
    })
}
