//! A planted bug, to check that Defuse finds and fixes a failure whose answer is known
//! (`defuse-bench planted` and `cli/tests/planted.rs`): a copy of MNIST where a
//! recognisable slice of one class is labelled as another in the training split only.
//! [`THIN_ONES`] (the default): the third of the training 1s with the least ink,
//! labelled 7; [`BOLD_THREES`]: the third of the 3s with the most ink, labelled 8. A
//! classifier trained on the copy reads the slice as the planted label; the test split
//! keeps the true labels, so its images of the slice are the real ones to fix.
use std::path::{Path, PathBuf};

use tch::Device;

use crate::data::idx::{read_idx, write_idx};
use crate::data::{DataSpec, Split};
use crate::error::{Error, Result};
use crate::frozen::Jit;
use crate::models::Classifier;

/// Which end of a class's ink the slice takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ink {
    /// the third with the least ink (thin strokes)
    Least,
    /// the third with the most ink (bold strokes)
    Most,
}

/// A planted bug: a third of `class`, by ink, labelled `as_label` in the training split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub name: &'static str,
    pub class: i64,
    pub as_label: i64,
    pub ink: Ink,
}

/// Thin 1s labelled 7.
pub const THIN_ONES: Slice = Slice {
    name: "thin-ones",
    class: 1,
    as_label: 7,
    ink: Ink::Least,
};
/// Bold 3s labelled 8.
pub const BOLD_THREES: Slice = Slice {
    name: "bold-threes",
    class: 3,
    as_label: 8,
    ink: Ink::Most,
};

impl Slice {
    /// [`THIN_ONES`] or [`BOLD_THREES`] by name.
    pub fn named(name: &str) -> Result<Slice> {
        [THIN_ONES, BOLD_THREES]
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                Error::invalid(
                    "slice",
                    format!("'{name}': expected thin-ones or bold-threes"),
                )
            })
    }

    /// Which images of `split` are in the slice: images of the class with at most
    /// (`Least`) or at least (`Most`) `threshold` ink.
    fn rows(&self, split: &Split, threshold: u64) -> Vec<bool> {
        ink(split)
            .iter()
            .zip(&split.labels)
            .map(|(&k, &l)| {
                l == self.class
                    && match self.ink {
                        Ink::Least => k <= threshold,
                        Ink::Most => k >= threshold,
                    }
            })
            .collect()
    }
}

/// The planted copy.
#[derive(Debug, Clone)]
pub struct PlantedMnist {
    pub slice: Slice,
    /// The ink bound of the slice (sum of an image's pixels).
    pub ink_threshold: u64,
    /// Training images relabelled.
    pub train_relabelled: usize,
}

impl PlantedMnist {
    /// Which images of `split` are in the planted slice (by their true labels: on the
    /// original data, the training images it relabelled; on the test split, the real
    /// images to fix).
    pub fn rows(&self, split: &Split) -> Vec<bool> {
        self.slice.rows(split, self.ink_threshold)
    }
}

/// Ink of each image of a 28x28 split: the sum of its pixels.
fn ink(split: &Split) -> Vec<u64> {
    split
        .images
        .chunks(784)
        .map(|im| im.iter().map(|&p| p as u64).sum())
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

/// Writes the copy of the MNIST folder `mnist` with `slice` planted into `out` (IDX
/// files).
pub fn write_planted_mnist(mnist: &Path, out: &Path, slice: Slice) -> Result<PlantedMnist> {
    let ds = DataSpec::from_path(mnist).load()?;
    let mut of_class: Vec<u64> = ink(&ds.train)
        .into_iter()
        .zip(&ds.train.labels)
        .filter(|(_, &l)| l == slice.class)
        .map(|(k, _)| k)
        .collect();
    if of_class.is_empty() {
        return Err(Error::invalid(
            "planted",
            format!("the training split has no image of class {}", slice.class),
        ));
    }
    of_class.sort_unstable();
    let ink_threshold = match slice.ink {
        Ink::Least => of_class[of_class.len() / 3],
        Ink::Most => of_class[of_class.len() - 1 - of_class.len() / 3],
    };
    let rows = slice.rows(&ds.train, ink_threshold);
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
    for (l, &s) in labels.data.iter_mut().zip(&rows) {
        if s {
            *l = slice.as_label as u8;
        }
    }
    write_idx(
        &out.join("train-labels-idx1-ubyte"),
        &labels.dims,
        &labels.data,
    )?;
    Ok(PlantedMnist {
        slice,
        ink_threshold,
        train_relabelled: rows.iter().filter(|&&s| s).count(),
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

/// A classifier's accuracy on the slice and on the rest of a split (or of a part of it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceAccuracy {
    pub slice: f64,
    pub rest: f64,
    pub slice_images: usize,
    pub rest_images: usize,
}

/// [`SliceAccuracy`] on the whole test split, and on the test images identify did not
/// search: under `identify.search = "all"` the searched slice images' own failures
/// form the scenarios the correction trains on, so only the unsearched ones measure
/// whether the fix holds on images it was not steered by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceAccuracies {
    pub all: SliceAccuracy,
    pub unsearched: SliceAccuracy,
}

/// The accuracy of the classifier at `model` (a 10-class MNIST classifier) on the
/// planted slice's images of `test` (true labels) and on the rest, over the whole split
/// and over the images outside `searched` (the job's
/// [`IdentifyOptions::searched_range`](crate::identify::IdentifyOptions::searched_range)).
pub fn slice_accuracy(
    model: &Path,
    test: &Split,
    planted: &PlantedMnist,
    searched: std::ops::Range<usize>,
) -> Result<SliceAccuracies> {
    // prepared as a job prepares it to measure (the default `models.jit`)
    let clf = Classifier::load_for_inference(model, [1, 28, 28], 10, Device::Cpu, Jit::default())?;
    let slice = planted.rows(test);
    let pred = Vec::<i64>::try_from(
        clf.predict(&test.images(0..test.len(), Device::Cpu), 1000)?
            .0,
    )?;
    let tally = |rows: &mut dyn Iterator<Item = usize>| {
        let (mut s, mut sn, mut r, mut rn) = (0, 0, 0, 0);
        for i in rows {
            let right = (pred[i] == test.labels[i]) as usize;
            if slice[i] {
                (s, sn) = (s + right, sn + 1);
            } else {
                (r, rn) = (r + right, rn + 1);
            }
        }
        SliceAccuracy {
            slice: s as f64 / sn.max(1) as f64,
            rest: r as f64 / rn.max(1) as f64,
            slice_images: sn,
            rest_images: rn,
        }
    };
    Ok(SliceAccuracies {
        all: tally(&mut (0..pred.len())),
        unsearched: tally(&mut (0..pred.len()).filter(|i| !searched.contains(i))),
    })
}

/// The test images a [`job_toml`] job with `limit` searches (every other
/// identify setting at its default).
pub fn searched_range(limit: usize, test_images: usize) -> std::ops::Range<usize> {
    crate::identify::IdentifyOptions {
        limit,
        ..Default::default()
    }
    .searched_range(test_images)
}
