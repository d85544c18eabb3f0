//! A planted bug, to check that Defuse finds and fixes a failure whose answer is known
//! (`defuse-bench planted` and `cli/tests/planted.rs`): a copy of MNIST whose **thin
//! 1s** (the training 1s with the least ink, a third of them) are labelled 7 in the
//! training split only. A classifier trained on the copy reads thin 1s as 7; the test
//! split keeps the true labels, so its thin 1s are the real slice to fix.
use std::path::{Path, PathBuf};

use tch::Device;

use crate::data::idx::{read_idx, write_idx};
use crate::data::{DataSpec, Split};
use crate::error::{Error, Result};
use crate::models::Classifier;

/// The planted copy.
#[derive(Debug, Clone)]
pub struct PlantedMnist {
    /// A 1 with at most this much ink (sum of its pixels) is thin.
    pub ink_threshold: u64,
    /// Training images relabelled 7.
    pub train_relabelled: usize,
}

/// Ink of each image of a 28x28 split: the sum of its pixels.
fn ink(split: &Split) -> Vec<u64> {
    split
        .images
        .chunks(784)
        .map(|im| im.iter().map(|&p| p as u64).sum())
        .collect()
}

/// Which images of `split` are in the slice: 1s with at most `threshold` ink.
pub fn thin_ones(split: &Split, threshold: u64) -> Vec<bool> {
    ink(split)
        .iter()
        .zip(&split.labels)
        .map(|(&k, &l)| l == 1 && k <= threshold)
        .collect()
}

/// `name` or `name.gz` in an MNIST folder.
fn find_idx(dir: &Path, name: &str) -> Result<PathBuf> {
    [name.to_string(), format!("{name}.gz")]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .ok_or_else(|| Error::format(dir.join(name), "not found (nor .gz)"))
}

/// Writes the planted copy of the MNIST folder `mnist` into `out` (IDX files).
pub fn write_planted_mnist(mnist: &Path, out: &Path) -> Result<PlantedMnist> {
    let ds = DataSpec::from_path(mnist).load()?;
    let mut ones: Vec<u64> = ink(&ds.train)
        .into_iter()
        .zip(&ds.train.labels)
        .filter(|(_, &l)| l == 1)
        .map(|(k, _)| k)
        .collect();
    if ones.is_empty() {
        return Err(Error::invalid("planted", "the training split has no 1s"));
    }
    ones.sort_unstable();
    let ink_threshold = ones[ones.len() / 3];
    let slice = thin_ones(&ds.train, ink_threshold);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for f in [
        "train-images-idx3-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        let a = read_idx(&find_idx(mnist, f)?)?;
        write_idx(&out.join(f), &a.dims, &a.data)?;
    }
    let mut labels = read_idx(&find_idx(mnist, "train-labels-idx1-ubyte")?)?;
    for (l, &s) in labels.data.iter_mut().zip(&slice) {
        if s {
            *l = 7;
        }
    }
    write_idx(
        &out.join("train-labels-idx1-ubyte"),
        &labels.dims,
        &labels.data,
    )?;
    Ok(PlantedMnist {
        ink_threshold,
        train_relabelled: slice.iter().filter(|&&s| s).count(),
    })
}

/// A job on the planted copy written by [`write_planted_mnist`] into `data` beside the
/// job file (its output in `run`): the built-in models trained on it, the first `limit`
/// test images searched (0: the default), the automatic oracle, the default correction.
pub fn job_toml(classifier_epochs: usize, vae_epochs: usize, limit: usize) -> String {
    format!(
        r#"name = "planted"
seed = 0
out = "run"
device = "cpu"
[data]
path = "data"
[train]
classifier_epochs = {classifier_epochs}
vae_epochs = {vae_epochs}
vae_latent = 10
[identify]
limit = {limit}
[label]
mode = "source-majority"
"#
    )
}

/// A classifier's accuracy on the slice and on the rest of a split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceAccuracy {
    pub slice: f64,
    pub rest: f64,
    pub slice_images: usize,
    pub rest_images: usize,
}

/// The accuracy of the classifier at `model` (a 10-class MNIST classifier) on the thin
/// 1s of `test` (true label 1) and on the rest.
pub fn slice_accuracy(model: &Path, test: &Split, threshold: u64) -> Result<SliceAccuracy> {
    let clf = Classifier::load(model, [1, 28, 28], 10, Device::Cpu)?;
    let slice = thin_ones(test, threshold);
    let pred = Vec::<i64>::try_from(
        clf.predict(&test.images(0..test.len(), Device::Cpu), 1000)?
            .0,
    )?;
    let (mut s, mut sn, mut r, mut rn) = (0, 0, 0, 0);
    for (i, &p) in pred.iter().enumerate() {
        let right = (p == test.labels[i]) as usize;
        if slice[i] {
            (s, sn) = (s + right, sn + 1);
        } else {
            (r, rn) = (r + right, rn + 1);
        }
    }
    Ok(SliceAccuracy {
        slice: s as f64 / sn.max(1) as f64,
        rest: r as f64 / rn.max(1) as f64,
        slice_images: sn,
        rest_images: rn,
    })
}
