//! IDX files (the MNIST format), raw or gzipped: unsigned-byte arrays of 1 to 4
//! dimensions. Everything about the header is checked against the file's length before
//! any allocation, so a file that lies about its sizes is an error, never a panic or a
//! huge allocation.
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// An unsigned-byte IDX array: its dimensions (outermost first) and its data, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a whole IDX file; gzip is recognised by its magic bytes, not by the name.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("bad gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|msg| Error::format(path, msg))
}

/// Items `start..start + count` of an IDX file, each `item` bytes (an image, or 1 for a
/// label), read as a stream: the items before are skipped, those after never read, so
/// memory holds the window only. The header must say the file has the items.
pub fn read_window(path: &Path, start: usize, count: usize, item: usize) -> Result<Vec<u8>> {
    let (mut r, n) = open_items(path, item)?;
    if start.saturating_add(count) > n {
        return Err(Error::format(
            path,
            format!("items {start}..{} asked, the file has {n}", start + count),
        ));
    }
    let mut out = vec![0u8; count * item];
    skip_items(&mut r, path, start * item)?;
    r.read_exact(&mut out).map_err(|_| truncated(path))?;
    Ok(out)
}

/// Items `rows` (ascending, distinct) of an IDX file, each `item` bytes, in one pass:
/// memory holds those items only.
pub fn read_rows(path: &Path, rows: &[usize], item: usize) -> Result<Vec<u8>> {
    let (mut r, n) = open_items(path, item)?;
    if let Some(&last) = rows.last().filter(|&&l| l >= n) {
        return Err(Error::format(
            path,
            format!("item {last} asked, the file has {n}"),
        ));
    }
    let mut out = vec![0u8; rows.len() * item];
    let mut at = 0usize;
    for (k, &i) in rows.iter().enumerate() {
        skip_items(&mut r, path, (i - at) * item)?;
        r.read_exact(&mut out[k * item..(k + 1) * item])
            .map_err(|_| truncated(path))?;
        at = i + 1;
    }
    Ok(out)
}

fn truncated(path: &Path) -> Error {
    Error::format(
        path,
        "truncated: the file ends before the items its header counts",
    )
}

fn skip_items(r: &mut dyn Read, path: &Path, bytes: usize) -> Result<()> {
    let skipped = std::io::copy(&mut r.take(bytes as u64), &mut std::io::sink())
        .map_err(|e| Error::io(path, e))?;
    if skipped != bytes as u64 {
        return Err(truncated(path));
    }
    Ok(())
}

/// The dimensions an IDX file of unsigned bytes declares (the first: the number of
/// items), read from its header alone.
pub fn header(path: &Path) -> Result<Vec<usize>> {
    let (_, dims) = open_header(path)?;
    Ok(dims)
}

/// An IDX file opened (gzip or not) past its header, whose items must be `item` bytes:
/// the reader at the first item, and the number of items.
fn open_items(path: &Path, item: usize) -> Result<(Box<dyn Read>, usize)> {
    let (r, dims) = open_header(path)?;
    let per: usize = dims[1..].iter().product();
    if per != item {
        return Err(Error::format(
            path,
            format!("items of {item} bytes asked, the file has items of {per} bytes"),
        ));
    }
    Ok((r, dims[0]))
}

/// An IDX file of unsigned bytes opened past its header, and its dimensions.
fn open_header(path: &Path) -> Result<(Box<dyn Read>, Vec<usize>)> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut f = std::io::BufReader::new(f);
    let magic = std::io::BufRead::fill_buf(&mut f).map_err(|e| Error::io(path, e))?;
    let mut r: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let bad = |what: &str| Error::format(path, what.to_string());
    let mut head = [0u8; 4];
    r.read_exact(&mut head)
        .map_err(|_| bad("not an IDX file: shorter than its magic"))?;
    if head[..3] != [0, 0, 8] || !(1..=4).contains(&head[3]) {
        return Err(bad("not an IDX file of unsigned bytes"));
    }
    let mut dims = vec![0u8; 4 * head[3] as usize];
    r.read_exact(&mut dims)
        .map_err(|_| bad("truncated header"))?;
    let dims = dims
        .chunks(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    Ok((r, dims))
}

/// Parses IDX bytes; the error is a message without the file name.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "not an IDX file: {} bytes, shorter than the 4-byte magic",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "not an IDX file: magic starts {:02x} {:02x}, expected 00 00",
            bytes[0], bytes[1]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x} is not supported, expected 0x08 (unsigned byte)",
            bytes[2]
        ));
    }
    let ndim = bytes[3] as usize;
    if !(1..=4).contains(&ndim) {
        return Err(format!("IDX file has {ndim} dimensions, expected 1 to 4"));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format!(
            "truncated header: {} bytes, the {ndim} dimension sizes need {header}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let body = bytes.len() - header;
    if body < expected {
        return Err(format!(
            "truncated: dimensions {dims:?} need {expected} data bytes, the file has {body}"
        ));
    }
    if body > expected {
        return Err(format!(
            "{} trailing bytes after the {expected} data bytes that dimensions {dims:?} describe",
            body - expected
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Writes an unsigned-byte IDX file (used by tests and by tools that export data).
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let mut out = vec![0u8, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_3d_and_4d() {
        let a = parse_idx(&bytes(&[2, 2, 3], &[1; 12])).unwrap();
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.data.len(), 12);
        let b = parse_idx(&bytes(&[1, 2, 2, 3], &(0..12).collect::<Vec<u8>>())).unwrap();
        assert_eq!(b.dims, vec![1, 2, 2, 3]);
        assert_eq!(b.data[11], 11);
    }

    #[test]
    fn rejects_lies() {
        let e = parse_idx(&bytes(&[2, 2, 3], &[1; 11])).unwrap_err();
        assert!(e.contains("truncated") && e.contains("need 12"), "{e}");
        let e = parse_idx(&bytes(&[2, 2, 3], &[1; 13])).unwrap_err();
        assert!(e.contains("1 trailing bytes"), "{e}");
        let e = parse_idx(&bytes(&[u32::MAX, u32::MAX, u32::MAX, u32::MAX], &[])).unwrap_err();
        assert!(e.contains("overflow") || e.contains("truncated"), "{e}");
        let e = parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap_err();
        assert!(e.contains("element type 0x0d"), "{e}");
        let e = parse_idx(&[0x50, 0x4b, 3, 4]).unwrap_err();
        assert!(e.contains("not an IDX file"), "{e}");
        let e = parse_idx(&[0, 0, 8, 3, 0, 0]).unwrap_err();
        assert!(e.contains("truncated header"), "{e}");
        assert!(parse_idx(&[]).is_err());
        let e = parse_idx(&[0, 0, 8, 7]).unwrap_err();
        assert!(e.contains("7 dimensions"), "{e}");
    }
}
