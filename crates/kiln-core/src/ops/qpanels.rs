//! Weight rows interleaved sixteen at a time: the layout of the AVX-512 VNNI kernel for
//! products of block-quantised weights with 8-bit activations ([`Tensor::qmatmul_q8`], and
//! [`Tensor::qmatmul_many`] with `q8`), which decoding spends most of its time in.
//!
//! ggml stores a matrix row after row, so the row-wise kernels multiply one row's block with the
//! activation block and then sum the products across the register: about 70 instructions per
//! block of four rows. In a panel, the quants of 16 consecutive rows are interleaved four at a
//! time: one 512-bit load holds four consecutive quants of each of the 16 rows, and one
//! `vpdpbusd` against four activation quants (broadcast) adds their products into 16 lanes,
//! one per row. No horizontal sums, and the scales of the 16 rows are one vector.
//!
//! Per group of 16 rows and block of 32 columns, a panel holds:
//! - `Q8_0`: 8 × 64 bytes; byte `64·s + 4·r + t` is quant `4s + t` of row `r`, plus 128 (so
//!   that it is the unsigned side of `vpdpbusd`; the `128·Σx` this adds is taken off exactly).
//! - `Q4_0`, `Q4_1`: 4 × 64 bytes; byte `64·s + 4·r + t` holds quant `8s + t` of row `r` in its
//!   low nibble and quant `8s + 4 + t` in its high nibble.
//! - then the 16 rows' f16 scales `d`, and for `Q4_1` their f16 minimums `m`.
//!
//! The integer sums are those of the row-wise kernels; only the order of the f32 steps that
//! scale and add the blocks differs. The panels are a copy of the matrix, made once per matrix
//! ([`QMatrix::prepare_q8`], or on first use; the matrix keeps them), so a model decoded this way holds its quantised
//! weights twice.
//!
//! [`Tensor::qmatmul_q8`]: crate::Tensor::qmatmul_q8
//! [`Tensor::qmatmul_many`]: crate::Tensor::qmatmul_many

use super::qmatmul::{Q8Row, QMatrix, QType, QK};
use crate::parallel::{self, PARALLEL_THRESHOLD};

/// Weight rows per panel.
pub(crate) const GROUP: usize = 16;

/// Activation rows one kernel call takes against a panel (each panel load serves them all).
const MAX_ACTIVATION_ROWS: usize = 4;

/// A matrix's rows as panels of [`GROUP`] (the last one padded with zero rows).
pub(crate) struct Panels {
    ty: QType,
    rows: usize,
    blocks: usize,
    data: Vec<u8>,
}

/// Bytes of the quants of one group and block.
fn quant_bytes(ty: QType) -> usize {
    match ty {
        QType::Q8_0 => GROUP * QK,
        QType::Q4_0 | QType::Q4_1 => GROUP * QK / 2,
    }
}

/// Bytes of one group and block: quants, then scales (and minimums).
fn panel_bytes(ty: QType) -> usize {
    let halves = if ty == QType::Q4_1 { 2 } else { 1 };
    quant_bytes(ty) + halves * GROUP * 2
}

/// Quant `e` (0..32) of a ggml nibble block: low nibbles hold 0..16, high nibbles 16..32.
fn nibble(nibbles: &[u8], e: usize) -> u8 {
    if e < QK / 2 {
        nibbles[e] & 0x0f
    } else {
        nibbles[e - QK / 2] >> 4
    }
}

impl Panels {
    /// Interleaves the rows of `w` (groups of rows spread over the threads).
    pub(crate) fn pack(w: &QMatrix) -> Panels {
        let ty = w.qtype();
        let (rows, cols) = w.dims();
        let blocks = cols / QK;
        let (bb, qb, pb) = (ty.block_bytes(), quant_bytes(ty), panel_bytes(ty));
        let src = w.bytes();
        let pack_group = |group: usize, out: &mut [u8]| {
            for lane in 0..GROUP.min(rows - group * GROUP) {
                let r = group * GROUP + lane;
                for b in 0..blocks {
                    let blk = &src[(r * blocks + b) * bb..][..bb];
                    let dst = &mut out[b * pb..][..pb];
                    match ty {
                        QType::Q8_0 => {
                            for (e, &q) in blk[2..2 + QK].iter().enumerate() {
                                dst[(e / 4) * 64 + lane * 4 + e % 4] = q ^ 0x80;
                            }
                        }
                        QType::Q4_0 | QType::Q4_1 => {
                            let at = if ty == QType::Q4_1 { 4 } else { 2 };
                            let nibbles = &blk[at..at + QK / 2];
                            for s in 0..QK / 8 {
                                for t in 0..4 {
                                    dst[s * 64 + lane * 4 + t] = nibble(nibbles, 8 * s + t)
                                        | nibble(nibbles, 8 * s + 4 + t) << 4;
                                }
                            }
                        }
                    }
                    dst[qb + 2 * lane..qb + 2 * lane + 2].copy_from_slice(&blk[..2]);
                    if ty == QType::Q4_1 {
                        let m = qb + 2 * GROUP + 2 * lane;
                        dst[m..m + 2].copy_from_slice(&blk[2..4]);
                    }
                }
            }
        };
        let group_bytes = blocks * pb;
        let mut data = vec![0u8; rows.div_ceil(GROUP) * group_bytes];
        let par = parallel::num_threads() > 1 && data.len() >= PARALLEL_THRESHOLD;
        parallel::for_chunks(&mut data, group_bytes, par, pack_group);
        Panels {
            ty,
            rows,
            blocks,
            data,
        }
    }

