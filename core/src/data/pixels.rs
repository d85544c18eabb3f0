//! Decoded images to the dataset's one shape: every reader of encoded images (image
//! folders, WebDataset shards, Parquet exports) hands its images here. Without
//! `data.resize` all images must have the size of the first; with it each image is
//! scaled to cover `[h, w]` and centre-cropped (torchvision's `Resize` of the shorter
//! side followed by `CenterCrop`, with a triangle filter). The number of channels is
//! the first image's: 1 for grey images, else 3.
use std::path::Path;

use image::DynamicImage;

use crate::error::{Error, Result};

/// The shape of a dataset's images, fixed by the first one (or by `resize`).
#[derive(Debug, Clone)]
pub(crate) struct Pixels {
    resize: Option<[u32; 2]>,
    /// `[h, w, c]` and the source of the first image, once one was seen
    first: Option<([usize; 3], String)>,
}

impl Pixels {
    pub fn new(resize: Option<[u32; 2]>) -> Self {
        Pixels {
            resize,
            first: None,
        }
    }

    /// Images of a data set whose shape is known already (a window of it: its first
    /// image may be another window's).
    pub fn fixed(shape: [usize; 3], resize: Option<[u32; 2]>) -> Self {
        Pixels {
            resize,
            first: Some((shape, "the data set's first image".into())),
        }
    }

    /// `[h, w, c]` of every image, once the first was added.
    pub fn shape(&self) -> Option<[usize; 3]> {
        self.first.as_ref().map(|(s, _)| *s)
    }

    /// Appends `img` (HWC bytes) to `out`. `file` and `what` name it in errors
    /// (`what`: the member or row within the file, empty for a file of its own).
    pub fn add(
        &mut self,
        out: &mut Vec<u8>,
        img: DynamicImage,
        file: &Path,
        what: &str,
    ) -> Result<()> {
        let img = match self.resize {
            Some([h, w]) => cover(img, w, h),
            None => img,
        };
        let (w, h) = (img.width() as usize, img.height() as usize);
        let shape = match &self.first {
            Some((shape, _)) => *shape,
            None => {
                let c = if img.color().has_color() { 3 } else { 1 };
                let origin = format!("{}{}", file.display(), what);
                self.first = Some(([h, w, c], origin));
                [h, w, c]
            }
        };
        if [h, w] != [shape[0], shape[1]] {
            let first = self.first.as_ref().map(|(_, o)| o.as_str()).unwrap_or("");
            return Err(Error::format(
                file,
                format!(
                    "image{what} is {w}x{h} but {first} is {}x{}: all images must have one size (set data.resize = [height, width] to scale and centre-crop them)",
                    shape[1], shape[0]
                ),
            ));
        }
        if shape[2] == 1 {
            out.extend_from_slice(img.to_luma8().as_raw())
        } else {
            out.extend_from_slice(img.to_rgb8().as_raw())
        }
        Ok(())
    }
}

/// Scales `img` so that it covers `w` x `h`, then crops the centre.
fn cover(img: DynamicImage, w: u32, h: u32) -> DynamicImage {
    if (img.width(), img.height()) == (w, h) {
        return img;
    }
    let scale = (w as f64 / img.width() as f64).max(h as f64 / img.height() as f64);
    let sw = ((img.width() as f64 * scale).round() as u32).max(w);
    let sh = ((img.height() as f64 * scale).round() as u32).max(h);
    let scaled = img.resize_exact(sw, sh, image::imageops::FilterType::Triangle);
    scaled.crop_imm((sw - w) / 2, (sh - h) / 2, w, h)
}

/// Decodes an encoded image (PNG, JPEG, WebP), its format guessed from its bytes.
pub(crate) fn decode(bytes: &[u8], file: &Path, what: &str) -> Result<DynamicImage> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(file, e))?
        .decode()
        .map_err(|e| Error::format(file, format!("cannot decode image{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_covers_then_crops_the_centre() {
        // 40 x 20, left half black, right half white: covering 10 x 10 scales to 20 x 10
        // and keeps the middle, half black and half white
        let img =
            image::GrayImage::from_fn(40, 20, |x, _| image::Luma([if x < 20 { 0 } else { 255 }]));
        let mut p = Pixels::new(Some([10, 10]));
        let mut out = Vec::new();
        p.add(
            &mut out,
            DynamicImage::ImageLuma8(img),
            Path::new("a.png"),
            "",
        )
        .unwrap();
        assert_eq!(p.shape(), Some([10, 10, 1]));
        assert_eq!(out.len(), 100);
        assert!(out[0] < 10 && out[9] > 245, "{:?}", &out[..10]);
    }

    #[test]
    fn another_size_without_resize_is_named() {
        let mut p = Pixels::new(None);
        let mut out = Vec::new();
        let a = DynamicImage::ImageRgb8(image::RgbImage::new(8, 8));
        let b = DynamicImage::ImageRgb8(image::RgbImage::new(9, 8));
        p.add(&mut out, a, Path::new("s.tar"), " (member a.png)")
            .unwrap();
        let e = p
            .add(&mut out, b, Path::new("s.tar"), " (member b.png)")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.png") && e.contains("9x8") && e.contains("data.resize"),
            "{e}"
        );
        assert_eq!(p.shape(), Some([8, 8, 3]));
    }
}
