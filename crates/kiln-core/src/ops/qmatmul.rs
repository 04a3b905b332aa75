//! Products with block-quantised weight matrices (ggml's `Q8_0`, `Q4_0` and `Q4_1` layouts), kept
//! quantised in memory: `x · Wᵀ` as a linear layer computes it, for LLM inference and for
//! fine-tuning adapters on a frozen quantised base (the gradient flows to `x`).
//!
//! Two ways to take the product:
//! - [`Tensor::qmatmul`]: f32 activations. One row of `x` is dotted with each weight block
//!   decoded in registers; from [`DEQUANT_GEMM_ROWS`] rows of `x` on, tiles of `W` are decoded
//!   to f32 once and multiplied with gemm. Equal to `x · dequantize(W)ᵀ` up to f32 rounding.
//! - [`Tensor::qmatmul_q8`]: the activations are quantised too (per block of 32, to 8 bits, as
//!   llama.cpp does) and the block dot products are integer ones: faster, slightly less exact.

use super::matmul::{gemm_into, Start};
#[cfg(target_arch = "x86_64")]
use super::qpanels::{Panels, GROUP};
use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::parallel::{self, PARALLEL_THRESHOLD};
use crate::vmath::{isa, Isa};
use crate::{DType, Element, Layout, Shape, Tensor};
use gemm::Parallelism;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// Values per quantisation block (all supported types).
pub const QK: usize = 32;

/// From this many rows of `x` on, [`Tensor::qmatmul`] decodes weight tiles and uses gemm.
pub const DEQUANT_GEMM_ROWS: usize = 8;

/// Weight rows decoded at once on the gemm path.
const TILE_ROWS: usize = 64;

/// A block-quantisation format (ggml's layouts, little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    /// f16 scale `d`, 32 × i8 `q`: `d·q`.
    Q8_0,
    /// f16 scale `d`, 16 bytes of nibbles: `d·(q − 8)`; low nibbles are values 0..16.
    Q4_0,
    /// f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles: `d·q + m`.
    Q4_1,
}

impl QType {
    /// Bytes of one block of [`QK`] values.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
        }
    }
}

impl fmt::Display for QType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QType::Q8_0 => "Q8_0",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
        })
    }
}

/// IEEE half-precision bits to f32 (exact; subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = mant · 2^-24, exact in f32.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | (((exp as u32) + 112) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// f32 to the nearest IEEE half (round to nearest even; overflow to infinity).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rest > half || (rest == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && r & 1 == 1) {
        r += 1; // may carry into the exponent, which is the correct rounding
    }
    sign | r as u16
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// A `rows × cols` weight matrix stored block-quantised, row by row (`cols / 32` blocks each).
/// The bytes may be owned or borrowed from a memory map (anything `AsRef<[u8]>`).
#[derive(Clone)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    offset: usize,
    /// The rows interleaved for the AVX-512 VNNI kernel, made on first use by an 8-bit product
    /// (`None` inside when the CPU lacks it); clones share them.
    #[cfg(target_arch = "x86_64")]
    panels: Arc<OnceLock<Option<Panels>>>,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMatrix({} {}×{})", self.ty, self.rows, self.cols)
    }
}

impl QMatrix {
    /// Wraps `len` bytes at `offset` of `bytes` as a `rows × cols` matrix of type `ty`; an error
    /// says what does not fit (cols not a multiple of 32, too few bytes).
    pub fn from_bytes(
        ty: QType,
        rows: usize,
        cols: usize,
        bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
        offset: usize,
    ) -> Result<QMatrix, String> {
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(format!(
                "{ty} matrix: {cols} columns is not a positive multiple of {QK}"
            ));
        }
        let need = rows
            .checked_mul(cols / QK)
            .and_then(|b| b.checked_mul(ty.block_bytes()))
            .ok_or_else(|| format!("{ty} matrix {rows}×{cols}: size overflows"))?;
        let have = (*bytes).as_ref().len();
        if offset.checked_add(need).is_none_or(|end| end > have) {
            return Err(format!(
                "{ty} matrix {rows}×{cols} needs {need} bytes at offset {offset}, the buffer has {have}"
            ));
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            bytes,
            offset,
            #[cfg(target_arch = "x86_64")]
            panels: Arc::new(OnceLock::new()),
        })
    }

    /// Quantises a 2-D f32/f64 tensor `[rows, cols]` the way ggml does (round to nearest).
    pub fn quantize(ty: QType, w: &Tensor) -> QMatrix {
        assert!(
            w.rank() == 2 && w.dim(1).is_multiple_of(QK) && w.dim(1) > 0,
            "QMatrix::quantize: weight {} must be 2-D with a positive multiple of {QK} columns",
            w.shape()
        );
        let values = w.to_dtype(DType::F32).to_vec::<f32>();
        let (rows, cols) = (w.dim(0), w.dim(1));
        let mut out = Vec::with_capacity(rows * cols / QK * ty.block_bytes());
        for block in values.chunks_exact(QK) {
            quantize_block(ty, block, &mut out);
        }
        QMatrix::from_bytes(ty, rows, cols, Arc::new(out), 0).expect("sizes match")
    }

    /// The block format.
    pub fn qtype(&self) -> QType {
        self.ty
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The quantised bytes, row after row.
    pub fn bytes(&self) -> &[u8] {
        let len = self.rows * self.row_bytes();
        &(*self.bytes).as_ref()[self.offset..self.offset + len]
    }

    /// Prepares this matrix for 8-bit products ([`Tensor::qmatmul_q8`]) now rather than on the
    /// first one: where the CPU has AVX-512 VNNI, a copy of the weights with rows interleaved
    /// for its kernel (as many bytes again as the matrix). Does nothing elsewhere.
    pub fn prepare_q8(&self) {
        #[cfg(target_arch = "x86_64")]
        self.panels();
    }

    /// The interleaved rows of the VNNI kernel, made now if this is the first call; `None`
    /// when the CPU lacks AVX-512 VNNI (or `KILN_VMATH_ISA` narrows the kernels).
    #[cfg(target_arch = "x86_64")]
    fn panels(&self) -> Option<&Panels> {
        self.panels
            .get_or_init(|| vnni_ok().then(|| Panels::pack(self)))
            .as_ref()
    }

    /// The panels if an earlier call made them (never makes them: for the threads of a split).
    #[cfg(target_arch = "x86_64")]
    fn panels_made(&self) -> Option<&Panels> {
        self.panels.get().and_then(Option::as_ref)
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.ty.block_bytes()
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes()[r * rb..(r + 1) * rb]
    }

    /// Decodes rows `start..start + out.len() / cols` into `out`.
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        let bb = self.ty.block_bytes();
        for (i, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            for (blk, d) in self
                .row(start + i)
                .chunks_exact(bb)
                .zip(dst.chunks_exact_mut(QK))
            {
                dequantize_block(self.ty, blk, d);
            }
        }
    }

    /// Rows `ids` decoded to f32, `[ids.len(), cols]`: an embedding lookup.
    pub fn gather_rows(&self, ids: &[usize]) -> Tensor {
        let mut buf = Buffer::<f32>::uninit(ids.len() * self.cols);
        for (&id, dst) in ids.iter().zip(buf.chunks_exact_mut(self.cols)) {
            assert!(
                id < self.rows,
                "QMatrix::gather_rows: row {id} out of range for a {}×{} matrix",
                self.rows,
                self.cols
            );
            self.dequantize_rows(id, dst);
        }
        Tensor::from_storage(
            f32::into_storage(buf),
            Layout::contiguous(Shape::from([ids.len(), self.cols])),
        )
    }

    /// A copy with the rows reordered: row `i` of the result is row `order[i]` of `self`.
    pub fn permute_rows(&self, order: &[usize]) -> QMatrix {
        assert!(
            order.len() == self.rows && order.iter().all(|&r| r < self.rows),
            "QMatrix::permute_rows: order of {} rows for a matrix of {}",
            order.len(),
            self.rows
        );
        let mut out = Vec::with_capacity(self.bytes().len());
        for &r in order {
            out.extend_from_slice(self.row(r));
        }
        QMatrix::from_bytes(self.ty, self.rows, self.cols, Arc::new(out), 0).expect("same size")
    }

    /// The full-precision f32 matrix `[rows, cols]`.
    pub fn dequantize(&self) -> Tensor {
        let mut buf = Buffer::<f32>::uninit(self.rows * self.cols);
        parallel::for_each_chunk(&mut buf, |start, chunk| {
            // Chunks are multiples of 64 elements, not of rows: decode whole rows that overlap.
            let first = start / self.cols;
            let last = (start + chunk.len()).div_ceil(self.cols);
            let mut rows = vec![0f32; (last - first) * self.cols];
            self.dequantize_rows(first, &mut rows);
            let skip = start - first * self.cols;
            chunk.copy_from_slice(&rows[skip..skip + chunk.len()]);
        });
        Tensor::from_storage(
            f32::into_storage(buf),
            Layout::contiguous(Shape::from([self.rows, self.cols])),
        )
    }
}

