//! safetensors files of tch tensors, with string metadata: the one tensor format of
//! Defuse (built-in models, identify outputs, scenario samples).
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Writes `tensors` (any device; f32, f64, i64, i32, u8) with `meta` to `path`,
/// through a temporary file and a rename so a reader never sees half a file.
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let mut bufs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let (dtype, bytes) = match t.kind() {
            Kind::Float => (Dtype::F32, le_bytes::<f32, 4>(&t, f32::to_le_bytes)),
            Kind::Double => (Dtype::F64, le_bytes::<f64, 8>(&t, f64::to_le_bytes)),
            Kind::Int64 => (Dtype::I64, le_bytes::<i64, 8>(&t, i64::to_le_bytes)),
            Kind::Int => (Dtype::I32, le_bytes::<i32, 4>(&t, i32::to_le_bytes)),
            Kind::Uint8 => (
                Dtype::U8,
                Vec::<u8>::try_from(t.flatten(0, -1)).map_err(Error::Torch)?,
            ),
            k => {
                return Err(Error::invalid(
                    format!("tensor {name}"),
                    format!("kind {k:?} cannot be written"),
                ))
            }
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        bufs.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, &meta, &tmp)
        .map_err(|e| Error::format(&tmp, format!("cannot write safetensors: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn le_bytes<T: tch::kind::Element + Copy, const N: usize>(
    t: &Tensor,
    f: fn(T) -> [u8; N],
) -> Vec<u8> {
    let v: Vec<T> = Vec::<T>::try_from(t.flatten(0, -1)).expect("kind checked");
    v.into_iter().flat_map(f).collect()
}

/// Reads every tensor of a safetensors file onto the CPU, with its metadata.
pub fn read(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::U8 => Kind::Uint8,
            d => {
                return Err(Error::format(
                    path,
                    format!("tensor '{name}' has unsupported dtype {d:?}"),
                ))
            }
        };
        let t = Tensor::f_from_data_size(view.data(), &shape, kind).map_err(Error::Torch)?;
        out.insert(name, t);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// String metadata of a safetensors file.
pub type Metadata = HashMap<String, String>;

/// Reads only the header: tensor names and metadata, without loading the data.
pub fn read_header(
    r: &mut impl Read,
) -> std::result::Result<(Vec<String>, Option<Metadata>), String> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)
        .map_err(|e| format!("cannot read the 8-byte header length: {e}"))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(format!("header length {n} is absurd"));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header)
        .map_err(|e| format!("truncated header ({n} bytes announced): {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("header is not a JSON object")?;
    let meta = obj
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok());
    Ok((
        obj.keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect(),
        meta,
    ))
}

/// Reads an `N x D` matrix from `.npy` (little-endian f4/f8/i8/i4, C order) or from
/// safetensors (the tensor named `codes`, or the only tensor), as float64.
pub fn read_matrix(path: &Path) -> Result<Tensor> {
    let t = match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => read_npy(path)?,
        Some("safetensors") => {
            let (mut all, _) = read(path)?;
            match all.remove("codes") {
                Some(t) => t,
                None if all.len() == 1 => all.into_values().next().expect("one tensor"),
                None => {
                    let mut names: Vec<_> = all.keys().cloned().collect();
                    names.sort();
                    return Err(Error::format(
                        path,
                        format!("no tensor named 'codes' among {names:?}"),
                    ));
                }
            }
        }
        _ => return Err(Error::format(path, "expected a .npy or .safetensors file")),
    };
    if t.dim() != 2 {
        return Err(Error::format(
            path,
            format!("expected an N x D matrix, got shape {:?}", t.size()),
        ));
    }
    Ok(t.to_kind(Kind::Double))
}

/// Reads a `.npy` array (format 1.0-3.0, little-endian, C order).
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::format(path, m);
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (magic \\x93NUMPY missing)".into()));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| bad("truncated .npy header".into()))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<String> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[i..].trim_start().strip_prefix(':')?.trim_start();
        if let Some(r) = rest.strip_prefix('(') {
            Some(r[..r.find(')')?].to_string())
        } else {
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim().trim_matches('\'').to_string())
        }
    };
    let descr = field("descr").ok_or_else(|| bad("no 'descr' in header".into()))?;
    if field("fortran_order").as_deref() != Some("False") {
        return Err(bad(
            "only C-order arrays are supported (fortran_order must be False)".into(),
        ));
    }
    let shape: Vec<i64> = field("shape")
        .ok_or_else(|| bad("no 'shape' in header".into()))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| bad(format!("bad shape entry '{s}'")))
        })
        .collect::<Result<_>>()?;
    let (kind, size) = match descr.as_str() {
        "<f4" => (Kind::Float, 4),
        "<f8" => (Kind::Double, 8),
        "<i8" => (Kind::Int64, 8),
        "<i4" => (Kind::Int, 4),
        d => {
            return Err(bad(format!(
                "dtype '{d}' is not supported (expected <f4, <f8, <i8 or <i4)"
            )))
        }
    };
    let count = shape
        .iter()
        .try_fold(1i64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let body = &bytes[start + hlen..];
    if body.len() as i64 != count * size {
        return Err(bad(format!(
            "shape {shape:?} needs {} data bytes, the file has {}",
            count * size,
            body.len()
        )));
    }
    Ok(Tensor::f_from_data_size(body, &shape, kind)?)
}

/// Writes a float64 `.npy` (format 1.0), for tools and tests.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let t = t
        .to_kind(Kind::Double)
        .to_device(tch::Device::Cpu)
        .contiguous();
    let shape = t.size().iter().map(|d| format!("{d},")).collect::<String>();
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({shape}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(le_bytes::<f64, 8>(&t, f64::to_le_bytes));
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}
