//! Inverted dropout: in training, each element is kept with probability `1 - p` and scaled by
//! `1 / (1 - p)`, else multiplied by 0 (as in PyTorch); at evaluation it is the identity.
//!
//! The mask is one bit per element. It is drawn in fixed blocks of `BLOCK` elements, each
//! from its own four generators (taking turns by word, so their updates overlap) seeded from
//! one draw of the caller's [`Rng`] and the block number: the mask depends only on the seed —
//! not on the thread count or machine — while blocks are drawn in parallel. Each `u64` draw
//! yields two 32-bit uniforms. With AVX2 the four generators step side by side in the lanes of
//! one register, and with AVX-512 an f32 mask is applied sixteen elements per multiply; both
//! give the same bits as the scalar loops (tested).

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::{DType, Element, Float};
use crate::layout::Layout;
use crate::parallel::{num_threads, PARALLEL_THRESHOLD};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::vmath::{isa, Isa};
use std::sync::Arc;

/// Elements per independently seeded block of the mask (a multiple of 64).
const BLOCK: usize = 1 << 14;
const WORDS_PER_BLOCK: usize = BLOCK / 64;
/// Generators per block; word `w` of a block comes from generator `w % LANES`.
const LANES: usize = 4;

/// SplitMix64's output function: decorrelates block seeds.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The keep mask of `n` elements: bit `i % 64` of word `i / 64` is set when element `i` is
/// kept, which happens when its 32-bit uniform draw is below `threshold` (of 2^32).
fn draw_mask(n: usize, threshold: u64, seed: u64) -> Buffer<u64> {
    draw_mask_on(isa(), n, threshold, seed)
}

/// [`draw_mask`] on path `path` (every path gives the same bits).
fn draw_mask_on(path: Isa, n: usize, threshold: u64, seed: u64) -> Buffer<u64> {
    let mut bits = Buffer::<u64>::uninit(n.div_ceil(64));
    let fill_block = |b: usize, words: &mut [u64]| {
        // Independent generators for consecutive words, kept in separate locals (registers)
        // so their updates overlap in the CPU.
        let lane =
            |l: usize| Rng::new(seed ^ mix64(((b * LANES + l) as u64) ^ 0xD1B5_4A32_D192_ED03));
        let (mut r0, mut r1, mut r2, mut r3) = (lane(0), lane(1), lane(2), lane(3));
        #[cfg(target_arch = "x86_64")]
        if threshold < 1 << 32 && path >= Isa::Avx2 && path.is_available() {
            // SAFETY: AVX2 is available (checked just above).
            unsafe { x86::fill_words_avx2([r0, r1, r2, r3], threshold as u32, words) };
            return;
        }
        let bits_of = |v: u64, k: u32| {
            let lo = ((v & 0xFFFF_FFFF) < threshold) as u64;
            let hi = ((v >> 32) < threshold) as u64;
            (lo | (hi << 1)) << (2 * k)
        };
        for group in words.chunks_mut(LANES) {
            let mut acc = [0u64; LANES];
            for k in 0..32 {
                acc[0] |= bits_of(r0.next_u64(), k);
                acc[1] |= bits_of(r1.next_u64(), k);
                acc[2] |= bits_of(r2.next_u64(), k);
                acc[3] |= bits_of(r3.next_u64(), k);
            }
            group.copy_from_slice(&acc[..group.len()]);
        }
    };
    let par = n >= PARALLEL_THRESHOLD && num_threads() > 1;
    crate::parallel::for_chunks(&mut bits, WORDS_PER_BLOCK, par, fill_block);
    bits
}

/// `out[i] = x[i] * m[i]` with `m[i]` = `scale` where the mask keeps element `i`, else 0
/// (`x` contiguous): eight multipliers at a time from a table indexed by a byte of the mask.
pub(crate) fn apply_mask<T: Float>(x: &[T], bits: &[u64], scale: T, out: &mut [T]) {
    apply_mask_on(isa(), x, bits, scale, out)
}