    /// `out[j·m + i] = W[first + j] · xs[i]` for the `out.len() / m` rows from `first`, a
    /// multiple of [`GROUP`] (`m = xs.len()`).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; every row of `xs` must hold the matrix's
    /// width of quants.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(crate) unsafe fn dot_rows(&self, first: usize, xs: &[&Q8Row], out: &mut [f32]) {
        let m = xs.len();
        if m == 0 {
            return;
        }
        let n = out.len() / m;
        debug_assert!(first.is_multiple_of(GROUP) && first + n <= self.rows);
        let pb = panel_bytes(self.ty);
        for (g, start) in (first..first + n).step_by(GROUP).enumerate() {
            let lanes = GROUP.min(first + n - start);
            let panel = self.data.as_ptr().add((start / GROUP) * self.blocks * pb);
            for (c, chunk) in xs.chunks(MAX_ACTIVATION_ROWS).enumerate() {
                let mut dots = [[0f32; GROUP]; MAX_ACTIVATION_ROWS];
                match self.ty {
                    QType::Q8_0 => dots_of::<0>(panel, self.blocks, chunk, &mut dots),
                    QType::Q4_0 => dots_of::<1>(panel, self.blocks, chunk, &mut dots),
                    QType::Q4_1 => dots_of::<2>(panel, self.blocks, chunk, &mut dots),
                }
                for (a, row_dots) in dots.iter().take(chunk.len()).enumerate() {
                    let i = c * MAX_ACTIVATION_ROWS + a;
                    for (lane, &v) in row_dots[..lanes].iter().enumerate() {
                        out[(g * GROUP + lane) * m + i] = v;
                    }
                }
            }
        }
    }
}

/// [`group_dots`] for as many activation rows as `xs` holds (1 to 4).
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dots_of<const TY: u8>(
    panel: *const u8,
    blocks: usize,
    xs: &[&Q8Row],
    dots: &mut [[f32; GROUP]; MAX_ACTIVATION_ROWS],
) {
    match xs.len() {
        1 => group_dots::<1, TY>(panel, blocks, xs, dots),
        2 => group_dots::<2, TY>(panel, blocks, xs, dots),
        3 => group_dots::<3, TY>(panel, blocks, xs, dots),
        _ => group_dots::<4, TY>(panel, blocks, xs, dots),
    }
}

