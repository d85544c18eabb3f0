//! Datasets: labelled images with a train and a test split, read from IDX files
//! (MNIST, Fashion-MNIST, the 32x32 GTSRB copy), SVHN's MAT files, an image-folder
//! layout, WebDataset tar shards or Parquet files as Hugging Face `datasets` exports
//! them.
//! Pixels are kept as bytes (HWC) and become float32 NCHW in [0,1] one batch at a time.
mod folder;
pub mod idx;
pub mod manifest;
pub mod mat;
mod parquet;
mod pixels;
pub mod remote;
mod webdataset;
mod window;

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Which split of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    Train,
    #[default]
    Test,
}

impl std::fmt::Display for SplitName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SplitName::Train => "train",
            SplitName::Test => "test",
        })
    }
}

/// One split, or a window of it: `len` images of the dataset's shape, stored HWC as
/// bytes. Indices are the whole split's: a window (`DataSpec::read_window`, what a
/// worker reads for its shard) holds images `offset..offset + len` only.
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    /// bytes per image (H * W * C)
    stride: usize,
    shape: [usize; 3],
    /// the index of the first image held (0 for a whole split)
    offset: usize,
    /// a sparse split (`DataSpec::read_rows`, what a fine-tune part reads): the
    /// indices of the images held, ascending; `None`: `offset..offset + len`
    rows: Option<Vec<usize>>,
    /// a split whose images stay in their files (`DataSpec::open`): none held, each
    /// read by window (`read`, `for_windows`)
    source: Option<Arc<SplitSource>>,
}

/// Where a split left in its files is read from.
#[derive(Debug, Clone)]
struct SplitSource {
    spec: DataSpec,
    layout: DataLayout,
    which: SplitName,
    /// images of the split (after `limit_train` / `limit_test`)
    len: usize,
}

/// Pixels read at once from a split left in its files ([`Split::for_windows`], the
/// single-process fine-tune's groups of steps).
const WINDOW_BYTES: usize = 64 << 20;

impl Split {
    fn new(images: Vec<u8>, labels: Vec<i64>, shape: [usize; 3]) -> Self {
        Self::window_of(images, labels, shape, 0)
    }

    fn window_of(images: Vec<u8>, labels: Vec<i64>, shape: [usize; 3], offset: usize) -> Self {
        let stride = shape.iter().product();
        debug_assert_eq!(images.len(), stride * labels.len());
        Split {
            images,
            labels,
            stride,
            shape,
            offset,
            rows: None,
            source: None,
        }
    }

    fn on_files(source: SplitSource) -> Self {
        Split {
            source: Some(Arc::new(source)),
            ..Self::window_of(Vec::new(), Vec::new(), [0, 0, 0], 0)
        }
    }

    /// Bytes of one image's pixels (`h * w * c`).
    pub fn bytes_per_image(&self) -> usize {
        match &self.source {
            Some(s) => s.layout.shape.iter().product(),
            None => self.stride,
        }
    }

    /// Images of at most 64 MiB of pixels: how many a read from the files takes at
    /// once.
    pub fn rows_per_window(&self) -> usize {
        (WINDOW_BYTES / self.bytes_per_image().max(1)).max(1)
    }

    /// Whether the images are in memory; else they are read by window ([`Split::read`]).
    pub fn is_held(&self) -> bool {
        self.source.is_none()
    }