/// Appends one quantised block of 32 values to `out`.
fn quantize_block(ty: QType, x: &[f32], out: &mut Vec<u8>) {
    match ty {
        QType::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
            out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
        }
        QType::Q4_0 => {
            // The value of largest magnitude maps to -8.
            let max = x
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
            let q = |v: f32| ((v * id + 8.5) as i32).min(15) as u8;
            out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }
        QType::Q4_1 => {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
            out.extend_from_slice(&f32_to_f16(min).to_le_bytes());
            let q = |v: f32| (((v - min) * id + 0.5) as i32).min(15) as u8;
            out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }
    }
}

/// Decodes one block into 32 f32 values.
fn dequantize_block(ty: QType, b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    match ty {
        QType::Q8_0 => {
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }
        QType::Q4_0 => {
            let qs = &b[2..18];
            for j in 0..16 {
                out[j] = d * ((qs[j] & 0xf) as i32 - 8) as f32;
                out[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        QType::Q4_1 => {
            let m = half_at(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                out[j] = d * (qs[j] & 0xf) as f32 + m;
                out[j + 16] = d * (qs[j] >> 4) as f32 + m;
            }
        }
    }
}

/// Scale, offset term and where the quants start: value = `d·q + c` for the block's quants `q`
/// (unsigned nibbles for Q4, signed bytes for Q8).
fn block_params(ty: QType, b: &[u8]) -> (f32, f32, usize) {
    let d = half_at(b, 0);
    match ty {
        QType::Q8_0 => (d, 0.0, 2),
        QType::Q4_0 => (d, -8.0 * d, 2),
        QType::Q4_1 => (d, half_at(b, 2), 4),
    }
}

// ------------------------------------------------------------------- f32-activation dots

/// `Σ_j w[j]·x[j]` over one weight row and one f32 row; `xsum[b]` is the sum of block `b` of x.
fn dot_row_f32(ty: QType, w: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: AVX2, FMA and F16C are available (checked by `simd_ok`).
        return unsafe { avx2::dot_row_f32(ty, w, x, xsum) };
    }
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    for ((blk, xb), &s) in w.chunks_exact(bb).zip(x.chunks_exact(QK)).zip(xsum) {
        let (d, c, at) = block_params(ty, blk);
        let mut sum = 0f32;
        if ty == QType::Q8_0 {
            for (&q, &v) in blk[at..at + QK].iter().zip(xb) {
                sum += (q as i8) as f32 * v;
            }
        } else {
            for (j, &q) in blk[at..at + 16].iter().enumerate() {
                sum += (q & 0xf) as f32 * xb[j] + (q >> 4) as f32 * xb[j + 16];
            }
        }
        acc += d * sum + c * s;
    }
    acc
}

// --------------------------------------------------------------- 8-bit activation dots

/// One row of activations quantised per block: scales, `Σq` and `scale·Σq` per block, and the
/// quants.
pub(super) struct Q8Row {
    pub(super) d: Vec<f32>,
    pub(super) qsum: Vec<i32>,
    pub(super) dsum: Vec<f32>,
    pub(super) q: Vec<i8>,
}

pub(super) fn quantize_row_q8(x: &[f32]) -> Q8Row {
    let blocks = x.len() / QK;
    let mut r = Q8Row {
        d: Vec::with_capacity(blocks),
        qsum: Vec::with_capacity(blocks),
        dsum: Vec::with_capacity(blocks),
        q: Vec::with_capacity(x.len()),
    };
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        r.q.resize(blocks * QK, 0);
        for (xb, qb) in x.chunks_exact(QK).zip(r.q.chunks_exact_mut(QK)) {
            // SAFETY: AVX-512F is available (checked by `isa`); both blocks hold 32 values.
            let (d, s) = unsafe { avx512::quantize_block_q8(xb, qb) };
            r.d.push(d);
            r.qsum.push(s);
            r.dsum.push(d * s as f32);
        }
        return r;
    }
    for xb in x.chunks_exact(QK) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut s = 0i32;
        for &v in xb {
            let q = (v * id).round() as i8;
            s += q as i32;
            r.q.push(q);
        }
        r.d.push(d);
        r.qsum.push(s);
        r.dsum.push(d * s as f32);
    }
    r
}