/// The products of one panel (16 weight rows, `blocks` blocks, at `panel`) with `M` activation
/// rows, into `dots[i][lane]`. `TY` is 0 for `Q8_0`, 1 for `Q4_0`, 2 for `Q4_1`.
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn group_dots<const M: usize, const TY: u8>(
    panel: *const u8,
    blocks: usize,
    xs: &[&Q8Row],
    dots: &mut [[f32; GROUP]; MAX_ACTIVATION_ROWS],
) {
    use std::arch::x86_64::*;
    let ty = [QType::Q8_0, QType::Q4_0, QType::Q4_1][TY as usize];
    let (qb, pb) = (quant_bytes(ty), panel_bytes(ty));
    // What the unsigned side adds to each block's integer sum, per unit of `Σ` activation
    // quants: 128 for the offset `Q8_0` quants, 8 for `Q4_0`'s `q − 8`; `Q4_1`'s minimum is
    // applied in f32 instead.
    let offset = match ty {
        QType::Q8_0 => 128,
        QType::Q4_0 => 8,
        QType::Q4_1 => 0,
    };
    let low = _mm512_set1_epi8(0x0f);
    let mut total = [_mm512_setzero_ps(); M];
    for b in 0..blocks {
        let p = panel.add(b * pb);
        let mut sums = [_mm512_setzero_si512(); M];
        // Four activation quants of row `i` from quant `e` of this block, in every lane.
        macro_rules! x4 {
            ($i:expr, $e:expr) => {
                _mm512_set1_epi32(
                    (xs[$i].q.as_ptr().add(b * QK + $e) as *const i32).read_unaligned(),
                )
            };
        }
        if ty == QType::Q8_0 {
            for s in 0..QK / 4 {
                let w = _mm512_loadu_si512(p.add(64 * s) as *const _);
                for (i, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm512_dpbusd_epi32(*sum, w, x4!(i, 4 * s));
                }
            }
        } else {
            for s in 0..QK / 8 {
                let w = _mm512_loadu_si512(p.add(64 * s) as *const _);
                let lo = _mm512_and_si512(w, low);
                let hi = _mm512_and_si512(_mm512_srli_epi32(w, 4), low);
                for (i, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm512_dpbusd_epi32(*sum, lo, x4!(i, 8 * s));
                    *sum = _mm512_dpbusd_epi32(*sum, hi, x4!(i, 8 * s + 4));
                }
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(qb) as *const __m256i));
        let m = if ty == QType::Q4_1 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.add(qb + 2 * GROUP) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        for (i, (sum, tot)) in sums.iter().zip(total.iter_mut()).enumerate() {
            let x = xs[i];
            let exact = if offset != 0 {
                _mm512_sub_epi32(*sum, _mm512_set1_epi32(offset * x.qsum[b]))
            } else {
                *sum
            };
            let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(x.d[b]));
            *tot = _mm512_fmadd_ps(scaled, d, *tot);
            if ty == QType::Q4_1 {
                *tot = _mm512_fmadd_ps(m, _mm512_set1_ps(x.dsum[b]), *tot);
            }
        }
    }
    for (i, tot) in total.iter().enumerate() {
        _mm512_storeu_ps(dots[i].as_mut_ptr(), *tot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::qmatmul::quantize_row_q8;
    use crate::Tensor;

    /// Whether this CPU runs the panel kernel.
    fn supported() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// The integer definition of one 8-bit product, block by block in f64, from ggml's bytes.
    fn reference(ty: QType, w: &QMatrix, r: usize, x: &Q8Row) -> f64 {
        let bb = ty.block_bytes();
        let blocks = w.dims().1 / QK;
        let row = &w.bytes()[r * blocks * bb..(r + 1) * blocks * bb];
        let half = |b: &[u8]| crate::ops::qmatmul::f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        let mut acc = 0f64;
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let xq = &x.q[b * QK..(b + 1) * QK];
            let d = half(&blk[..2]) as f64;
            let sum: i64 = match ty {
                QType::Q8_0 => (0..QK)
                    .map(|e| blk[2 + e] as i8 as i64 * xq[e] as i64)
                    .sum(),
                QType::Q4_0 => (0..QK)
                    .map(|e| (nibble(&blk[2..18], e) as i64 - 8) * xq[e] as i64)
                    .sum(),
                QType::Q4_1 => (0..QK)
                    .map(|e| nibble(&blk[4..20], e) as i64 * xq[e] as i64)
                    .sum(),
            };
            acc += d * x.d[b] as f64 * sum as f64;
            if ty == QType::Q4_1 {
                acc += half(&blk[2..4]) as f64 * x.dsum[b] as f64;
            }
        }
        acc
    }

    #[test]
    fn panel_products_equal_the_integer_definition() {
        if !supported() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        // 40 rows: two full panels and one padded; extreme values in the first blocks (weights
        // at ±max so Q8_0 quants reach -127 and 127, activations at ±max).
        let (rows, cols) = (40, 256);
        let mut wv = Tensor::randn([rows, cols], 41).to_vec::<f32>();
        for (i, v) in wv[..2 * QK].iter_mut().enumerate() {
            *v = if i % 3 == 0 { -1.0 } else { 1.0 };
        }
        let xv = Tensor::randn([5, cols], 42).to_vec::<f32>();
        let mut xs: Vec<Q8Row> = xv.chunks_exact(cols).map(quantize_row_q8).collect();
        xs[0] = {
            let mut v = xv[..cols].to_vec();
            for (i, v) in v[..QK].iter_mut().enumerate() {
                *v = if i % 2 == 0 { -4.0 } else { 4.0 };
            }
            quantize_row_q8(&v)
        };
        for ty in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
            let w = QMatrix::quantize(ty, &Tensor::from_vec(wv.clone(), [rows, cols]));
            let panels = Panels::pack(&w);
            // Every count of activation rows a call takes (1..=4, and 5 = 4 + 1), and ranges
            // that start at a later panel or end inside one.
            for m in 1..=5 {
                let x: Vec<&Q8Row> = xs[..m].iter().collect();
                for (first, n) in [(0, rows), (16, 24), (0, 20), (32, 8)] {
                    let mut out = vec![f32::NAN; n * m];
                    // SAFETY: `supported` checked the features; the rows are `cols` wide.
                    unsafe { panels.dot_rows(first, &x, &mut out) };
                    for j in 0..n {
                        for (i, row) in x.iter().enumerate() {
                            let want = reference(ty, &w, first + j, row);
                            let got = out[j * m + i] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{ty} m={m} row {}: {got} vs {want}",
                                first + j
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packing_over_threads_gives_the_same_panels() {
        let w = QMatrix::quantize(QType::Q4_1, &Tensor::randn([300, 1024], 43));
        let mut packed = Vec::new();
        for threads in [1, 2] {
            parallel::set_num_threads(threads);
            packed.push(Panels::pack(&w).data);
        }
        parallel::set_num_threads(0);
        assert!(packed[0].len() >= PARALLEL_THRESHOLD);
        assert!(packed[0] == packed[1]);
    }
}
