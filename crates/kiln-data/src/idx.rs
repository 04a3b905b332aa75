//! The IDX format of (Fashion-)MNIST: a 4-byte magic `00 00 TYPE NDIMS`, NDIMS big-endian u32
//! dimensions, then the elements, big-endian, row-major.

use crate::error::{DataError, Result};
use crate::file::read_file;
use kiln_core::alloc::Buffer;
use kiln_core::Tensor;
use std::path::{Path, PathBuf};

/// The elements of an IDX file, in the file's own type.
#[derive(Clone, Debug, PartialEq)]
pub enum IdxData {
    /// Type code 0x08.
    U8(Vec<u8>),
    /// Type code 0x09.
    I8(Vec<i8>),
    /// Type code 0x0B.
    I16(Vec<i16>),
    /// Type code 0x0C.
    I32(Vec<i32>),
    /// Type code 0x0D.
    F32(Vec<f32>),
    /// Type code 0x0E.
    F64(Vec<f64>),
}

impl IdxData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            IdxData::U8(v) => v.len(),
            IdxData::I8(v) => v.len(),
            IdxData::I16(v) => v.len(),
            IdxData::I32(v) => v.len(),
            IdxData::F32(v) => v.len(),
            IdxData::F64(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The IDX name of the element type (`u8`, `i8`, `i16`, `i32`, `f32`, `f64`).
    pub fn type_name(&self) -> &'static str {
        match self {
            IdxData::U8(_) => "u8",
            IdxData::I8(_) => "i8",
            IdxData::I16(_) => "i16",
            IdxData::I32(_) => "i32",
            IdxData::F32(_) => "f32",
            IdxData::F64(_) => "f64",
        }
    }
}

/// A parsed IDX file: its dimensions and elements.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
    /// The elements, row-major.
    pub data: IdxData,
    /// The file it came from (for error messages).
    pub path: PathBuf,
}

/// Size in bytes of the elements of IDX type `code`, or `None` for an unknown code.
fn type_size(code: u8) -> Option<usize> {
    match code {
        0x08 | 0x09 => Some(1),
        0x0B => Some(2),
        0x0C | 0x0D => Some(4),
        0x0E => Some(8),
        _ => None,
    }
}

/// Reads an IDX file (gzipped or not), checking the magic, type code, dimensions and that the
/// payload is exactly as long as the dimensions say.
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    parse_idx(path, &bytes)
}