/// `Σ_j w[j]·x[j]` with both sides quantised (integer block dot products).
fn dot_row_q8(ty: QType, w: &[u8], x: &Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: AVX2, FMA and F16C are available (checked by `simd_ok`), and the VNNI
        // features when `vnni_ok` says so.
        return unsafe {
            if vnni_ok() {
                avx2::dot_row_q8_vnni(ty, w, x)
            } else {
                avx2::dot_row_q8(ty, w, x)
            }
        };
    }
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let (d, c, at) = block_params(ty, blk);
        let xq = &x.q[b * QK..(b + 1) * QK];
        let mut sum = 0i32;
        if ty == QType::Q8_0 {
            for (&q, &v) in blk[at..at + QK].iter().zip(xq) {
                sum += (q as i8) as i32 * v as i32;
            }
        } else {
            for (j, &q) in blk[at..at + 16].iter().enumerate() {
                sum += (q & 0xf) as i32 * xq[j] as i32 + (q >> 4) as i32 * xq[j + 16] as i32;
            }
        }
        acc += d * x.d[b] * sum as f32 + c * x.dsum[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QK;
    use std::arch::x86_64::*;

    /// One block of [`super::quantize_row_q8`] (scale `amax / 127`, quants rounded half away
    /// from zero, as `f32::round` does): the same bits as the scalar loop. Returns the scale
    /// and the sum of the quants.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_block_q8(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        debug_assert!(x.len() == QK && q.len() == QK);
        let a = [
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        ];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a[0]), _mm512_abs_ps(a[1])));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut sum = _mm512_setzero_si512();
        for (h, &a) in a.iter().enumerate() {
            let v = _mm512_mul_ps(a, id);
            // Round half away from zero: truncate, then step away from zero where the
            // (exact) fraction is at least one half.
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
            let sign = _mm512_and_ps(v, _mm512_set1_ps(-0.0));
            let step = _mm512_or_ps(sign, _mm512_set1_ps(1.0));
            let r = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, step));
            sum = _mm512_add_epi32(sum, r);
            _mm_storeu_si128(
                q.as_mut_ptr().add(16 * h) as *mut __m128i,
                _mm512_cvtepi32_epi8(r),
            );
        }
        (d, _mm512_reduce_add_epi32(sum))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Row, QType, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The little-endian half at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_bits(p: *const u8) -> u16 {
        u16::from_le_bytes([*p, *p.add(1)])
    }

    /// The half at `p` as f32 (F16C).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(half_bits(p) as i32)))
    }

    /// Scale, offset term and where the quants start (see `block_params`), with F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn params(ty: QType, b: *const u8) -> (f32, f32, usize) {
        let d = half(b);
        match ty {
            QType::Q8_0 => (d, 0.0, 2),
            QType::Q4_0 => (d, -8.0 * d, 2),
            QType::Q4_1 => (d, half(b.add(2)), 4),
        }
    }

    /// The 32 quants of a nibble block as bytes 0..32 (low nibbles, then high nibbles).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    /// The integer step of the 8-bit dot products: eight i32 lanes, each the sum of four
    /// products of unsigned bytes `u` with signed bytes `s`. The two implementations give the
    /// same integers (no pair of products here reaches maddubs' i16 saturation: at most
    /// 2·128·127 for `Q8_0` with the sign moved onto the activations, 2·15·127 for 4-bit
    /// quants), so every kernel gives the same bits on either.
    pub(super) trait IntDot {
        /// `Σ_{t<4} u[4i+t]·s[4i+t]` in lane `i`.
        unsafe fn sums(u: __m256i, s: __m256i) -> __m256i;
    }

    /// AVX2: `maddubs` (pairs to i16) then `madd` (pairs of pairs to i32).
    pub(super) struct Madd;

    impl IntDot for Madd {
        #[inline(always)]
        unsafe fn sums(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    /// AVX-512 VNNI (256-bit form): one `vpdpbusd`.
    pub(super) struct Vnni;

    impl IntDot for Vnni {
        #[inline(always)]
        unsafe fn sums(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        }
    }

    /// The eight i32 partial sums of one block's integer dot product (weight quants at `q`,
    /// activation quants `xq`), as f32.
    #[inline(always)]
    unsafe fn block_dot_q8<D: IntDot>(ty: QType, q: *const u8, xq: __m256i) -> __m256 {
        // The unsigned side must be the weights: for Q8_0 their magnitudes, with their signs
        // moved onto the activations.
        let sums = if ty == QType::Q8_0 {
            let wq = _mm256_loadu_si256(q as *const __m256i);
            D::sums(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq))
        } else {
            D::sums(nibbles(q), xq)
        };
        _mm256_cvtepi32_ps(sums)
    }

    /// Wraps a kernel body generic over [`IntDot`] into an AVX2 function and an AVX-512 VNNI
    /// one (the body is inlined into each, so each is compiled for its own features).
    macro_rules! int_dot_variants {
        ($(#[$doc:meta])* $name:ident, $vnni:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            $(#[$doc])*
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $name($($arg: $ty),*) -> $ret {
                $body::<Madd>($($arg),*)
            }

            /// As the AVX2 function of the same name without `_vnni`, with the integer step
            /// on AVX-512 VNNI (the same results).
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            pub(super) unsafe fn $vnni($($arg: $ty),*) -> $ret {
                $body::<Vnni>($($arg),*)
            }
        };
    }

    /// `Σ q·x` over one block with f32 activations at `xp` (the weight quants at `q`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_dot_f32(ty: QType, q: *const u8, xp: *const f32) -> __m256 {
        let (q0, q1, q2, q3) = if ty == QType::Q8_0 {
            let lo = _mm_loadu_si128(q as *const __m128i);
            let hi = _mm_loadu_si128(q.add(16) as *const __m128i);
            (
                _mm256_cvtepi8_epi32(lo),
                _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)),
                _mm256_cvtepi8_epi32(hi),
                _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)),
            )
        } else {
            let n = nibbles(q);
            let lo = _mm256_castsi256_si128(n);
            let hi = _mm256_extracti128_si256(n, 1);
            (
                _mm256_cvtepu8_epi32(lo),
                _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                _mm256_cvtepu8_epi32(hi),
                _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
            )
        };
        let mut s = _mm256_mul_ps(_mm256_cvtepi32_ps(q0), _mm256_loadu_ps(xp));
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_loadu_ps(xp.add(8)), s);
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q2), _mm256_loadu_ps(xp.add(16)), s);
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(q3), _mm256_loadu_ps(xp.add(24)), s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row_f32(ty: QType, w: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let bb = ty.block_bytes();
        let blocks = w.len() / bb;
        assert!(x.len() >= blocks * QK && xsum.len() >= blocks);
        let mut acc = _mm256_setzero_ps();
        let mut offset_term = 0f32;
        for (b, &xs) in xsum[..blocks].iter().enumerate() {
            let blk = w.as_ptr().add(b * bb);
            let (d, c, at) = params(ty, blk);
            let s = block_dot_f32(ty, blk.add(at), x.as_ptr().add(b * QK));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
            offset_term += c * xs;
        }
        hsum(acc) + offset_term
    }

    int_dot_variants!(
        /// `Σ_j w[j]·x[j]` over one row, both sides quantised.
        dot_row_q8, dot_row_q8_vnni, dot_row_q8_with, (ty: QType, w: &[u8], x: &Q8Row) -> f32
    );

    #[inline(always)]
    unsafe fn dot_row_q8_with<D: IntDot>(ty: QType, w: &[u8], x: &Q8Row) -> f32 {
        let bb = ty.block_bytes();
        let blocks = w.len() / bb;
        assert!(x.q.len() >= blocks * QK && x.d.len() >= blocks && x.dsum.len() >= blocks);
        let mut acc = _mm256_setzero_ps();
        let mut offset_term = 0f32;
        for b in 0..blocks {
            let blk = w.as_ptr().add(b * bb);
            let (d, c, at) = params(ty, blk);
            let xq = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
            let sums = block_dot_q8::<D>(ty, blk.add(at), xq);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[b]), sums, acc);
            offset_term += c * x.dsum[b];
        }
        hsum(acc) + offset_term
    }

    /// Scales `d` and offset terms `c` (value = `d·q + c`) of block `b` of four rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn params4(ty: QType, p: [*const u8; 4]) -> (__m128, __m128) {
        let d = halves4(p, 0);
        let c = match ty {
            QType::Q8_0 => _mm_setzero_ps(),
            QType::Q4_0 => _mm_mul_ps(d, _mm_set1_ps(-8.0)),
            QType::Q4_1 => halves4(p, 2),
        };
        (d, c)
    }

    /// The halves at byte `o` of four blocks, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn halves4(p: [*const u8; 4], o: usize) -> __m128 {
        _mm_cvtph_ps(_mm_setr_epi16(
            half_bits(p[0].add(o)) as i16,
            half_bits(p[1].add(o)) as i16,
            half_bits(p[2].add(o)) as i16,
            half_bits(p[3].add(o)) as i16,
            0,
            0,
            0,
            0,
        ))
    }

    /// Lane `r` of `v` in all eight lanes (`vv` is `v` in both halves).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lane(vv: __m256, r: usize) -> __m256 {
        match r {
            0 => _mm256_permute_ps(vv, 0x00),
            1 => _mm256_permute_ps(vv, 0x55),
            2 => _mm256_permute_ps(vv, 0xaa),
            _ => _mm256_permute_ps(vv, 0xff),
        }
    }

    int_dot_variants!(
        /// Four weight rows dotted with one 8-bit activation row (each activation block loaded
        /// once for the four).
        dot4_q8, dot4_q8_vnni, dot4_q8_with, (ty: QType, w: [&[u8]; 4], x: &Q8Row) -> [f32; 4]
    );

    #[inline(always)]
    unsafe fn dot4_q8_with<D: IntDot>(ty: QType, w: [&[u8]; 4], x: &Q8Row) -> [f32; 4] {
        let bb = ty.block_bytes();
        let blocks = w[0].len() / bb;
        assert!(w.iter().all(|r| r.len() == blocks * bb));
        assert!(x.q.len() >= blocks * QK && x.d.len() >= blocks && x.dsum.len() >= blocks);
        let at = if ty == QType::Q4_1 { 4 } else { 2 };
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut off = _mm_setzero_ps();
        for b in 0..blocks {
            let p = w.map(|r| r.as_ptr().add(b * bb));
            let (d, c) = params4(ty, p);
            let dx = _mm_mul_ps(d, _mm_set1_ps(*x.d.get_unchecked(b)));
            let dxx = _mm256_set_m128(dx, dx);
            off = _mm_fmadd_ps(c, _mm_set1_ps(*x.dsum.get_unchecked(b)), off);
            let xq = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
            for r in 0..4 {
                let s = block_dot_q8::<D>(ty, p[r].add(at), xq);
                acc[r] = _mm256_fmadd_ps(lane(dxx, r), s, acc[r]);
            }
        }
        let mut o = [0f32; 4];
        _mm_storeu_ps(o.as_mut_ptr(), off);
        [
            hsum(acc[0]) + o[0],
            hsum(acc[1]) + o[1],
            hsum(acc[2]) + o[2],
            hsum(acc[3]) + o[3],
        ]
    }

    /// Four weight rows ready for [`dot4_unpacked_q8`]: the quants as unsigned bytes and the
    /// block parameters as f32, for several activation rows to share.
    #[derive(Default)]
    pub(super) struct Unpacked4 {
        /// `[blocks × 4]`: the quants (`Q8_0`: their magnitudes) as unsigned bytes.
        u: Vec<__m256i>,
        /// `Q8_0` only, `[blocks × 4]`: the raw quants, whose signs go onto the activations.
        signs: Vec<__m256i>,
        /// Per block: the four rows' scales.
        d: Vec<__m128>,
        /// Per block: the four rows' offset terms.
        c: Vec<__m128>,
    }

    /// Unpacks four weight rows into `into` (its storage is reused).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn unpack4(ty: QType, w: [&[u8]; 4], into: &mut Unpacked4) {
        let bb = ty.block_bytes();
        let blocks = w[0].len() / bb;
        assert!(w.iter().all(|r| r.len() == blocks * bb));
        let at = if ty == QType::Q4_1 { 4 } else { 2 };
        into.u.clear();
        into.signs.clear();
        into.d.clear();
        into.c.clear();
        for b in 0..blocks {
            let p = w.map(|r| r.as_ptr().add(b * bb));
            let (d, c) = params4(ty, p);
            into.d.push(d);
            into.c.push(c);
            for q in p {
                if ty == QType::Q8_0 {
                    let wq = _mm256_loadu_si256(q.add(at) as *const __m256i);
                    into.u.push(_mm256_sign_epi8(wq, wq));
                    into.signs.push(wq);
                } else {
                    into.u.push(nibbles(q.add(at)));
                }
            }
        }
    }

    int_dot_variants!(
        /// [`dot4_q8`] on unpacked rows: the same operations in the same order, so the same
        /// results, without unpacking the weights again for every activation row.
        dot4_unpacked_q8, dot4_unpacked_q8_vnni, dot4_unpacked_q8_with,
        (ty: QType, w: &Unpacked4, x: &Q8Row) -> [f32; 4]
    );

    #[inline(always)]
    unsafe fn dot4_unpacked_q8_with<D: IntDot>(ty: QType, w: &Unpacked4, x: &Q8Row) -> [f32; 4] {
        let blocks = w.d.len();
        assert!(x.q.len() >= blocks * QK && x.d.len() >= blocks && x.dsum.len() >= blocks);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut off = _mm_setzero_ps();
        for b in 0..blocks {
            let dx = _mm_mul_ps(w.d[b], _mm_set1_ps(*x.d.get_unchecked(b)));
            let dxx = _mm256_set_m128(dx, dx);
            off = _mm_fmadd_ps(w.c[b], _mm_set1_ps(*x.dsum.get_unchecked(b)), off);
            let xq = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let u = *w.u.get_unchecked(4 * b + r);
                let sums = if ty == QType::Q8_0 {
                    D::sums(u, _mm256_sign_epi8(xq, *w.signs.get_unchecked(4 * b + r)))
                } else {
                    D::sums(u, xq)
                };
                let s = _mm256_cvtepi32_ps(sums);
                *acc = _mm256_fmadd_ps(lane(dxx, r), s, *acc);
            }
        }
        let mut o = [0f32; 4];
        _mm_storeu_ps(o.as_mut_ptr(), off);
        [
            hsum(acc[0]) + o[0],
            hsum(acc[1]) + o[1],
            hsum(acc[2]) + o[2],
            hsum(acc[3]) + o[3],
        ]
    }

    /// Four weight rows dotted with one f32 activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4_f32(ty: QType, w: [&[u8]; 4], x: &[f32], xsum: &[f32]) -> [f32; 4] {
        let bb = ty.block_bytes();
        let blocks = w[0].len() / bb;
        assert!(w.iter().all(|r| r.len() == blocks * bb));
        assert!(x.len() >= blocks * QK && xsum.len() >= blocks);
        let at = if ty == QType::Q4_1 { 4 } else { 2 };
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut off = _mm_setzero_ps();
        for b in 0..blocks {
            let p = w.map(|r| r.as_ptr().add(b * bb));
            let (d, c) = params4(ty, p);
            let dd = _mm256_set_m128(d, d);
            off = _mm_fmadd_ps(c, _mm_set1_ps(*xsum.get_unchecked(b)), off);
            let xp = x.as_ptr().add(b * QK);
            for r in 0..4 {
                let s = block_dot_f32(ty, p[r].add(at), xp);
                acc[r] = _mm256_fmadd_ps(lane(dd, r), s, acc[r]);
            }
        }
        let mut o = [0f32; 4];
        _mm_storeu_ps(o.as_mut_ptr(), off);
        [
            hsum(acc[0]) + o[0],
            hsum(acc[1]) + o[1],
            hsum(acc[2]) + o[2],
            hsum(acc[3]) + o[3],
        ]
    }
}