/// [`apply_mask`] on path `path` (every path gives the same values).
fn apply_mask_on<T: Float>(path: Isa, x: &[T], bits: &[u64], scale: T, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == DType::F32 && path == Isa::Avx512 && path.is_available() {
        let (x, out, scale) = (
            // SAFETY: `T` is f32 (checked just above).
            unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) },
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) },
            scale.to_f64() as f32,
        );
        let run = |w0: usize, x: &[f32], out: &mut [f32]| {
            // SAFETY: AVX-512F is available (checked above).
            unsafe { x86::apply_mask_avx512(x, &bits[w0..], scale, out) }
        };
        by_blocks(x, out, run);
        return;
    }
    let zero = <T as num_traits::Zero>::zero();
    let table: [[T; 8]; 256] = std::array::from_fn(|byte| {
        std::array::from_fn(|k| if (byte >> k) & 1 != 0 { scale } else { zero })
    });
    let run = |w0: usize, x: &[T], out: &mut [T]| {
        let full = x.len() / 8;
        let bytes = bits[w0..].iter().flat_map(|w| w.to_le_bytes());
        for ((o, x), byte) in out.chunks_exact_mut(8).zip(x.chunks_exact(8)).zip(bytes) {
            let m = &table[byte as usize];
            for k in 0..8 {
                o[k] = x[k] * m[k];
            }
        }
        let (o, x) = (&mut out[full * 8..], &x[full * 8..]);
        if !x.is_empty() {
            let word = bits[w0 + full / 8] >> (8 * (full % 8));
            for (k, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                *o = x * if (word >> k) & 1 != 0 { scale } else { zero };
            }
        }
    };
    by_blocks(x, out, run);
}