    /// A split holding images `range`: this one when it holds them, else a window read
    /// from the files.
    pub fn read(&self, range: Range<usize>) -> Result<Cow<'_, Split>> {
        match &self.source {
            None => Ok(Cow::Borrowed(self)),
            Some(s) => {
                if range.end > s.len {
                    return Err(Error::invalid(
                        "data window",
                        format!(
                            "{}..{} is outside the {} split of {} images",
                            range.start, range.end, s.which, s.len
                        ),
                    ));
                }
                let ds = s.spec.read_window(&s.layout, s.which, range)?;
                Ok(Cow::Owned(ds.into_split(s.which)))
            }
        }
    }

    /// A split holding the images `rows`: this one when it holds every image, else
    /// those rows read from the files.
    pub fn read_rows(&self, rows: &[usize]) -> Result<Cow<'_, Split>> {
        match &self.source {
            None => Ok(Cow::Borrowed(self)),
            Some(s) => {
                if let Some(&i) = rows.iter().find(|&&i| i >= s.len) {
                    return Err(Error::invalid(
                        "data rows",
                        format!(
                            "image {i} is outside the {} split of {} images",
                            s.which, s.len
                        ),
                    ));
                }
                let ds = s.spec.read_rows(&s.layout, s.which, rows, None)?;
                Ok(Cow::Owned(ds.into_split(s.which)))
            }
        }
    }

    /// The whole split in memory (read from the files when it is left there): for the
    /// steps that draw batches from all of it (training the built-in models, the
    /// single-process fine-tune).
    pub fn whole(&self) -> Result<Cow<'_, Split>> {
        self.read(0..self.len())
    }

    /// Calls `f` with windows that together hold the images `range`, in order, each
    /// with the part of `range` it holds: this split once when it is in memory, else
    /// windows of at most 64 MiB of pixels read one after the other.
    pub fn for_windows(
        &self,
        range: Range<usize>,
        mut f: impl FnMut(&Split, Range<usize>) -> Result<()>,
    ) -> Result<()> {
        if self.source.is_none() {
            return f(self, range);
        }
        let step = self.rows_per_window();
        let mut a = range.start;
        while a < range.end {
            let b = (a + step).min(range.end);
            let w = self.read(a..b)?;
            f(&w, a..b)?;
            a = b;
        }
        Ok(())
    }

    /// The images at `rows` (ascending, distinct indices of the whole split).
    pub(crate) fn rows_of(
        images: Vec<u8>,
        labels: Vec<i64>,
        shape: [usize; 3],
        rows: Vec<usize>,
    ) -> Self {
        debug_assert_eq!(rows.len(), labels.len());
        debug_assert!(rows.windows(2).all(|w| w[0] < w[1]));
        Split {
            rows: Some(rows),
            ..Self::window_of(images, labels, shape, 0)
        }
    }

    /// Where image `i` (an index of the whole split) is held. Asking for an image not
    /// held is a bug of the caller (every reader of a window or rows asks only for
    /// what it read).
    fn at(&self, i: usize) -> usize {
        assert!(
            self.source.is_none(),
            "image {i} asked of a split left in its files: read a window first"
        );
        match &self.rows {
            None => i - self.offset,
            Some(rows) => rows
                .binary_search(&i)
                .unwrap_or_else(|_| panic!("image {i} is not among the rows held")),
        }
    }

    /// Whether every image of `range` is held.
    pub fn holds(&self, range: Range<usize>) -> bool {
        match &self.rows {
            None => range.start >= self.offset && range.end <= self.offset + self.len(),
            Some(rows) => {
                range.is_empty()
                    || rows
                        .binary_search(&range.start)
                        .is_ok_and(|a| rows.get(a + range.len() - 1) == Some(&(range.end - 1)))
            }
        }
    }

    /// The number of images held (of a split left in its files: its images).
    pub fn len(&self) -> usize {
        match &self.source {
            Some(s) => s.len,
            None => self.labels.len(),
        }
    }

    /// The label of image `i` (an index of the whole split, inside `window`).
    pub fn label(&self, i: usize) -> i64 {
        self.labels[self.at(i)]
    }

    /// The indices of the images held: `0..len` for a whole split (for rows: from the
    /// first to past the last, not all of them held).
    pub fn window(&self) -> Range<usize> {
        if self.source.is_some() {
            return 0..0;
        }
        match &self.rows {
            None => self.offset..self.offset + self.labels.len(),
            Some(r) => r.first().map_or(0..0, |&a| a..r[r.len() - 1] + 1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Images `range` as float32 NCHW in [0,1] on `device`.
    pub fn images(&self, range: Range<usize>, device: Device) -> Tensor {
        if self.rows.is_some() || self.source.is_some() {
            return self.gather(&range.collect::<Vec<_>>(), device);
        }
        let (a, b) = (range.start - self.offset, range.end - self.offset);
        let bytes = &self.images[a * self.stride..b * self.stride];
        self.to_tensor(bytes, range.len(), device)
    }

    /// The images at `indices` (any order, repeats allowed) as float32 NCHW in [0,1].
    pub fn gather(&self, indices: &[usize], device: Device) -> Tensor {
        let mut bytes = Vec::with_capacity(indices.len() * self.stride);
        for &i in indices {
            let i = self.at(i);
            bytes.extend_from_slice(&self.images[i * self.stride..(i + 1) * self.stride]);
        }
        self.to_tensor(&bytes, indices.len(), device)
    }

    pub fn labels(&self, range: Range<usize>, device: Device) -> Tensor {
        if self.rows.is_some() || self.source.is_some() {
            return self.gather_labels(&range.collect::<Vec<_>>(), device);
        }
        Tensor::from_slice(&self.labels[range.start - self.offset..range.end - self.offset])
            .to_device(device)
    }

    pub fn gather_labels(&self, indices: &[usize], device: Device) -> Tensor {
        let v: Vec<i64> = indices.iter().map(|&i| self.labels[self.at(i)]).collect();
        Tensor::from_slice(&v).to_device(device)
    }

    fn to_tensor(&self, bytes: &[u8], n: usize, device: Device) -> Tensor {
        let [h, w, c] = self.shape;
        upload(
            Tensor::from_slice(bytes).view([n as i64, h as i64, w as i64, c as i64]),
            device,
        )
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
            / 255.0
    }

    /// Keeps the first `n` images (for quick runs and tests).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        if let Some(s) = &mut self.source {
            Arc::make_mut(s).len = n;
            return;
        }
        self.labels.truncate(n);
        self.images.truncate(n * self.stride);
        if let Some(r) = &mut self.rows {
            r.truncate(n);
        }
    }
}