// ------------------------------------------------------------- several weight rows at once

/// Whether the AVX2 kernels (which also need F16C for the block scales) can run.
#[cfg(target_arch = "x86_64")]
#[inline]
fn simd_ok() -> bool {
    isa() >= Isa::Avx2 && std::arch::is_x86_feature_detected!("f16c")
}

/// Whether the 8-bit kernels can take their integer step on AVX-512 VNNI: on the AVX-512 path
/// of [`isa`] (so `KILN_VMATH_ISA=avx2` turns it off) with VNNI and VL detected.
#[cfg(target_arch = "x86_64")]
#[inline]
fn vnni_ok() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static VNNI: AtomicU8 = AtomicU8::new(0);
    match VNNI.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let ok = simd_ok()
                && isa() == Isa::Avx512
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl");
            VNNI.store(1 + ok as u8, Ordering::Relaxed);
            ok
        }
    }
}

/// One activation row, prepared once for any number of weight rows.
enum Prepared<'a> {
    /// f32 values and their per-block sums.
    F32 { x: &'a [f32], xsum: &'a [f32] },
    /// 8-bit quantised values.
    Q8(&'a Q8Row),
}

/// `out[j·m + r] = W[first + j] · xs[r]` for consecutive weight rows `j` (`out` holds
/// `rows × m` values, `m = xs.len()`): each group of four weight rows is taken against every
/// activation row while it is in cache. A product's value does not depend on `m`.
fn dot_rows(w: &QMatrix, first: usize, xs: &[Prepared], out: &mut [f32]) {
    let ty = w.qtype();
    let rb = w.row_bytes();
    let all = w.bytes();
    let m = xs.len();
    let n = out.len() / m.max(1);
    let rows = |j: usize, n: usize| &all[(first + j) * rb..(first + j + n) * rb];
    let one = |j: usize, x: &Prepared| match x {
        Prepared::F32 { x, xsum } => dot_row_f32(ty, rows(j, 1), x, xsum),
        Prepared::Q8(q) => dot_row_q8(ty, rows(j, 1), q),
    };
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        let vnni = vnni_ok();
        let q8: Vec<&Q8Row> = xs
            .iter()
            .filter_map(|x| match x {
                Prepared::Q8(q) => Some(*q),
                Prepared::F32 { .. } => None,
            })
            .collect();
        if let Some(panels) = w.panels_made() {
            if q8.len() == m && first.is_multiple_of(GROUP) {
                // SAFETY: panels are made only where `vnni_ok` holds (AVX-512F and VNNI);
                // the rows of `xs` are quantised at the matrix's width.
                unsafe { panels.dot_rows(first, &q8, out) };
                return;
            }
        }
        if m > 1 && q8.len() == m {
            // Several 8-bit rows: unpack each group of four weight rows once for all of them.
            let mut unpacked = avx2::Unpacked4::default();
            while j + 4 <= n {
                let r = rows(j, 4);
                let four = [&r[..rb], &r[rb..2 * rb], &r[2 * rb..3 * rb], &r[3 * rb..]];
                // SAFETY: AVX2, FMA and F16C are available (checked by `simd_ok`).
                unsafe { avx2::unpack4(ty, four, &mut unpacked) };
                for (i, x) in q8.iter().enumerate() {
                    // SAFETY: as above.
                    let v = unsafe {
                        if vnni {
                            avx2::dot4_unpacked_q8_vnni(ty, &unpacked, x)
                        } else {
                            avx2::dot4_unpacked_q8(ty, &unpacked, x)
                        }
                    };
                    for (t, v) in v.into_iter().enumerate() {
                        out[(j + t) * m + i] = v;
                    }
                }
                j += 4;
            }
        }
        while j + 4 <= n {
            let r = rows(j, 4);
            let four = [&r[..rb], &r[rb..2 * rb], &r[2 * rb..3 * rb], &r[3 * rb..]];
            for (i, x) in xs.iter().enumerate() {
                // SAFETY: AVX2, FMA and F16C are available (checked by `simd_ok`).
                let v = unsafe {
                    match x {
                        Prepared::F32 { x, xsum } => avx2::dot4_f32(ty, four, x, xsum),
                        Prepared::Q8(q) if vnni => avx2::dot4_q8_vnni(ty, four, q),
                        Prepared::Q8(q) => avx2::dot4_q8(ty, four, q),
                    }
                };
                for (t, v) in v.into_iter().enumerate() {
                    out[(j + t) * m + i] = v;
                }
            }
            j += 4;
        }
    }
    for jj in j..n {
        for (i, x) in xs.iter().enumerate() {
            out[jj * m + i] = one(jj, x);
        }
    }
}

