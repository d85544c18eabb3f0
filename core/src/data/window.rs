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
        let (parts, total) = (layout.parts(which), layout.images(which));
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
        let root = self.local_root(&wanted, planned)?;
        let mut pixels = Pixels::fixed(layout.shape, self.resize);
        let (mut bytes, mut labels) = (Vec::new(), Vec::new());
        for (part, skip, take) in wanted {
            let all: Vec<usize> = (skip..skip + take).collect();
            self.read_part(
                layout,
                &root,
                &part,
                &all,
                &mut pixels,
                &mut bytes,
                &mut labels,
            )?;
        }
        check_labels(&labels, layout, which, |i| range.start + i, parts)?;
        let shape = layout.shape;
        let window = Split::window_of(bytes, labels, shape, range.start);
        Ok(dataset_of(layout, which, window))
    }

    /// The images `rows` of split `which` (any order, repeats allowed), as a dataset
    /// whose split `which` holds each once (a sparse split) and whose other split is
    /// empty: what a fine-tune part reads (its rows are spread over the split), reading
    /// only the files that hold them and decoding only those images.
    pub fn read_rows(
        &self,
        layout: &DataLayout,
        which: SplitName,
        rows: &[usize],
        planned: Option<&[super::manifest::DataFile]>,
    ) -> Result<Dataset> {
        let (parts, total) = (layout.parts(which), layout.images(which));
        let mut rows = rows.to_vec();
        rows.sort_unstable();
        rows.dedup();
        if let Some(&last) = rows.last().filter(|&&l| l >= total) {
            return Err(Error::invalid(
                "data rows",
                format!("image {last} is outside the {which} split of {total} images"),
            ));
        }
        // per part: the part and the indices within it wanted
        let mut wanted: Vec<(DataPart, Vec<usize>)> = Vec::new();
        let (mut first, mut k) = (0usize, 0usize);
        for p in parts {
            let end = first + p.count;
            let mine: Vec<usize> = rows[k..]
                .iter()
                .take_while(|&&i| i < end)
                .map(|&i| i - first)
                .collect();
            k += mine.len();
            if !mine.is_empty() {
                wanted.push((p.clone(), mine));
            }
            first = end;
        }
        let spans: Vec<(DataPart, usize, usize)> = wanted
            .iter()
            .map(|(p, m)| (p.clone(), m[0], m[m.len() - 1] + 1 - m[0]))
            .collect();
        let root = self.local_root(&spans, planned)?;
        let mut pixels = Pixels::fixed(layout.shape, self.resize);
        let (mut bytes, mut labels) = (Vec::new(), Vec::new());
        for (part, mine) in &wanted {
            self.read_part(
                layout,
                &root,
                part,
                mine,
                &mut pixels,
                &mut bytes,
                &mut labels,
            )?;
        }
        check_labels(&labels, layout, which, |i| rows[i], parts)?;
        let held = Split::rows_of(bytes, labels, layout.shape, rows);
        Ok(dataset_of(layout, which, held))
    }

    /// The local folder the wanted files are in: this spec's folder, or for data in a
    /// bucket the local copy of those objects (by the planned ETags when given).
    fn local_root(
        &self,
        wanted: &[(DataPart, usize, usize)],
        planned: Option<&[super::manifest::DataFile]>,
    ) -> Result<PathBuf> {
        let Some(bucket) = super::remote::S3Data::parse(&self.path)? else {
            return Ok(self.path.clone());
        };
        let mut names: Vec<String> = Vec::new();
        for (p, _, _) in wanted {
            names.push(p.file.clone());
            names.extend(p.labels.clone());
        }
        match planned {
            Some(files) => {
                let mut pinned = Vec::new();
                for n in &names {
                    pinned.push(
                        files
                            .iter()
                            .find(|f| &f.name == n)
                            .cloned()
                            .ok_or_else(|| {
                                Error::invalid(
                                    "data.path",
                                    format!("{}: {n} is not in the job's plan", bucket.url()),
                                )
                            })?,
                    );
                }
                bucket.mirror_planned(&pinned)
            }
            None => bucket.mirror_only(Some(&names)),
        }
    }

    /// Appends the images `mine` (ascending indices within the file) of one file of the
    /// layout to `bytes` and their labels to `labels`.
    #[allow(clippy::too_many_arguments)]
    fn read_part(
        &self,
        layout: &DataLayout,
        root: &Path,
        part: &DataPart,
        mine: &[usize],
        pixels: &mut Pixels,
        bytes: &mut Vec<u8>,
        labels: &mut Vec<i64>,
    ) -> Result<()> {
        let (Some(&skip), Some(&last)) = (mine.first(), mine.last()) else {
            return Ok(());
        };
        let take = last + 1 - skip;
        let contiguous = mine.len() == take;
        let keep = |i: usize| contiguous || mine.binary_search(&i).is_ok();
        let file = root.join(&part.file);
        let before = labels.len();
        let mut visit = |img: image::DynamicImage, y: i64, what: &str| -> Result<()> {
            labels.push(y);
            pixels.add(bytes, img, &file, what)
        };
        match layout.format {
            DataFormat::Idx => {
                let stride: usize = layout.shape.iter().product();
                let lf = part.labels.as_ref().map(|l| root.join(l)).ok_or_else(|| {
                    Error::invalid("data layout", format!("{}: no labels file", part.file))
                })?;
                let (x, y) = if contiguous {
                    (
                        idx::read_window(&file, skip, take, stride)?,
                        idx::read_window(&lf, skip, take, 1)?,
                    )
                } else {
                    (
                        idx::read_rows(&file, mine, stride)?,
                        idx::read_rows(&lf, mine, 1)?,
                    )
                };
                bytes.extend(x);
                labels.extend(y.into_iter().map(i64::from));
            }
            DataFormat::Folder => {
                let y = part.label.ok_or_else(|| {
                    Error::invalid("data layout", format!("{}: no class", part.file))
                })?;
                visit(folder::decode(&file)?, y, "")?;
            }
            DataFormat::Webdataset => {
                webdataset::read_shard(&file, skip, take, &keep, &mut visit)?;
            }
            DataFormat::Parquet => {
                let cols = parquet::Columns {
                    image: self.image_column.clone(),
                    label: self.label_column.clone(),
                };
                parquet::read_file(&file, &cols, skip, take, &keep, &mut visit)?;
            }
            DataFormat::Svhn | DataFormat::Auto => {
                return Err(Error::invalid(
                    "data layout",
                    format!("{:?} files are read whole, not by window", layout.format),
                ))
            }
        }
        if labels.len() - before != mine.len() {
            return Err(Error::format(
                &file,
                format!(
                    "{} images where the plan counted {} from image {skip}: the file changed since the job was planned",
                    labels.len() - before,
                    mine.len()
                ),
            ));
        }
        Ok(())
    }
}