/// A labelled image dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub class_names: Vec<String>,
    /// channels, height, width
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub train: Split,
    pub test: Split,
    /// Where its images are, by file (`None` for SVHN's MAT files).
    pub layout: Option<DataLayout>,
}

impl Dataset {
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    pub fn split(&self, which: SplitName) -> &Split {
        match which {
            SplitName::Train => &self.train,
            SplitName::Test => &self.test,
        }
    }

    /// `[C, H, W]`, the shape every model of this dataset takes.
    pub fn image_shape(&self) -> [i64; 3] {
        [self.channels as i64, self.height as i64, self.width as i64]
    }

    /// The class name, or the class id as text when the dataset has no names.
    pub fn class_name(&self, class: i64) -> String {
        usize::try_from(class)
            .ok()
            .and_then(|c| self.class_names.get(c).cloned())
            .unwrap_or_else(|| class.to_string())
    }

    /// Split `which`, taken out.
    pub fn into_split(self, which: SplitName) -> Split {
        match which {
            SplitName::Train => self.train,
            SplitName::Test => self.test,
        }
    }

    /// This data set with both splits in memory (read from the files where they were
    /// left there): what training the built-in models needs.
    pub fn held(&self) -> Result<Cow<'_, Dataset>> {
        if self.train.is_held() && self.test.is_held() {
            return Ok(Cow::Borrowed(self));
        }
        Ok(Cow::Owned(Dataset {
            train: self.train.whole()?.into_owned(),
            test: self.test.whole()?.into_owned(),
            ..self.clone()
        }))
    }

    /// Index ranges of at most `shard_size` images covering `split`: what a shard is.
    pub fn shards(&self, which: SplitName, shard_size: usize) -> Vec<Range<usize>> {
        let n = self.split(which).len();
        let size = shard_size.max(1);
        (0..n.div_ceil(size))
            .map(|i| i * size..((i + 1) * size).min(n))
            .collect()
    }
}