/// A few activation rows times several matrices of their width: `[m, total]`, each row
/// holding its products with every matrix one after the other. The rows of all the matrices
/// are split over the threads in one dispatch, and the weights stream from memory once
/// however many activation rows there are (decoding several sequences at once).
fn matvec_many(ws: &[&QMatrix], xs: &[Prepared]) -> Buffer<f32> {
    let m = xs.len();
    let total: usize = ws.iter().map(|w| w.dims().0).sum();
    let k = ws.first().map_or(0, |w| w.dims().1);
    // Weight-major `[total, m]`, so that each thread's part is one slice.
    let mut out = Buffer::<f32>::uninit(total * m);
    if xs.iter().all(|x| matches!(x, Prepared::Q8(_))) {
        // On this thread, before the split, so that `dot_rows` finds them.
        for w in ws {
            w.prepare_q8();
        }
    }
    // Splits start at whole panels (16 rows, a multiple of the 4-row kernels' groups).
    parallel::for_each_split(&mut out, 16 * m, m * total * k, |start, part| {
        let (start, len) = (start / m, part.len() / m);
        // Walk the matrices that overlap [start, start + len).
        let (mut at, mut base) = (0usize, 0usize);
        for w in ws {
            let n = w.dims().0;
            let (lo, hi) = (start.max(base), (start + len).min(base + n));
            if lo < hi {
                dot_rows(w, lo - base, xs, &mut part[at * m..(at + hi - lo) * m]);
                at += hi - lo;
            }
            base += n;
        }
    });
    if m == 1 {
        return out;
    }
    let mut rows = Buffer::<f32>::uninit(total * m);
    for (j, products) in out.chunks_exact(m).enumerate() {
        for (i, &v) in products.iter().enumerate() {
            rows[i * total + j] = v;
        }
    }
    rows
}

/// Up to this many activation rows, the products stream the weights once for all rows
/// ([`matvec_many`]); more rows (a prompt) are split over the threads row by row.
const MATVEC_ROWS: usize = 16;

// ------------------------------------------------------------------------- the products

/// `x` as contiguous f32 rows `[m, k]` (copied only when it is not already so).
fn rows_of(x: &Tensor, w: &QMatrix, op: &str) -> (Vec<usize>, Tensor) {
    let (n, k) = w.dims();
    assert!(
        x.rank() >= 1 && x.dim(-1) == k,
        "{op}: input {} does not end in the weight's {k} columns (weight {n}×{k})",
        x.shape()
    );
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    let x = x.detach().to_dtype(DType::F32).contiguous();
    (out_dims, x)
}

/// Runs `f(row, out_row)` for every output row of an `[m, n]` result, threads over rows of W
/// (decode) or rows of x (prompts).
fn per_output(
    m: usize,
    n: usize,
    work_per_row: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Buffer<f32> {
    let mut out = Buffer::<f32>::uninit(m * n);
    let par = parallel::num_threads() > 1 && m * work_per_row >= PARALLEL_THRESHOLD;
    parallel::for_chunks(&mut out, n, par, f);
    out
}

/// `x[m, k] · Wᵀ` with f32 activations.
fn forward_f32(x: &[f32], m: usize, w: &QMatrix) -> Buffer<f32> {
    if m >= DEQUANT_GEMM_ROWS {
        return forward_tiles(x, m, w);
    }
    let xsum = block_sums(x);
    matvec_many(&[w], &f32_rows(x, &xsum, w.dims().1))
}

/// Rows of `k` f32 activations with their block sums, prepared for [`dot_rows`].
fn f32_rows<'a>(x: &'a [f32], xsum: &'a [f32], k: usize) -> Vec<Prepared<'a>> {
    x.chunks_exact(k)
        .zip(xsum.chunks_exact(k / QK))
        .map(|(x, xsum)| Prepared::F32 { x, xsum })
        .collect()
}

/// The sum of every block of 32 values of `x`.
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(QK).map(|b| b.iter().sum()).collect()
}