/// Runs `run(first_word, x_part, out_part)` over `x` and `out`: in parallel by mask blocks when
/// `x` is large, else once over the whole.
fn by_blocks<T: Send + Sync>(x: &[T], out: &mut [T], run: impl Fn(usize, &[T], &mut [T]) + Sync) {
    if x.len() >= PARALLEL_THRESHOLD && num_threads() > 1 {
        crate::parallel::for_chunks(out, BLOCK, true, |b, o| {
            run(b * WORDS_PER_BLOCK, &x[b * BLOCK..b * BLOCK + o.len()], o)
        });
    } else {
        run(0, x, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::rng::Rng;
    use std::arch::x86_64::*;

    /// `x << N | x >> (64 - N)` in each 64-bit lane.
    #[inline(always)]
    fn rotl<const N: i32, const M: i32>(x: __m256i) -> __m256i {
        // SAFETY (the intrinsics): only called from `fill_words_avx2`, which enables AVX2.
        unsafe { _mm256_or_si256(_mm256_slli_epi64::<N>(x), _mm256_srli_epi64::<M>(x)) }
    }

    /// [`super::draw_mask`]'s words for one block, with its four xoshiro256++ generators
    /// stepped side by side in the four 64-bit lanes of AVX2 registers: the same bits as the
    /// scalar loop (word `w` from generator `w % 4`; a threshold below 2^32).
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fill_words_avx2(lanes: [Rng; 4], threshold: u32, words: &mut [u64]) {
        let states = lanes.map(|r| r.state());
        let state = |i: usize| {
            _mm256_setr_epi64x(
                states[0][i] as i64,
                states[1][i] as i64,
                states[2][i] as i64,
                states[3][i] as i64,
            )
        };
        let (mut s0, mut s1, mut s2, mut s3) = (state(0), state(1), state(2), state(3));
        // Unsigned `v < threshold` on 32-bit halves, as a signed compare with the sign bits
        // flipped.
        let flip = _mm256_set1_epi32(i32::MIN);
        let limit = _mm256_set1_epi32((threshold ^ 0x8000_0000) as i32);
        let (one, two) = (_mm256_set1_epi64x(1), _mm256_set1_epi64x(2));
        for group in words.chunks_mut(4) {
            let mut acc = _mm256_setzero_si256();
            for k in 0..32 {
                let v = _mm256_add_epi64(rotl::<23, 41>(_mm256_add_epi64(s0, s3)), s0);
                let t = _mm256_slli_epi64::<17>(s1);
                s2 = _mm256_xor_si256(s2, s0);
                s3 = _mm256_xor_si256(s3, s1);
                s1 = _mm256_xor_si256(s1, s2);
                s0 = _mm256_xor_si256(s0, s3);
                s2 = _mm256_xor_si256(s2, t);
                s3 = rotl::<45, 19>(s3);
                // All-ones 32-bit halves where kept: bit 0 of a lane from its low half, bit 1
                // from its high half.
                let keep = _mm256_cmpgt_epi32(limit, _mm256_xor_si256(v, flip));
                let pair = _mm256_or_si256(
                    _mm256_and_si256(keep, one),
                    _mm256_and_si256(_mm256_srli_epi64::<31>(keep), two),
                );
                acc = _mm256_or_si256(acc, _mm256_sll_epi64(pair, _mm_cvtsi32_si128(2 * k)));
            }
            let mut out = [0u64; 4];
            // SAFETY: `out` holds four u64.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, acc) };
            group.copy_from_slice(&out[..group.len()]);
        }
    }

    /// [`super::apply_mask`] for f32: sixteen elements per 16-bit piece of the mask, each
    /// multiplied by `scale` or 0 (so that a dropped inf or NaN gives NaN, as on every path).
    ///
    /// # Safety
    /// AVX-512F must be available; `bits` covers `x`, and `out` is as long as `x`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn apply_mask_avx512(x: &[f32], bits: &[u64], scale: f32, out: &mut [f32]) {
        let scale_v = _mm512_set1_ps(scale);
        let full = x.len() / 16;
        for i in 0..full {
            let m = (bits[i / 4] >> (16 * (i % 4))) as __mmask16;
            // SAFETY: elements 16·i .. 16·i + 16 are inside `x` and `out`.
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(16 * i));
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(16 * i),
                    _mm512_mul_ps(v, _mm512_maskz_mov_ps(m, scale_v)),
                );
            }
        }
        for i in 16 * full..x.len() {
            let keep = (bits[i / 64] >> (i % 64)) & 1 != 0;
            out[i] = x[i] * if keep { scale } else { 0.0 };
        }
    }
}

/// The masked, scaled copy of `t` (any layout) as storage of its float dtype.
fn masked(t: &Tensor, bits: &[u64], scale: f64, op: &str) -> crate::Storage {
    dispatch_float!(t.dtype(), op, |T| {
        let n = t.elem_count();
        let mut out = Buffer::<T>::uninit(n);
        let guard = t.storage();
        let src = crate::typed_slice!(guard, T, op);
        let scale = <T as Element>::from_f64(scale);
        match t.layout().contiguous_range() {
            Some(r) => apply_mask(&src[r], bits, scale, &mut out),
            None => {
                let zero = <T as num_traits::Zero>::zero();
                for (i, (o, off)) in out.iter_mut().zip(t.layout().offsets()).enumerate() {
                    let keep = (bits[i / 64] >> (i % 64)) & 1 != 0;
                    *o = src[off] * if keep { scale } else { zero };
                }
            }
        }
        <T as Element>::into_storage(out)
    })
}

/// The keep mask of `n` elements for drop probability `p` (one draw of `rng`) and the scale
/// of kept elements, `1 / (1 - p)` (0 when `p` is 1).
pub(crate) fn keep_mask(n: usize, p: f64, rng: &mut Rng) -> (Buffer<u64>, f64) {
    let seed = rng.next_u64();
    if p == 1.0 {
        (Buffer::filled(n.div_ceil(64), 0u64), 0.0)
    } else {
        // Keep when a uniform 32-bit draw is below (1 - p) * 2^32.
        let threshold = ((1.0 - p) * 4_294_967_296.0).round() as u64;
        (draw_mask(n, threshold, seed), 1.0 / (1.0 - p))
    }
}