/// Where a dataset comes from; the `[data]` table of a job config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A folder of IDX files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    /// `t10k-...` or `test-...`), SVHN's MAT files, WebDataset shards (`train-*.tar`,
    /// `test-*.tar`), Parquet files (`train-*.parquet`, ...) or an image folder
    /// (`<class>/*.png`, optionally under `train/` and `test/`).
    pub path: PathBuf,
    /// `idx`, `svhn` (`train_32x32.mat` + `test_32x32.mat`), `webdataset`, `parquet`,
    /// `folder`, or `auto` (default: IDX when the folder holds IDX files, else SVHN's
    /// MAT files, else WebDataset when it holds `.tar` files, else Parquet when it holds
    /// `.parquet` files, else folders).
    #[serde(default)]
    pub format: DataFormat,
    /// `[height, width]`: scale every image to cover this size and crop the centre
    /// (image folders, WebDataset and Parquet; their images may then differ in size).
    /// Default: none, and all images must have one size.
    #[serde(default)]
    pub resize: Option<[u32; 2]>,
    /// Parquet: the image column (default: `image`, `img`, or the first struct column
    /// with `bytes`).
    #[serde(default)]
    pub image_column: Option<String>,
    /// Parquet: the label column (default: `label`, `labels`, `fine_label`, `cls` or
    /// `class`).
    #[serde(default)]
    pub label_column: Option<String>,
    /// Name shown in reports; default: the folder's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Class names, in class-id order; default: the ids (IDX) or folder names.
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// Number of classes; default: the number of class names, or the largest label + 1.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Image folders without `train/` and `test/`: every k-th image per class goes to
    /// test, for a test fraction of 1/k (default 0.2).
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Use only the first images of each split (0 = all); for quick runs.
    #[serde(default)]
    pub limit_train: usize,
    #[serde(default)]
    pub limit_test: usize,
}

fn default_test_fraction() -> f64 {
    0.2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    #[default]
    Auto,
    Idx,
    Svhn,
    Webdataset,
    Parquet,
    Folder,
}

