//! Image grids as PNG: rows of images (e.g. inputs above their reconstructions, or a
//! scenario's samples), with a 2-pixel gutter.
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Writes `rows` (each a float NCHW tensor in [0,1], same C,H,W) as one PNG grid,
/// one tensor per row, scaled up by `scale`.
pub fn write_grid(path: &Path, rows: &[Tensor], scale: u32) -> Result<()> {
    let pad = 2u32;
    let first = rows
        .first()
        .ok_or_else(|| Error::invalid("grid", "no rows to draw"))?;
    let [_, c, h, w] = first.size()[..] else {
        return Err(Error::invalid(
            "grid",
            format!("images must be NCHW, got {:?}", first.size()),
        ));
    };
    let cols = rows.iter().map(|r| r.size()[0]).max().unwrap_or(0) as u32;
    let (cell_w, cell_h) = (w as u32 * scale, h as u32 * scale);
    let width = cols * (cell_w + pad) + pad;
    let height = rows.len() as u32 * (cell_h + pad) + pad;
    let mut img = image::RgbImage::from_pixel(width, height, image::Rgb([40, 40, 48]));
    for (r, t) in rows.iter().enumerate() {
        let t = (t.to_device(tch::Device::Cpu).clamp(0.0, 1.0) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .contiguous();
        let n = t.size()[0];
        let data = Vec::<u8>::try_from(t.flatten(0, -1)).map_err(Error::Torch)?;
        let plane = (h * w) as usize;
        for i in 0..n as usize {
            let base = i * plane * c as usize;
            let (x0, y0) = (
                pad + i as u32 * (cell_w + pad),
                pad + r as u32 * (cell_h + pad),
            );
            for y in 0..cell_h {
                for x in 0..cell_w {
                    let p = (y / scale) as usize * w as usize + (x / scale) as usize;
                    let px = if c == 1 {
                        let v = data[base + p];
                        [v, v, v]
                    } else {
                        [
                            data[base + p],
                            data[base + plane + p],
                            data[base + 2 * plane + p],
                        ]
                    };
                    img.put_pixel(x0 + x, y0 + y, image::Rgb(px));
                }
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    img.save(path)
        .map_err(|e| Error::format(path, format!("cannot write PNG: {e}")))
}
