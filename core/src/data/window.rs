//! A window of a split read alone: the images `range` of one split, from the files the
//! data set's layout says hold them, and nothing else. A worker reads its shard this way,
//! so its memory and its reads follow the shard, not the data set (for data in a
//! bucket, only those objects are copied).
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::pixels::Pixels;
use super::{folder, idx, parquet, webdataset};
use super::{DataFormat, DataLayout, DataPart, DataSpec, Dataset, Split, SplitName};
use crate::error::{Error, Result};

/// The parts of `parts` that hold images of `range`: (part, skip, take).
fn overlapping(parts: &[DataPart], range: &Range<usize>) -> Vec<(DataPart, usize, usize)> {
    let mut out = Vec::new();
    let mut first = 0usize;
    for p in parts {
        let (a, b) = (first, first + p.count);
        first = b;
        let (lo, hi) = (range.start.max(a), range.end.min(b));
        if lo < hi {
            out.push((p.clone(), lo - a, hi - lo));
        }
    }
    out
}

impl DataSpec {
    /// Images `range` of split `which`, as a dataset whose split `which` holds only them
    /// (`Split::window`) and whose other split is empty. `layout` is the one the full
    /// read made (the plan's); the files are this spec's.
    pub fn read_window(
        &self,
        layout: &DataLayout,
        which: SplitName,
        range: Range<usize>,
    ) -> Result<Dataset> {
        self.read_window_planned(layout, which, range, None)
    }

    /// [`DataSpec::read_window`] with the plan's manifest: data in a bucket is then
    /// copied by the planned ETags, without listing the bucket again.
    pub fn read_window_planned(
        &self,
        layout: &DataLayout,
        which: SplitName,
        range: Range<usize>,
        planned: Option<&[super::manifest::DataFile]>,
    ) -> Result<Dataset> {
        let parts = match which {
            SplitName::Train => &layout.train,
            SplitName::Test => &layout.test,
        };
        let total: usize = parts.iter().map(|p| p.count).sum();
        if range.start > range.end || range.end > total {
            return Err(Error::invalid(
                "data window",
                format!(
                    "{}..{} is outside the {which} split of {total} images",
                    range.start, range.end
                ),
            ));
        }
        let wanted = overlapping(parts, &range);
        let root: PathBuf = match super::remote::S3Data::parse(&self.path)? {
            Some(bucket) => {
                let mut names: Vec<String> = Vec::new();
                for (p, _, _) in &wanted {
                    names.push(p.file.clone());
                    names.extend(p.labels.clone());
                }
                match planned {
                    Some(files) => {
                        let mut pinned = Vec::new();
                        for n in &names {
                            pinned.push(files.iter().find(|f| &f.name == n).cloned().ok_or_else(
                                || {
                                    Error::invalid(
                                        "data.path",
                                        format!("{}: {n} is not in the job's plan", bucket.url()),
                                    )
                                },
                            )?);
                        }
                        bucket.mirror_planned(&pinned)?
                    }
                    None => bucket.mirror_only(Some(&names))?,
                }
            }
            None => self.path.clone(),
        };
        let mut pixels = Pixels::fixed(layout.shape, self.resize);
        let (mut bytes, mut labels) = (Vec::new(), Vec::new());
        let cols = parquet::Columns {
            image: self.image_column.clone(),
            label: self.label_column.clone(),
        };
        for (part, skip, take) in wanted {
            let file = root.join(&part.file);
            let before = labels.len();
            let mut visit = |img: image::DynamicImage, y: i64, what: &str| -> Result<()> {
                labels.push(y);
                pixels.add(&mut bytes, img, &file, what)
            };
            match layout.format {
                DataFormat::Idx => {
                    let stride: usize = layout.shape.iter().product();
                    bytes.extend(idx::read_window(&file, skip, take, stride)?);
                    let lf = part.labels.as_ref().map(|l| root.join(l)).ok_or_else(|| {
                        Error::invalid("data layout", format!("{}: no labels file", part.file))
                    })?;
                    labels.extend(
                        idx::read_window(&lf, skip, take, 1)?
                            .into_iter()
                            .map(i64::from),
                    );
                }
                DataFormat::Folder => {
                    let y = part.label.ok_or_else(|| {
                        Error::invalid("data layout", format!("{}: no class", part.file))
                    })?;
                    visit(folder::decode(&file)?, y, "")?;
                }
                DataFormat::Webdataset => {
                    webdataset::read_shard(&file, skip, take, &mut visit)?;
                }
                DataFormat::Parquet => {
                    parquet::read_file(&file, &cols, skip, take, &mut visit)?;
                }
                DataFormat::Svhn | DataFormat::Auto => {
                    return Err(Error::invalid(
                        "data layout",
                        format!("{:?} files are read whole, not by window", layout.format),
                    ))
                }
            }
            if labels.len() - before != take {
                return Err(Error::format(
                    &file,
                    format!(
                        "{} images where the plan counted {take} from image {skip}: the file changed since the job was planned",
                        labels.len() - before
                    ),
                ));
            }
        }
        check_labels(&labels, layout, which, range.start, parts)?;
        let shape = layout.shape;
        let window = Split::window_of(bytes, labels, shape, range.start);
        let empty = Split::window_of(Vec::new(), Vec::new(), shape, 0);
        let (train, test) = match which {
            SplitName::Train => (window, empty),
            SplitName::Test => (empty, window),
        };
        Ok(Dataset {
            name: layout.name.clone(),
            class_names: layout.class_names.clone(),
            channels: shape[2],
            height: shape[0],
            width: shape[1],
            train,
            test,
            layout: Some(layout.clone()),
        })
    }
}

/// A label outside the classes is an error naming the file it came from.
fn check_labels(
    labels: &[i64],
    layout: &DataLayout,
    which: SplitName,
    start: usize,
    parts: &[DataPart],
) -> Result<()> {
    let n = layout.class_names.len() as i64;
    let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l >= n) else {
        return Ok(());
    };
    let index = start + i;
    let file = overlapping(parts, &(index..index + 1))
        .first()
        .map(|(p, _, _)| p.labels.clone().unwrap_or(p.file.clone()))
        .unwrap_or_default();
    Err(Error::format(
        Path::new(&file),
        format!("{which} label {l} at index {index} is out of range: the dataset has {n} classes"),
    ))
}