impl DataSpec {
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        DataSpec {
            path: path.into(),
            format: DataFormat::Auto,
            resize: None,
            image_column: None,
            label_column: None,
            name: None,
            class_names: None,
            num_classes: None,
            test_fraction: default_test_fraction(),
            limit_train: 0,
            limit_test: 0,
        }
    }

    /// Whether `path` names data in a bucket (`s3://...`).
    pub fn in_bucket(&self) -> bool {
        self.path.to_str().is_some_and(|p| p.starts_with("s3://"))
    }

    /// Reads the whole data set into memory (every image decoded, every label checked).
    pub fn load(&self) -> Result<Dataset> {
        let local = self.local()?;
        let format = local.resolved_format()?;
        local.load_local(format)
    }

    /// The data set with its images left in their files: the layout read without
    /// decoding them (IDX headers and labels, tar members' headers, Parquet footers, a
    /// folder's listing; one image for the shape), each split read by window when a
    /// step asks for images (`Split::read`, `Split::for_windows`). What the central
    /// steps use: their memory follows the window, not the data set. A label out of
    /// range or an image of another size is then found by the read that meets it, and
    /// named. SVHN's MAT files, and WebDataset or Parquet data whose classes neither
    /// the files (`classes.txt`, the Hugging Face metadata) nor the config name, are
    /// read whole ([`DataSpec::load`]).
    pub fn open(&self) -> Result<Dataset> {
        let local = self.local()?;
        let format = local.resolved_format()?;
        let cols = parquet::Columns {
            image: local.image_column.clone(),
            label: local.label_column.clone(),
        };
        let scanned = match format {
            DataFormat::Idx => scan_idx_dir(&local.path)?,
            DataFormat::Webdataset => webdataset::scan(&local.path, local.resize)?,
            DataFormat::Parquet => parquet::scan(&local.path, local.resize, &cols)?,
            DataFormat::Folder => folder::scan(&local.path, local.test_fraction, local.resize)?,
            DataFormat::Svhn | DataFormat::Auto => return local.load_local(format),
        };
        let Some(class_names) = local.class_names_of(scanned.class_names, scanned.max_label)?
        else {
            return local.load_local(format);
        };
        let name = local.dataset_name();
        let layout = local.layout_of(format, scanned.shape, &class_names, &name, scanned.parts);
        let [h, w, c] = scanned.shape;
        let on_files = |which: SplitName, limit: usize| {
            let n = layout.images(which);
            Split::on_files(SplitSource {
                spec: local.clone(),
                layout: layout.clone(),
                which,
                len: if limit > 0 { n.min(limit) } else { n },
            })
        };
        Ok(Dataset {
            name,
            class_names,
            channels: c,
            height: h,
            width: w,
            train: on_files(SplitName::Train, local.limit_train),
            test: on_files(SplitName::Test, local.limit_test),
            layout: Some(layout),
        })
    }

    /// This spec, or for data in a bucket a spec of the process's local copy of it
    /// (named after the prefix).
    fn local(&self) -> Result<DataSpec> {
        let Some(bucket) = remote::S3Data::parse(&self.path)? else {
            return Ok(self.clone());
        };
        Ok(DataSpec {
            path: bucket.mirror()?,
            name: Some(self.name.clone().unwrap_or_else(|| {
                bucket
                    .prefix
                    .rsplit('/')
                    .next()
                    .filter(|s| !s.is_empty())
                    .unwrap_or(&bucket.bucket)
                    .to_string()
            })),
            ..self.clone()
        })
    }

    /// The format of the local folder `path` (`auto` resolved), with `resize` checked.
    fn resolved_format(&self) -> Result<DataFormat> {
        if !self.path.is_dir() {
            return Err(Error::invalid(
                "data.path",
                format!(
                    "{} is not a folder (expected IDX files or <class>/ folders)",
                    self.path.display()
                ),
            ));
        }
        let format = match self.format {
            DataFormat::Auto if find_idx(&self.path, &["train-images"]).is_some() => {
                DataFormat::Idx
            }
            DataFormat::Auto if mat::is_svhn_dir(&self.path) => DataFormat::Svhn,
            DataFormat::Auto if has_files(&self.path, ".tar", 1) => DataFormat::Webdataset,
            DataFormat::Auto if has_files(&self.path, ".parquet", 3) => DataFormat::Parquet,
            DataFormat::Auto => DataFormat::Folder,
            f => f,
        };
        if self.resize.is_some() && matches!(format, DataFormat::Idx | DataFormat::Svhn) {
            return Err(Error::invalid(
                "data.resize",
                "applies to image folders, WebDataset and Parquet; IDX and SVHN images are stored at one size",
            ));
        }
        if let Some([h, w]) = self.resize {
            if h == 0 || w == 0 || h > 4096 || w > 4096 {
                return Err(Error::invalid(
                    "data.resize",
                    format!("[{h}, {w}]: height and width must be 1 to 4096"),
                ));
            }
        }
        Ok(format)
    }

    fn load_local(&self, format: DataFormat) -> Result<Dataset> {
        let raw = match format {
            DataFormat::Idx => load_idx_dir(&self.path)?,
            DataFormat::Svhn => mat::load(&self.path)?,
            DataFormat::Webdataset => webdataset::load(&self.path, self.resize)?,
            DataFormat::Parquet => parquet::load(
                &self.path,
                self.resize,
                &parquet::Columns {
                    image: self.image_column.clone(),
                    label: self.label_column.clone(),
                },
            )?,
            _ => folder::load(&self.path, self.test_fraction, self.resize)?,
        };
        let mut ds = self.finish(raw, format)?;
        if self.limit_train > 0 {
            ds.train.truncate(self.limit_train);
        }
        if self.limit_test > 0 {
            ds.test.truncate(self.limit_test);
        }
        Ok(ds)
    }

    fn dataset_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .canonicalize()
                .unwrap_or_else(|_| self.path.clone())
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data".into())
        })
    }

    /// The class names: the config's, else the files', else `0..=max_label` (`None`
    /// where the labels were not read).
    fn class_names_of(
        &self,
        from_files: Option<Vec<String>>,
        max_label: Option<i64>,
    ) -> Result<Option<Vec<String>>> {
        let names = match (&self.class_names, self.num_classes, from_files) {
            (Some(names), Some(n), _) if names.len() != n => {
                return Err(Error::invalid(
                    "data.class_names",
                    format!("{} names given but num_classes is {n}", names.len()),
                ))
            }
            (Some(names), _, _) => names.clone(),
            (None, Some(n), Some(names)) if names.len() != n => {
                return Err(Error::invalid(
                    "data.num_classes",
                    format!(
                        "{n} given but {} has {} class folders",
                        self.path.display(),
                        names.len()
                    ),
                ))
            }
            (None, _, Some(names)) => names,
            (None, Some(n), None) => (0..n).map(|i| i.to_string()).collect(),
            (None, None, None) => match max_label {
                Some(m) => (0..=m.max(0)).map(|i| i.to_string()).collect(),
                None => return Ok(None),
            },
        };
        if names.is_empty() {
            return Err(Error::invalid(
                "data.num_classes",
                "a dataset needs at least one class",
            ));
        }
        Ok(Some(names))
    }

    /// The layout of the files a reader saw, with paths relative to the data folder.
    fn layout_of(
        &self,
        format: DataFormat,
        shape: [usize; 3],
        class_names: &[String],
        name: &str,
        [train, test]: [Vec<Part>; 2],
    ) -> DataLayout {
        let rel = |p: &Path| -> String {
            p.strip_prefix(&self.path)
                .unwrap_or(p)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        };
        let parts = |v: Vec<Part>| -> Vec<DataPart> {
            v.into_iter()
                .map(|p| DataPart {
                    file: rel(&p.file),
                    labels: p.labels.as_deref().map(rel),
                    label: p.label,
                    count: p.count,
                })
                .collect()
        };
        DataLayout {
            format,
            shape,
            class_names: class_names.to_vec(),
            name: name.to_string(),
            train: parts(train),
            test: parts(test),
        }
    }

    fn finish(&self, raw: RawDataset, format: DataFormat) -> Result<Dataset> {
        let name = self.dataset_name();
        let max_label = raw
            .train
            .1
            .iter()
            .chain(&raw.test.1)
            .copied()
            .max()
            .unwrap_or(0);
        let class_names = self
            .class_names_of(raw.class_names, Some(max_label))?
            .expect("labels read");
        for (which, (file, labels)) in [
            ("train", (&raw.train_labels_file, &raw.train.1)),
            ("test", (&raw.test_labels_file, &raw.test.1)),
        ] {
            if let Some((i, &l)) = labels
                .iter()
                .enumerate()
                .find(|(_, &l)| l < 0 || l as usize >= class_names.len())
            {
                return Err(Error::format(
                    file,
                    format!("{which} label {l} at index {i} is out of range: the dataset has {} classes (0..{})", class_names.len(), class_names.len() - 1),
                ));
            }
        }
        let [h, w, c] = raw.shape;
        let layout = raw
            .parts
            .map(|parts| self.layout_of(format, raw.shape, &class_names, &name, parts));
        Ok(Dataset {
            name,
            class_names,
            channels: c,
            height: h,
            width: w,
            train: Split::new(raw.train.0, raw.train.1, raw.shape),
            test: Split::new(raw.test.0, raw.test.1, raw.shape),
            layout,
        })
    }
}