/// The gemm path: tiles of W decoded to f32, each multiplied with all of x.
fn forward_tiles(x: &[f32], m: usize, w: &QMatrix) -> Buffer<f32> {
    let (n, k) = w.dims();
    let mut out = Buffer::<f32>::uninit(m * n);
    let tiles = n.div_ceil(TILE_ROWS);
    let run = |t: usize| -> Vec<f32> {
        let rows = TILE_ROWS.min(n - t * TILE_ROWS);
        let mut wt = vec![0f32; rows * k];
        w.dequantize_rows(t * TILE_ROWS, &mut wt);
        let mut part = vec![0f32; m * rows];
        // SAFETY: part is m × rows, x is m × k (row-major), wt is rows × k read as k × rows.
        unsafe {
            gemm_into(
                (m, rows, k),
                part.as_mut_ptr(),
                Start::Zero,
                x.as_ptr(),
                (k, 1),
                wt.as_ptr(),
                (1, k),
                Parallelism::None,
            );
        }
        part
    };
    let parts: Vec<Vec<f32>> = if parallel::num_threads() > 1 && m * n * k >= PARALLEL_THRESHOLD {
        use rayon::prelude::*;
        parallel::install(|| (0..tiles).into_par_iter().map(run).collect())
    } else {
        (0..tiles).map(run).collect()
    };
    for (t, part) in parts.iter().enumerate() {
        let rows = part.len() / m;
        for i in 0..m {
            out[i * n + t * TILE_ROWS..i * n + t * TILE_ROWS + rows]
                .copy_from_slice(&part[i * rows..(i + 1) * rows]);
        }
    }
    out
}

/// `x[m, k] · Wᵀ` with 8-bit activations.
fn forward_q8(x: &[f32], _m: usize, w: &QMatrix) -> Buffer<f32> {
    let k = w.dims().1;
    let rows: Vec<Q8Row> = x.chunks_exact(k).map(quantize_row_q8).collect();
    forward_q8_rows(&rows, w)
}

/// `x · Wᵀ` for activation rows already quantised.
fn forward_q8_rows(rows: &[Q8Row], w: &QMatrix) -> Buffer<f32> {
    let (n, k) = w.dims();
    if rows.len() <= MATVEC_ROWS {
        let xs: Vec<Prepared> = rows.iter().map(Prepared::Q8).collect();
        return matvec_many(&[w], &xs);
    }
    w.prepare_q8();
    per_output(rows.len(), n, n * k, |i, o| {
        dot_rows(w, 0, &[Prepared::Q8(&rows[i])], o)
    })
}

/// Backward of the quantised products: `dx = g · W` (W decoded); W itself is frozen.
struct QMatmulBackward {
    w: QMatrix,
}

impl GradFn for QMatmulBackward {
    fn name(&self) -> &'static str {
        "qmatmul"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let gx = g
            .to_dtype(DType::F32)
            .matmul(&self.w.dequantize())
            .to_dtype(x.dtype());
        vec![Some(gx)]
    }
}

fn qmatmul_with(
    x: &Tensor,
    w: &QMatrix,
    op: &str,
    f: fn(&[f32], usize, &QMatrix) -> Buffer<f32>,
) -> Tensor {
    let (out_dims, xc) = rows_of(x, w, op);
    let k = w.dims().1;
    let m = xc.elem_count() / k;
    let buf = {
        let s = xc.storage();
        let data = crate::typed_slice!(s, f32, op);
        let range = xc.layout().contiguous_range().expect("contiguous");
        f(&data[range], m, w)
    };
    let out = Tensor::op_result(f32::into_storage(buf), Shape::from(out_dims), &[x], || {
        QMatmulBackward { w: w.clone() }
    });
    if x.dtype() == DType::F32 {
        out
    } else {
        out.to_dtype(x.dtype())
    }
}

impl Tensor {
    /// `self · Wᵀ` for a quantised weight `W` `[n, k]` (`self` is `[.., k]`, the result
    /// `[.., n]`), with f32 activations: equal to `self.matmul(&w.dequantize().t())` up to
    /// rounding. Differentiable with respect to `self`.
    pub fn qmatmul(&self, w: &QMatrix) -> Tensor {
        qmatmul_with(self, w, "qmatmul", forward_f32)
    }

    /// As [`Tensor::qmatmul`], with the activations quantised to 8 bits per block of 32 (as
    /// llama.cpp does): faster, with a relative error of about 1e-2 on each product.
    pub fn qmatmul_q8(&self, w: &QMatrix) -> Tensor {
        qmatmul_with(self, w, "qmatmul_q8", forward_q8)
    }

    /// `[self · W₀ᵀ, self · W₁ᵀ, ..]` for quantised weights of one width (`self` `[.., k]`,
    /// every `Wᵢ` `[nᵢ, k]`): equal to [`Tensor::qmatmul`] (or, with `q8`,
    /// [`Tensor::qmatmul_q8`]) of each, but the activations are prepared (summed or quantised)
    /// once, and for a few rows (decoding) the rows of all the matrices share one split over
    /// the threads. Differentiable with respect to `self`.
    pub fn qmatmul_many(&self, ws: &[&QMatrix], q8: bool) -> Vec<Tensor> {
        let op = if q8 {
            "qmatmul_many(q8)"
        } else {
            "qmatmul_many"
        };
        let Some(first) = ws.first() else {
            return Vec::new();
        };
        let k = first.dims().1;
        for w in ws {
            assert!(
                w.dims().1 == k,
                "{op}: weights {:?} do not all have {k} columns",
                ws.iter().map(|w| w.dims()).collect::<Vec<_>>()
            );
        }
        let (out_dims, xc) = rows_of(self, first, op);
        let m = xc.elem_count() / k;
        let bufs: Vec<Buffer<f32>> = {
            let s = xc.storage();
            let data = crate::typed_slice!(s, f32, op);
            let x = &data[xc.layout().contiguous_range().expect("contiguous")];
            // `[m, total]` products with all the matrices → one `[m, n]` buffer per matrix.
            let split = |all: Buffer<f32>| -> Vec<Buffer<f32>> {
                let total = all.len() / m;
                let mut at = 0;
                ws.iter()
                    .map(|w| {
                        let n = w.dims().0;
                        let mut own = Buffer::<f32>::uninit(m * n);
                        for (dst, src) in own.chunks_exact_mut(n).zip(all.chunks_exact(total)) {
                            dst.copy_from_slice(&src[at..at + n]);
                        }
                        at += n;
                        own
                    })
                    .collect()
            };
            if q8 {
                let rows: Vec<Q8Row> = x.chunks_exact(k).map(quantize_row_q8).collect();
                if m <= MATVEC_ROWS {
                    let xs: Vec<Prepared> = rows.iter().map(Prepared::Q8).collect();
                    split(matvec_many(ws, &xs))
                } else {
                    ws.iter().map(|w| forward_q8_rows(&rows, w)).collect()
                }
            } else if m < DEQUANT_GEMM_ROWS {
                let xsum = block_sums(x);
                split(matvec_many(ws, &f32_rows(x, &xsum, k)))
            } else {
                ws.iter().map(|w| forward_f32(x, m, w)).collect()
            }
        };
        bufs.into_iter()
            .zip(ws)
            .map(|(buf, w)| {
                let mut dims = out_dims.clone();
                *dims.last_mut().expect("rank >= 1") = w.dims().0;
                let out =
                    Tensor::op_result(f32::into_storage(buf), Shape::from(dims), &[self], || {
                        QMatmulBackward { w: (*w).clone() }
                    });
                if self.dtype() == DType::F32 {
                    out
                } else {
                    out.to_dtype(self.dtype())
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::randn_f64;

    const TYPES: [QType; 3] = [QType::Q8_0, QType::Q4_0, QType::Q4_1];

    fn reference(x: &Tensor, w: &QMatrix) -> Vec<f64> {
        let wd = w.dequantize().to_dtype(DType::F64);
        x.to_dtype(DType::F64).matmul(&wd.t()).to_vec::<f64>()
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn half_conversion_round_trips_and_rounds_to_nearest_even() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f32_to_f16(f) & 0x7c00 == 0x7c00 && f32_to_f16(f) & 0x3ff != 0);
            } else {
                assert_eq!(f32_to_f16(f), h, "{h:#06x} -> {f}");
            }
        }
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        // 1 + 2^-11 lies halfway between 1 and the next half: ties to even (1.0).
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02);
        assert_eq!(f32_to_f16(1e6), 0x7c00);
    }