struct DropoutBackward {
    bits: Arc<Buffer<u64>>,
    scale: f64,
}

impl GradFn for DropoutBackward {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn reads_input(&self, _index: usize) -> bool {
        false
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, _inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let storage = masked(g, &self.bits, self.scale, "dropout_backward");
        vec![Some(Tensor::from_storage(
            storage,
            Layout::contiguous(g.shape().clone()),
        ))]
    }
}

impl Tensor {
    /// Inverted dropout with drop probability `p` (mask drawn from `rng`); identity unless `train`.
    pub fn dropout(&self, p: f64, train: bool, rng: &mut Rng) -> Tensor {
        assert!(
            (0.0..=1.0).contains(&p),
            "dropout: p must be in [0, 1], got {p} (input shape {})",
            self.shape()
        );
        assert!(
            self.dtype().is_float(),
            "dropout: expected a float tensor (f32 or f64), got {} (shape {})",
            self.dtype(),
            self.shape()
        );
        if !train || p == 0.0 {
            return self.clone();
        }
        let (bits, scale) = keep_mask(self.elem_count(), p, rng);
        let storage = masked(self, &bits, scale, "dropout");
        let bits = Arc::new(bits);
        Tensor::op_result(storage, self.shape().clone(), &[self], move || {
            Box::new(DropoutBackward { bits, scale })
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::{Rng, Tensor};

    #[test]
    fn every_path_draws_and_applies_the_same_mask() {
        use super::{apply_mask_on, draw_mask_on};
        use crate::vmath::{available_isas, Isa};
        // Partial blocks and partial groups of four words; thresholds for p = 0.1, 0.5, ~1.
        for n in [1, 63, 64, 200, 16_384 + 4 * 64 + 70, 3 * 16_384] {
            for threshold in [3_865_470_566u64, 1 << 31, 1, (1 << 32) - 1] {
                let scalar = draw_mask_on(Isa::Scalar, n, threshold, 42);
                let mut x: Vec<f32> = (0..n).map(|i| i as f32 - 7.5).collect();
                x[n / 2] = f32::INFINITY;
                let mut want = vec![0f32; n];
                apply_mask_on(Isa::Scalar, &x, &scalar, 1.25, &mut want);
                for path in available_isas() {
                    let bits = draw_mask_on(path, n, threshold, 42);
                    assert_eq!(
                        &bits[..],
                        &scalar[..],
                        "{path:?} n={n} threshold={threshold}"
                    );
                    let mut got = vec![1f32; n];
                    apply_mask_on(path, &x, &bits, 1.25, &mut got);
                    let bits_of = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits_of(&got), bits_of(&want), "{path:?} n={n}");
                }
            }
        }
    }

    #[test]
    fn keeps_about_one_minus_p_and_scales_kept_values() {
        for p in [0.1, 0.5, 0.8] {
            let x = Tensor::randn([200_000], 1).add_scalar(10.0); // no zeros in x
            let y = x.dropout(p, true, &mut Rng::new(7));
            let (xv, yv) = (x.to_vec::<f32>(), y.to_vec::<f32>());
            let kept = yv.iter().filter(|&&v| v != 0.0).count() as f64 / xv.len() as f64;
            // Binomial std is below 0.0012 here: 0.006 is five of them.
            assert!((kept - (1.0 - p)).abs() < 0.006, "p {p}: kept {kept}");
            for (&a, &b) in xv.iter().zip(&yv) {
                if b != 0.0 {
                    let want = a as f64 / (1.0 - p);
                    assert!(
                        (b as f64 - want).abs() <= 1e-6 * want.abs(),
                        "{b} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn mask_is_reproducible_and_independent_of_size() {
        let x = Tensor::ones([300_000]);
        let a = x.dropout(0.5, true, &mut Rng::new(3)).to_vec::<f32>();
        let b = x.dropout(0.5, true, &mut Rng::new(3)).to_vec::<f32>();
        assert_eq!(a, b);
        // The first elements of a large mask (drawn in parallel blocks) equal a small mask.
        let small = Tensor::ones([1000]).dropout(0.5, true, &mut Rng::new(3));
        assert_eq!(small.to_vec::<f32>(), a[..1000]);
        // Another seed, and the next call on the same generator, give other masks.
        assert_ne!(x.dropout(0.5, true, &mut Rng::new(4)).to_vec::<f32>(), a);
        let mut rng = Rng::new(3);
        let first = x.dropout(0.5, true, &mut rng).to_vec::<f32>();
        assert_eq!(first, a);
        assert_ne!(x.dropout(0.5, true, &mut rng).to_vec::<f32>(), a);
        // Blocks are not copies of each other.
        assert_ne!(a[..16384], a[16384..32768]);
    }

    #[test]
    fn identity_in_eval_or_for_p_zero_and_zeros_for_p_one() {
        let x = randn_f64(&[4, 5], 2);
        let mut rng = Rng::new(1);
        assert_eq!(
            x.dropout(0.7, false, &mut rng).to_vec::<f64>(),
            x.to_vec::<f64>()
        );
        assert_eq!(
            x.dropout(0.0, true, &mut rng).to_vec::<f64>(),
            x.to_vec::<f64>()
        );
        assert!(x
            .dropout(1.0, true, &mut rng)
            .to_vec::<f64>()
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn non_contiguous_input_uses_the_same_mask_as_its_copy() {
        let x = randn_f64(&[30, 40], 3).t();
        let a = x.dropout(0.4, true, &mut Rng::new(9));
        let b = x.contiguous().dropout(0.4, true, &mut Rng::new(9));
        assert_eq!(a.to_vec::<f64>(), b.to_vec::<f64>());
    }

    #[test]
    fn gradient_is_mask_times_scale() {
        let x = randn_f64(&[1000], 4).requires_grad();
        let y = x.dropout(0.25, true, &mut Rng::new(5));
        y.sum_all().backward();
        let (xv, yv) = (x.to_vec::<f64>(), y.to_vec::<f64>());
        let g = x.grad().unwrap().to_vec::<f64>();
        for i in 0..xv.len() {
            let want = if yv[i] != 0.0 { 1.0 / 0.75 } else { 0.0 };
            assert!((g[i] - want).abs() < 1e-12);
        }
        // p = 1: zero gradient, still part of the graph.
        let x1 = randn_f64(&[10], 6).requires_grad();
        x1.dropout(1.0, true, &mut Rng::new(1)).sum_all().backward();
        assert!(x1.grad().unwrap().to_vec::<f64>().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn gradcheck_dropout() {
        let x = randn_f64(&[6, 7], 8).requires_grad();
        let xs = std::slice::from_ref(&x);
        gradcheck(|x| x[0].dropout(0.3, true, &mut Rng::new(11)), xs).unwrap();
        gradcheck(|x| x[0].t().dropout(0.6, true, &mut Rng::new(12)), xs).unwrap();
        gradcheck(
            |x| x[0].narrow(1, 2, 3).dropout(0.5, true, &mut Rng::new(13)),
            xs,
        )
        .unwrap();
    }

    #[test]
    #[should_panic(expected = "dropout: p must be in [0, 1], got 1.5 (input shape [3])")]
    fn p_out_of_range_panics() {
        let _ = Tensor::zeros([3]).dropout(1.5, true, &mut Rng::new(0));
    }

    #[test]
    #[should_panic(expected = "dropout: p must be in [0, 1], got NaN")]
    fn nan_p_panics() {
        let _ = Tensor::zeros([3]).dropout(f64::NAN, false, &mut Rng::new(0));
    }
}