/// What a scan learns of a data set without decoding its images (`DataSpec::open`).
pub(crate) struct Scanned {
    pub shape: [usize; 3],
    /// the classes the files name (folders, `classes.txt`, Hugging Face metadata)
    pub class_names: Option<Vec<String>>,
    /// the largest label, where the scan read the labels (IDX)
    pub max_label: Option<i64>,
    pub parts: [Vec<Part>; 2],
}

/// IDX files' layout from their headers, and their labels (one byte an image, checked
/// here: only the images are left in the files).
fn scan_idx_dir(dir: &Path) -> Result<Scanned> {
    let [train_images, train_labels, test_images, test_labels] = idx_files(dir)?;
    let shape = image_shape(&train_images, &idx::header(&train_images)?)?;
    let test_shape = image_shape(&test_images, &idx::header(&test_images)?)?;
    if shape != test_shape {
        return Err(Error::format(
            &test_images,
            format!("test images are {test_shape:?} (HWC) but train images are {shape:?}"),
        ));
    }
    let mut max_label = 0i64;
    let mut parts = Vec::new();
    for (images, labels) in [(&train_images, &train_labels), (&test_images, &test_labels)] {
        let n = idx::header(images)?[0];
        let y = read_labels(labels, n, images)?;
        max_label = y.iter().copied().max().unwrap_or(0).max(max_label);
        parts.push(vec![Part {
            labels: Some(labels.clone()),
            ..Part::of(images, n)
        }]);
    }
    let [train, test]: [Vec<Part>; 2] = parts.try_into().expect("two splits");
    Ok(Scanned {
        shape,
        class_names: None,
        max_label: Some(max_label),
        parts: [train, test],
    })
}