/// A dataset whose split `which` is `held` and whose other split is empty.
fn dataset_of(layout: &DataLayout, which: SplitName, held: Split) -> Dataset {
    let shape = layout.shape;
    let empty = Split::window_of(Vec::new(), Vec::new(), shape, 0);
    let (train, test) = match which {
        SplitName::Train => (held, empty),
        SplitName::Test => (empty, held),
    };
    Dataset {
        name: layout.name.clone(),
        class_names: layout.class_names.clone(),
        channels: shape[2],
        height: shape[0],
        width: shape[1],
        train,
        test,
        layout: Some(layout.clone()),
    }
}

/// A label outside the classes is an error naming the file it came from.
fn check_labels(
    labels: &[i64],
    layout: &DataLayout,
    which: SplitName,
    index_of: impl Fn(usize) -> usize,
    parts: &[DataPart],
) -> Result<()> {
    let n = layout.class_names.len() as i64;
    let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l >= n) else {
        return Ok(());
    };
    let index = index_of(i);
    let file = overlapping(parts, &(index..index + 1))
        .first()
        .map(|(p, _, _)| p.labels.clone().unwrap_or(p.file.clone()))
        .unwrap_or_default();
    Err(Error::format(
        Path::new(&file),
        format!("{which} label {l} at index {index} is out of range: the dataset has {n} classes"),
    ))
}