/// Parses the bytes of an IDX file; `path` only names the file in errors.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray> {
    if bytes.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    if bytes.len() < 4 {
        return Err(DataError::idx(
            path,
            format!(
                "truncated header: {} bytes, the magic number alone needs 4",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::idx(
            path,
            format!(
                "wrong magic number {:02x} {:02x} {:02x} {:02x}: an IDX file starts with 00 00 <type> <ndims>",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    let (code, ndims) = (bytes[2], bytes[3] as usize);
    let size = type_size(code).ok_or_else(|| {
        DataError::idx(
            path,
            format!(
                "unsupported data type code 0x{code:02x} (supported: 0x08 u8, 0x09 i8, 0x0b i16, 0x0c i32, 0x0d f32, 0x0e f64)"
            ),
        )
    })?;
    if ndims == 0 {
        return Err(DataError::idx(path, "zero dimensions in the magic number"));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::idx(
            path,
            format!(
                "truncated header: {ndims} dimensions need {header} header bytes, the file has {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(size))
        .ok_or_else(|| DataError::idx(path, format!("dimensions {dims:?} overflow")))?;
    let payload = &bytes[header..];
    if payload.len() < count {
        return Err(DataError::idx(
            path,
            format!(
                "truncated payload: dimensions {dims:?} of {}-byte elements need {count} bytes, the file has {}",
                size,
                payload.len()
            ),
        ));
    }
    if payload.len() > count {
        return Err(DataError::idx(
            path,
            format!(
                "{} trailing bytes after the {count} bytes of dimensions {dims:?}",
                payload.len() - count
            ),
        ));
    }
    let data = match code {
        0x08 => IdxData::U8(payload.to_vec()),
        0x09 => IdxData::I8(payload.iter().map(|&b| b as i8).collect()),
        0x0B => IdxData::I16(
            payload
                .chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect(),
        ),
        0x0C => IdxData::I32(
            payload
                .chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        0x0D => IdxData::F32(
            payload
                .chunks_exact(4)
                .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        _ => IdxData::F64(
            payload
                .chunks_exact(8)
                .map(|c| f64::from_be_bytes(c.try_into().unwrap()))
                .collect(),
        ),
    };
    Ok(IdxArray {
        dims,
        data,
        path: path.into(),
    })
}

/// How image tensors are shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ImageLayout {
    /// `[N, 1, H, W]`: one channel, for convolutions.
    #[default]
    Nchw,
    /// `[N, H·W]`: flat rows, for an MLP.
    Flat,
}

impl IdxArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// `u8` images `[N, H, W]` as an f32 tensor scaled to `[0, 1]` (pixel / 255), shaped as
    /// `layout` says. Other element types or ranks are errors.
    pub fn to_images(&self, layout: ImageLayout) -> Result<Tensor> {
        let IdxData::U8(px) = &self.data else {
            return Err(DataError::invalid(
                &self.path,
                format!("images must be u8, got {}", self.data.type_name()),
            ));
        };
        let [n, h, w] = self.dims[..] else {
            return Err(DataError::invalid(
                &self.path,
                format!("images must be 3-D [N, H, W], got dims {:?}", self.dims),
            ));
        };
        let mut buf = Buffer::<f32>::uninit(px.len());
        for (o, &p) in buf.iter_mut().zip(px) {
            *o = p as f32 / 255.0;
        }
        Ok(match layout {
            ImageLayout::Nchw => Tensor::from_buffer(buf, [n, 1, h, w]),
            ImageLayout::Flat => Tensor::from_buffer(buf, [n, h * w]),
        })
    }

    /// Integer labels `[N]` as an i64 tensor. Float element types or other ranks are errors.
    pub fn to_labels(&self) -> Result<Tensor> {
        if self.dims.len() != 1 {
            return Err(DataError::invalid(
                &self.path,
                format!("labels must be 1-D [N], got dims {:?}", self.dims),
            ));
        }
        let labels: Vec<i64> = match &self.data {
            IdxData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            IdxData::I8(v) => v.iter().map(|&x| x as i64).collect(),
            IdxData::I16(v) => v.iter().map(|&x| x as i64).collect(),
            IdxData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            other => {
                return Err(DataError::invalid(
                    &self.path,
                    format!("labels must be integers, got {}", other.type_name()),
                ))
            }
        };
        Ok(Tensor::from_buffer(
            Buffer::from_slice(&labels),
            [labels.len()],
        ))
    }

    /// All elements as an f32 tensor of the file's dimensions (values unscaled).
    pub fn to_tensor_f32(&self) -> Tensor {
        let v: Vec<f32> = match &self.data {
            IdxData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::I8(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::I16(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::F32(v) => v.clone(),
            IdxData::F64(v) => v.iter().map(|&x| x as f32).collect(),
        };
        Tensor::from_buffer(Buffer::from_slice(&v), self.dims.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::file::test_util::TempDir;

    /// The bytes of an IDX file of type `code` with `dims` and raw big-endian `payload`.
    pub(crate) fn idx_bytes(code: u8, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, code, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(payload);
        b
    }

    fn err_of(dir: &TempDir, name: &str, bytes: &[u8]) -> String {
        let path = dir.write(name, bytes);
        let e = read_idx(&path).unwrap_err().to_string();
        assert!(e.contains(name), "error does not name the file: {e}");
        e
    }

    #[test]
    fn reads_u8_images_and_labels_plain_and_gzipped() {
        let dir = TempDir::new("idx");
        let px: Vec<u8> = (0..2 * 2 * 3).map(|i| (i * 20) as u8).collect();
        for name in ["img.idx", "img.idx.gz"] {
            let a = read_idx(dir.write(name, &idx_bytes(0x08, &[2, 2, 3], &px))).unwrap();
            assert_eq!(a.dims, vec![2, 2, 3]);
            assert_eq!(a.data, IdxData::U8(px.clone()));
            let t = a.to_images(ImageLayout::Nchw).unwrap();
            assert_eq!(t.dims(), &[2, 1, 2, 3]);
            let expect: Vec<f32> = px.iter().map(|&p| p as f32 / 255.0).collect();
            assert_eq!(t.to_vec::<f32>(), expect);
            let flat = a.to_images(ImageLayout::Flat).unwrap();
            assert_eq!(flat.dims(), &[2, 6]);
            assert_eq!(flat.to_vec::<f32>(), expect);
        }
        let l = read_idx(dir.write("lab.idx.gz", &idx_bytes(0x08, &[3], &[7, 0, 9]))).unwrap();
        let t = l.to_labels().unwrap();
        assert_eq!(t.dtype(), kiln_core::DType::I64);
        assert_eq!(t.to_vec::<i64>(), vec![7, 0, 9]);
        // Images are not labels, and labels are not images.
        assert!(l
            .to_images(ImageLayout::Nchw)
            .unwrap_err()
            .to_string()
            .contains("images must be 3-D [N, H, W], got dims [3]"));
        let img = read_idx(dir.write("i.idx", &idx_bytes(0x08, &[1, 1, 1], &[1]))).unwrap();
        assert!(img
            .to_labels()
            .unwrap_err()
            .to_string()
            .contains("labels must be 1-D [N], got dims [1, 1, 1]"));
    }

    #[test]
    fn reads_every_element_type_big_endian() {
        let dir = TempDir::new("idx-types");
        let i16s: Vec<u8> = [-2i16, 300].iter().flat_map(|v| v.to_be_bytes()).collect();
        let a = read_idx(dir.write("a.idx", &idx_bytes(0x0B, &[2], &i16s))).unwrap();
        assert_eq!(a.data, IdxData::I16(vec![-2, 300]));
        assert_eq!(a.to_labels().unwrap().to_vec::<i64>(), vec![-2, 300]);
        let i32s: Vec<u8> = [-70000i32, 5]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let a = read_idx(dir.write("b.idx", &idx_bytes(0x0C, &[1, 2], &i32s))).unwrap();
        assert_eq!(a.data, IdxData::I32(vec![-70000, 5]));
        assert_eq!(a.to_tensor_f32().to_vec::<f32>(), vec![-70000.0, 5.0]);
        let f32s: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let a = read_idx(dir.write("c.idx", &idx_bytes(0x0D, &[2], &f32s))).unwrap();
        assert_eq!(a.data, IdxData::F32(vec![1.5, -0.25]));
        assert!(a
            .to_labels()
            .unwrap_err()
            .to_string()
            .contains("labels must be integers, got f32"));
        let f64s: Vec<u8> = 2.5f64.to_be_bytes().to_vec();
        let a = read_idx(dir.write("d.idx", &idx_bytes(0x0E, &[1], &f64s))).unwrap();
        assert_eq!(a.data, IdxData::F64(vec![2.5]));
        let a = read_idx(dir.write("e.idx", &idx_bytes(0x09, &[1], &[0xff]))).unwrap();
        assert_eq!(a.data, IdxData::I8(vec![-1]));
        assert!(a
            .to_images(ImageLayout::Flat)
            .unwrap_err()
            .to_string()
            .contains("images must be u8, got i8"));
    }

    #[test]
    fn malformed_files_are_precise_errors() {
        let dir = TempDir::new("idx-bad");
        let e = err_of(&dir, "empty.idx", b"");
        assert!(e.ends_with("file is empty"), "{e}");
        let e = err_of(&dir, "short.idx", &[0, 0]);
        assert!(e.contains("truncated header: 2 bytes"), "{e}");
        let e = err_of(&dir, "magic.idx", &[1, 2, 8, 1, 0, 0, 0, 0]);
        assert!(e.contains("wrong magic number 01 02 08 01"), "{e}");
        let e = err_of(&dir, "dtype.idx", &idx_bytes(0x0A, &[1], &[0]));
        assert!(e.contains("unsupported data type code 0x0a"), "{e}");
        let e = err_of(&dir, "nodims.idx", &[0, 0, 8, 0]);
        assert!(e.contains("zero dimensions"), "{e}");
        let e = err_of(&dir, "hdr.idx", &[0, 0, 8, 3, 0, 0, 0, 1]);
        assert!(
            e.contains("truncated header: 3 dimensions need 16 header bytes, the file has 8"),
            "{e}"
        );
        let e = err_of(&dir, "trunc.idx.gz", &idx_bytes(0x08, &[2, 3], &[0; 5]));
        assert!(
            e.contains("truncated payload: dimensions [2, 3] of 1-byte elements need 6 bytes, the file has 5"),
            "{e}"
        );
        let e = err_of(&dir, "trunc32.idx", &idx_bytes(0x0C, &[2], &[0; 7]));
        assert!(e.contains("need 8 bytes, the file has 7"), "{e}");
        let e = err_of(&dir, "trail.idx", &idx_bytes(0x08, &[2], &[1, 2, 3, 4]));
        assert!(
            e.contains("2 trailing bytes after the 2 bytes of dimensions [2]"),
            "{e}"
        );
    }
}