/// What a reader produces: bytes and labels per split, the HWC shape, and the files
/// the labels came from (for error messages).
pub(crate) struct RawDataset {
    pub shape: [usize; 3],
    pub train: (Vec<u8>, Vec<i64>),
    pub test: (Vec<u8>, Vec<i64>),
    pub class_names: Option<Vec<String>>,
    pub train_labels_file: PathBuf,
    pub test_labels_file: PathBuf,
    /// The files each split's images came from, in order (`None`: a reader that cannot
    /// read a window of its files, SVHN's MAT).
    pub parts: Option<[Vec<Part>; 2]>,
}

/// A file's share of a split, as a reader saw it.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub file: PathBuf,
    /// IDX: the labels file beside the images file
    pub labels: Option<PathBuf>,
    /// image folders: the class of the file's one image
    pub label: Option<i64>,
    pub count: usize,
}

impl Part {
    pub fn of(file: &Path, count: usize) -> Part {
        Part {
            file: file.to_path_buf(),
            labels: None,
            label: None,
            count,
        }
    }
}

/// Where each image of a data set is, by file, with what a window of it needs to be
/// read alone (its shape and classes). Made by the full read at plan time and carried
/// in the plan's data manifest: a worker reads only the files of the shard it leased.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataLayout {
    /// the format the files were read as (never `auto`)
    pub format: DataFormat,
    /// `[h, w, c]`
    pub shape: [usize; 3],
    pub class_names: Vec<String>,
    pub name: String,
    pub train: Vec<DataPart>,
    pub test: Vec<DataPart>,
}

impl DataLayout {
    /// The files of split `which`, in order.
    pub fn parts(&self, which: SplitName) -> &[DataPart] {
        match which {
            SplitName::Train => &self.train,
            SplitName::Test => &self.test,
        }
    }

    /// The images of split `which`.
    pub fn images(&self, which: SplitName) -> usize {
        self.parts(which).iter().map(|p| p.count).sum()
    }
}

/// One file's images of a split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataPart {
    /// `/`-separated below the data folder (the key below a bucket's prefix)
    pub file: String,
    /// IDX: the labels file
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// image folders: the image's class
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<i64>,
    pub count: usize,
}

/// Whether a file whose name ends with `suffix` is in `dir` or in its folders down to
/// `depth` levels below it.
fn has_files(dir: &Path, suffix: &str, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_lowercase();
        if name.starts_with('.') {
            false
        } else if p.is_dir() {
            depth > 0 && has_files(&p, suffix, depth - 1)
        } else {
            name.ends_with(suffix)
        }
    })
}

fn find_idx(dir: &Path, prefixes: &[&str]) -> Option<PathBuf> {
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            prefixes.iter().any(|pre| name.starts_with(pre))
                && (name.ends_with("-ubyte") || name.ends_with("-ubyte.gz"))
        })
        .collect();
    hits.sort();
    hits.into_iter().next()
}