    #[test]
    fn quantize_then_dequantize_is_within_half_a_step() {
        let w = Tensor::randn([5, 64], 3);
        let values = w.to_vec::<f32>();
        for ty in TYPES {
            let q = QMatrix::quantize(ty, &w);
            assert_eq!(q.bytes().len(), 5 * 2 * ty.block_bytes());
            let back = q.dequantize().to_vec::<f32>();
            for (blk, (orig, got)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (lo, hi) = orig
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let step = match ty {
                    QType::Q8_0 => amax / 127.0,
                    QType::Q4_0 => amax / 8.0,
                    QType::Q4_1 => (hi - lo) / 15.0,
                };
                for (a, b) in orig.iter().zip(got) {
                    // Half a step, plus the f16 rounding of the scale and minimum.
                    assert!(
                        (a - b).abs() <= 0.5 * step * 1.01 + 2e-3 * amax,
                        "{ty} block {blk}: {a} vs {b} (step {step})"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_products_equal_the_dequantised_matmul_on_every_path() {
        // m = 1 (decode), 3 (row dots), 9 and 40 (tiled gemm); n crosses a tile boundary.
        for ty in TYPES {
            let w = QMatrix::quantize(ty, &Tensor::randn([70, 96], 1));
            for m in [1, 3, 9, 40] {
                let x = Tensor::randn([m, 96], 2);
                let got = x.qmatmul(&w);
                assert_eq!(got.dims(), &[m, 70]);
                let err = max_rel(&got.to_vec::<f32>(), &reference(&x, &w));
                assert!(err < 1e-5, "{ty} m={m}: relative error {err}");
            }
        }
    }

    #[test]
    fn threaded_and_scalar_paths_agree() {
        // Large enough to split over threads; compare with the single-thread result.
        let w = QMatrix::quantize(QType::Q4_1, &Tensor::randn([600, 256], 4));
        let x = Tensor::randn([1, 256], 5);
        let want = reference(&x, &w);
        for threads in [1, 2] {
            parallel::set_num_threads(threads);
            let got = x.qmatmul(&w).to_vec::<f32>();
            assert!(max_rel(&got, &want) < 1e-5);
            let got8 = x.qmatmul_q8(&w).to_vec::<f32>();
            assert!(max_rel(&got8, &want) < 2e-2);
        }
        parallel::set_num_threads(0);
    }

    #[test]
    fn q8_activation_products_are_close_and_match_their_own_scalar_definition() {
        for ty in TYPES {
            let w = QMatrix::quantize(ty, &Tensor::randn([33, 128], 6));
            // One row, a few (one split for all rows) and a prompt's worth (rows split).
            for m in [1, 4, MATVEC_ROWS + 3] {
                let x = Tensor::randn([m, 128], 7);
                let got = x.qmatmul_q8(&w).to_vec::<f32>();
                let err = max_rel(&got, &reference(&x, &w));
                assert!(err < 2e-2, "{ty} m={m}: relative error {err}");
                // Exactly the integer definition: quantise x, integer dots, scale.
                let xs = x.to_vec::<f32>();
                for i in 0..m {
                    let row = quantize_row_q8(&xs[i * 128..(i + 1) * 128]);
                    for j in 0..33 {
                        let bb = ty.block_bytes();
                        let mut want = 0f64;
                        for (b, blk) in w.row(j).chunks_exact(bb).enumerate() {
                            let mut vals = [0f32; QK];
                            dequantize_block(ty, blk, &mut vals);
                            let (d, c, _) = block_params(ty, blk);
                            for (t, v) in vals.iter().enumerate() {
                                // (v - c) / d is the integer quant.
                                let q = if d != 0.0 { ((v - c) / d).round() } else { 0.0 };
                                want +=
                                    (d * row.d[b]) as f64 * (q * row.q[b * QK + t] as f32) as f64;
                            }
                            want += (c * row.dsum[b]) as f64;
                        }
                        let g = got[i * 33 + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{ty}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn batched_inputs_keep_their_leading_dims_and_backprop_to_x() {
        let w = QMatrix::quantize(QType::Q4_1, &Tensor::randn([6, 64], 8));
        let x = randn_f64(&[2, 3, 64], 9).requires_grad();
        let y = x.qmatmul(&w);
        assert_eq!(y.dims(), &[2, 3, 6]);
        assert_eq!(y.dtype(), DType::F64);
        let gw = randn_f64(&[2, 3, 6], 10);
        y.mul(&gw).sum_all().backward();
        let want = gw.matmul(&w.dequantize().to_dtype(DType::F64));
        let got = x.grad().expect("x has a gradient").to_vec::<f64>();
        for (a, b) in got.iter().zip(want.to_vec::<f64>()) {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn gathered_and_permuted_rows_match_the_dequantised_matrix() {
        let q = QMatrix::quantize(QType::Q4_1, &Tensor::randn([5, 64], 11));
        let full = q.dequantize().to_vec::<f32>();
        let got = q.gather_rows(&[3, 0, 3]).to_vec::<f32>();
        assert_eq!(&got[..64], &full[3 * 64..4 * 64]);
        assert_eq!(&got[64..128], &full[..64]);
        assert_eq!(&got[128..], &full[3 * 64..4 * 64]);
        let p = q
            .permute_rows(&[4, 3, 2, 1, 0])
            .dequantize()
            .to_vec::<f32>();
        assert_eq!(&p[..64], &full[4 * 64..]);
        assert_eq!(&p[4 * 64..], &full[..64]);
    }

    #[test]
    fn bad_sizes_are_errors_or_named_panics() {
        let bytes: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(vec![0u8; 40]);
        let e = QMatrix::from_bytes(QType::Q4_1, 2, 30, bytes.clone(), 0).unwrap_err();
        assert!(
            e.contains("30 columns is not a positive multiple of 32"),
            "{e}"
        );
        let e = QMatrix::from_bytes(QType::Q4_1, 3, 32, bytes.clone(), 0).unwrap_err();
        assert!(
            e.contains("needs 60 bytes at offset 0, the buffer has 40"),
            "{e}"
        );
        let e = QMatrix::from_bytes(QType::Q8_0, usize::MAX, 64, bytes.clone(), 0).unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        assert!(QMatrix::from_bytes(QType::Q4_1, 2, 32, bytes, 0).is_ok());
    }

    #[test]
    #[should_panic(expected = "qmatmul: input [2, 5] does not end in the weight's 32 columns")]
    fn wrong_width_panics_with_the_shapes() {
        let w = QMatrix::quantize(QType::Q8_0, &Tensor::randn([4, 32], 1));
        Tensor::randn([2, 5], 2).qmatmul(&w);
    }

    #[test]
    fn several_matrices_at_once_equal_one_at_a_time() {
        // Row counts that are not multiples of 4 exercise the single-row tails and the split
        // across matrix boundaries; 2 threads and 1 thread give the same numbers.
        for ty in TYPES {
            let ws: Vec<QMatrix> = [(70, 1), (5, 2), (130, 3)]
                .iter()
                .map(|&(n, seed)| QMatrix::quantize(ty, &Tensor::randn([n, 512], seed)))
                .collect();
            let refs: Vec<&QMatrix> = ws.iter().collect();
            for m in [1, 3, 9] {
                let x = Tensor::randn([m, 512], 4);
                for threads in [1, 2] {
                    parallel::set_num_threads(threads);
                    for q8 in [false, true] {
                        let got = x.qmatmul_many(&refs, q8);
                        for (g, w) in got.iter().zip(&ws) {
                            let one = if q8 { x.qmatmul_q8(w) } else { x.qmatmul(w) };
                            assert_eq!(g.dims(), one.dims());
                            let err = max_rel(&g.to_vec::<f32>(), &one.to_f64_vec());
                            assert!(err < 1e-6, "{ty} m={m} q8={q8}: {err}");
                            let tol = if q8 { 2e-2 } else { 1e-5 };
                            let err = max_rel(&g.to_vec::<f32>(), &reference(&x, w));
                            assert!(err < tol, "{ty} m={m} q8={q8}: {err}");
                        }
                    }
                }
                parallel::set_num_threads(0);
            }
        }
    }

    #[test]
    fn a_rows_products_do_not_depend_on_the_rows_beside_it() {
        // Decoding several sequences in one batch must give each exactly what it gets alone.
        for (ty, threads) in TYPES.into_iter().zip([1, 2, 2]) {
            let w = QMatrix::quantize(ty, &Tensor::randn([258, 256], 21));
            parallel::set_num_threads(threads);
            for (m, q8) in [(2, false), (7, false), (2, true), (16, true), (17, true)] {
                let x = Tensor::randn([m, 256], 22);
                let all = if q8 { x.qmatmul_q8(&w) } else { x.qmatmul(&w) };
                let all = all.to_vec::<f32>();
                for i in 0..m {
                    let row = x.narrow(0, i, 1);
                    let alone = if q8 {
                        row.qmatmul_q8(&w)
                    } else {
                        row.qmatmul(&w)
                    };
                    assert_eq!(
                        alone.to_vec::<f32>(),
                        all[i * 258..(i + 1) * 258],
                        "{ty} m={m} q8={q8} row {i}"
                    );
                }
            }
        }
        parallel::set_num_threads(0);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_and_scalar_activation_quantisation_give_the_same_bits() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        // Random blocks, a zero block, a ramp, and a block with amax 127 (so scale 1) whose
        // values are exact halves and one ulp either side of 1.5.
        let mut x = Tensor::randn([8 * QK], 51).to_vec::<f32>();
        x[QK..2 * QK].fill(0.0);
        for (i, v) in x[2 * QK..3 * QK].iter_mut().enumerate() {
            *v = (i as f32 - 15.5) * (1.0 / 127.0) * 4.0;
        }
        x[3 * QK] = 127.0;
        for (i, v) in x[3 * QK + 1..4 * QK].iter_mut().enumerate() {
            *v = [
                -2.5,
                2.5,
                -0.5,
                0.5,
                3.5,
                1.5f32.next_down(),
                1.5f32.next_up(),
            ][i % 7];
        }
        for b in 0..x.len() / QK {
            let xb = &x[b * QK..(b + 1) * QK];
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let want: Vec<i8> = xb.iter().map(|v| (v * id).round() as i8).collect();
            let mut got = [0i8; QK];
            // SAFETY: AVX-512F was detected above.
            let (gd, gs) = unsafe { avx512::quantize_block_q8(xb, &mut got) };
            assert_eq!(got.to_vec(), want, "block {b}");
            assert_eq!(gd.to_bits(), d.to_bits(), "block {b}");
            assert_eq!(gs, want.iter().map(|&q| q as i32).sum::<i32>(), "block {b}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vnni_and_avx2_integer_steps_give_the_same_bits() {
        if !vnni_ok() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        // Extreme quants: a block whose values all round to ±127 (Q8_0 weights of -128 after
        // the sign trick's magnitude, 4-bit quants of 15) against activations at ±127.
        let mut wv = Tensor::randn([8, 256], 31).to_vec::<f32>();
        for (i, v) in wv[..64].iter_mut().enumerate() {
            *v = if i % 3 == 0 { -1.0 } else { 1.0 };
        }
        let mut xv = Tensor::randn([1, 256], 32).to_vec::<f32>();
        for (i, v) in xv[..32].iter_mut().enumerate() {
            *v = if i % 2 == 0 { -4.0 } else { 4.0 };
        }
        let x = quantize_row_q8(&xv);
        for ty in TYPES {
            let w = QMatrix::quantize(ty, &Tensor::from_vec(wv.clone(), [8, 256]));
            let rb = w.row_bytes();
            let r = &w.bytes()[..4 * rb];
            let four = [&r[..rb], &r[rb..2 * rb], &r[2 * rb..3 * rb], &r[3 * rb..]];
            // SAFETY: AVX2, FMA, F16C and the VNNI features are available (`vnni_ok`).
            unsafe {
                assert_eq!(
                    avx2::dot_row_q8(ty, four[0], &x).to_bits(),
                    avx2::dot_row_q8_vnni(ty, four[0], &x).to_bits(),
                    "{ty} one row"
                );
                let bits = |v: [f32; 4]| v.map(f32::to_bits);
                assert_eq!(
                    bits(avx2::dot4_q8(ty, four, &x)),
                    bits(avx2::dot4_q8_vnni(ty, four, &x)),
                    "{ty} four rows"
                );
                let mut unpacked = avx2::Unpacked4::default();
                avx2::unpack4(ty, four, &mut unpacked);
                assert_eq!(
                    bits(avx2::dot4_unpacked_q8(ty, &unpacked, &x)),
                    bits(avx2::dot4_unpacked_q8_vnni(ty, &unpacked, &x)),
                    "{ty} four unpacked rows"
                );
            }
        }
    }

    #[test]
    fn several_matrices_backprop_to_x() {
        let a = QMatrix::quantize(QType::Q4_1, &Tensor::randn([6, 64], 12));
        let b = QMatrix::quantize(QType::Q8_0, &Tensor::randn([3, 64], 13));
        let x = randn_f64(&[1, 64], 14).requires_grad();
        let y = x.qmatmul_many(&[&a, &b], true);
        y[0].sum_all().add(&y[1].sum_all()).backward();
        let ones = |n: usize| Tensor::ones([1, n]).to_dtype(DType::F64);
        let want = ones(6)
            .matmul(&a.dequantize().to_dtype(DType::F64))
            .add(&ones(3).matmul(&b.dequantize().to_dtype(DType::F64)));
        let got = x.grad().expect("x has a gradient").to_vec::<f64>();
        for (g, w) in got.iter().zip(want.to_vec::<f64>()) {
            assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    #[should_panic(
        expected = "qmatmul_many: weights [(4, 32), (4, 64)] do not all have 32 columns"
    )]
    fn several_matrices_of_different_widths_panic() {
        let a = QMatrix::quantize(QType::Q8_0, &Tensor::randn([4, 32], 1));
        let b = QMatrix::quantize(QType::Q8_0, &Tensor::randn([4, 64], 1));
        Tensor::randn([1, 32], 2).qmatmul_many(&[&a, &b], false);
    }
}