/// The four IDX files of a folder: train images and labels, test images and labels.
fn idx_files(dir: &Path) -> Result<[PathBuf; 4]> {
    let need = |prefixes: &[&str], what: &str| {
        find_idx(dir, prefixes).ok_or_else(|| {
            Error::format(
                dir,
                format!(
                    "no {what} file ({}-idx*-ubyte[.gz]) in this folder",
                    prefixes.join("-... or ")
                ),
            )
        })
    };
    Ok([
        need(&["train-images"], "train images")?,
        need(&["train-labels"], "train labels")?,
        need(&["t10k-images", "test-images"], "test images")?,
        need(&["t10k-labels", "test-labels"], "test labels")?,
    ])
}

fn load_idx_dir(dir: &Path) -> Result<RawDataset> {
    let [train_images, train_labels, test_images, test_labels] = idx_files(dir)?;
    let (shape, train_x) = read_images(&train_images)?;
    let (test_shape, test_x) = read_images(&test_images)?;
    if shape != test_shape {
        return Err(Error::format(
            &test_images,
            format!("test images are {test_shape:?} (HWC) but train images are {shape:?}"),
        ));
    }
    let train_y = read_labels(
        &train_labels,
        train_x.len() / shape.iter().product::<usize>(),
        &train_images,
    )?;
    let test_y = read_labels(
        &test_labels,
        test_x.len() / shape.iter().product::<usize>(),
        &test_images,
    )?;
    let (n_train, n_test) = (train_y.len(), test_y.len());
    Ok(RawDataset {
        shape,
        train: (train_x, train_y),
        test: (test_x, test_y),
        class_names: None,
        parts: Some([
            vec![Part {
                labels: Some(train_labels.clone()),
                ..Part::of(&train_images, n_train)
            }],
            vec![Part {
                labels: Some(test_labels.clone()),
                ..Part::of(&test_images, n_test)
            }],
        ]),
        train_labels_file: train_labels,
        test_labels_file: test_labels,
    })
}

fn read_images(path: &Path) -> Result<([usize; 3], Vec<u8>)> {
    let a = idx::read_idx(path)?;
    Ok((image_shape(path, &a.dims)?, a.data))
}

/// `[h, w, c]` of the images of an IDX file with dimensions `dims`.
fn image_shape(path: &Path, dims: &[usize]) -> Result<[usize; 3]> {
    let shape = match dims[..] {
        [_, h, w] => [h, w, 1],
        [_, h, w, c] if c == 1 || c == 3 => [h, w, c],
        [_, _, _, c] => {
            return Err(Error::format(
                path,
                format!("images have {c} channels, expected 1 or 3"),
            ))
        }
        _ => {
            return Err(Error::format(
                path,
                format!("images need 3 (N,H,W) or 4 (N,H,W,C) dimensions, the file has {dims:?}"),
            ))
        }
    };
    if shape[0] == 0 || shape[1] == 0 {
        return Err(Error::format(
            path,
            format!("empty image size {}x{}", shape[0], shape[1]),
        ));
    }
    Ok(shape)
}

fn read_labels(path: &Path, n_images: usize, images: &Path) -> Result<Vec<i64>> {
    let a = idx::read_idx(path)?;
    if a.dims.len() != 1 {
        return Err(Error::format(
            path,
            format!("labels need 1 dimension, the file has {:?}", a.dims),
        ));
    }
    if a.dims[0] != n_images {
        return Err(Error::format(
            path,
            format!(
                "{} labels but {} has {n_images} images",
                a.dims[0],
                images.display()
            ),
        ));
    }
    Ok(a.data.into_iter().map(i64::from).collect())
}

/// A host tensor on `device`: through pinned memory and a non-blocking copy when the
/// device is a GPU, so the copy overlaps the work queued before it.
pub fn upload(t: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => t,
        _ => {
            let kind = t.kind();
            t.pin_memory(device).to_device_(device, kind, true, false)
        }
    }
}
