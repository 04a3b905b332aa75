//! Fused single-query attention over a key/value cache, for autoregressive decoding: for every
//! query head, the scaled scores against the cached keys, their softmax and the weighted sum
//! of the cached values, written straight into `[batch, 1, heads·head_dim]`. Grouped-query
//! attention (several query heads per key/value head) is read from the cache as it is stored,
//! without repeating or copying keys. Inference only: it records no graph.

use crate::alloc::Buffer;
use crate::autograd::is_grad_enabled;
use crate::dtype::Float;
use crate::parallel;
use crate::{dispatch_float, Element, Shape, Tensor};

/// The vector primitives the kernel needs, with an AVX2 path for f32.
trait Lanes: Float {
    /// `Σ a[i]·b[i]`.
    fn dot(a: &[Self], b: &[Self]) -> Self;
    /// `y[i] += a·x[i]`.
    fn axpy(a: Self, x: &[Self], y: &mut [Self]);
    /// `v[i] = exp(v[i] - max)`, returning the sum.
    fn exp_shifted(v: &mut [Self], max: Self) -> Self;
    /// One head whole, where a kernel for its width exists: `o = softmax(scale·K·q)·V` over
    /// the `scores.len()` rows of `k` and `v` (`o.len()` wide), with `scores` as scratch.
    /// Returns false (having done nothing) where there is no such kernel.
    fn attend_head(
        _q: &[Self],
        _k: &[Self],
        _v: &[Self],
        _scale: Self,
        _scores: &mut [Self],
        _o: &mut [Self],
    ) -> bool {
        false
    }
}

fn dot_scalar<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..4 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn axpy_scalar<T: Float>(a: T, x: &[T], y: &mut [T]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

impl Lanes for f64 {
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        dot_scalar(a, b)
    }
    fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
        axpy_scalar(a, x, y)
    }
    fn exp_shifted(v: &mut [f64], max: f64) -> f64 {
        let mut sum = 0.0;
        for s in v.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        sum
    }
}

impl Lanes for f32 {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if crate::vmath::isa() >= crate::vmath::Isa::Avx2 {
            // SAFETY: AVX2 and FMA are available (checked by `isa`).
            return unsafe { avx2::dot(a, b) };
        }
        dot_scalar(a, b)
    }
    fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::vmath::isa() >= crate::vmath::Isa::Avx2 {
            // SAFETY: AVX2 and FMA are available (checked by `isa`).
            return unsafe { avx2::axpy(a, x, y) };
        }
        axpy_scalar(a, x, y)
    }
    fn exp_shifted(v: &mut [f32], max: f32) -> f32 {
        for s in v.iter_mut() {
            *s -= max;
        }
        // The vectorised exp writes into a second slice: go through a stack block.
        let mut tmp = [0f32; 256];
        let mut sum = 0f32;
        for c in v.chunks_mut(256) {
            let t = &mut tmp[..c.len()];
            crate::vmath::exp(c, t);
            c.copy_from_slice(t);
            sum += c.iter().sum::<f32>();
        }
        sum
    }
    fn attend_head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if crate::vmath::isa() == crate::vmath::Isa::Avx512 && o.len().is_multiple_of(16) {
            let (len, hd) = (scores.len(), o.len());
            assert!(q.len() == hd && k.len() >= len * hd && v.len() >= len * hd);
            // SAFETY: AVX-512F is available (checked by `isa`); the sizes were checked above.
            unsafe {
                match hd / 16 {
                    1 => avx512::attend_head::<1>(q, k, v, scale, scores, o),
                    2 => avx512::attend_head::<2>(q, k, v, scale, scores, o),
                    3 => avx512::attend_head::<3>(q, k, v, scale, scores, o),
                    4 => avx512::attend_head::<4>(q, k, v, scale, scores, o),
                    5 => avx512::attend_head::<5>(q, k, v, scale, scores, o),
                    6 => avx512::attend_head::<6>(q, k, v, scale, scores, o),
                    7 => avx512::attend_head::<7>(q, k, v, scale, scores, o),
                    8 => avx512::attend_head::<8>(q, k, v, scale, scores, o),
                    _ => return false,
                }
            }
            return true;
        }
        let _ = (q, k, v, scale, scores, o);
        false
    }
}

/// One head with the query and the running output in registers (`16·C` wide), so that each
/// cached key and value row is one pass of `C` loads and fused multiply-adds.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// See [`Lanes::attend_head`]; the caller checked the sizes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_head<const C: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        let hd = 16 * C;
        let mut qv = [_mm512_setzero_ps(); C];
        for (c, r) in qv.iter_mut().enumerate() {
            *r = _mm512_loadu_ps(q.as_ptr().add(16 * c));
        }
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            let row = k.as_ptr().add(j * hd);
            let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row));
            for (c, &qc) in qv.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(qc, _mm512_loadu_ps(row.add(16 * c)), acc);
            }
            *s = _mm512_reduce_add_ps(acc) * scale;
            max = max.max(*s);
        }
        let inv = 1.0 / f32::exp_shifted(scores, max);
        // Two sets of sums (even and odd rows) halve the chain of dependent additions.
        let mut sums = [[_mm512_setzero_ps(); C]; 2];
        for (j, &p) in scores.iter().enumerate() {
            let (row, p) = (v.as_ptr().add(j * hd), _mm512_set1_ps(p));
            for (c, acc) in sums[j % 2].iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(p, _mm512_loadu_ps(row.add(16 * c)), *acc);
            }
        }
        let [even, odd] = sums;
        for (c, (even, odd)) in even.iter().zip(&odd).enumerate() {
            let total = _mm512_add_ps(*even, *odd);
            _mm512_storeu_ps(
                o.as_mut_ptr().add(16 * c),
                _mm512_mul_ps(total, _mm512_set1_ps(inv)),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let v = _mm256_add_ps(s0, s1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let mut r = _mm_cvtss_f32(s);
        while i < n {
            r += a[i] * b[i];
            i += 1;
        }
        r
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
            i += 8;
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
        }
    }
}

/// Heads `first..first + out.len() / hd` of batch rows laid out one after the other.
#[allow(clippy::too_many_arguments)]
fn heads_into<T: Lanes>(
    q: &[T],
    k: &[T],
    v: &[T],
    (h, kv, cap, hd, len): (usize, usize, usize, usize, usize),
    first: usize,
    out: &mut [T],
) {
    let g = h / kv;
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let mut scores = vec![T::zero(); len];
    for (i, o) in out.chunks_exact_mut(hd).enumerate() {
        let bh = first + i;
        let (b, head) = (bh / h, bh % h);
        let base = (b * kv + head / g) * cap * hd;
        let qh = &q[bh * hd..(bh + 1) * hd];
        let rows = base..base + len * hd;
        if T::attend_head(qh, &k[rows.clone()], &v[rows], scale, &mut scores, o) {
            continue;
        }
        let mut max = T::neg_infinity();
        for (j, s) in scores.iter_mut().enumerate() {
            *s = T::dot(qh, &k[base + j * hd..base + (j + 1) * hd]) * scale;
            max = max.max(*s);
        }
        let sum = T::exp_shifted(&mut scores, max);
        let inv = T::one() / sum;
        o.fill(T::zero());
        for (j, &p) in scores.iter().enumerate() {
            T::axpy(p * inv, &v[base + j * hd..base + (j + 1) * hd], o);
        }
    }
}

impl Tensor {
    /// Attention of one new position per batch row over the first `len` cached positions:
    /// `self` is the query `[batch, 1, heads·head_dim]`, `k_cache` / `v_cache` the cache
    /// `[batch, kv_heads, capacity, head_dim]` (contiguous; `heads` a multiple of `kv_heads`),
    /// scaled by `1/√head_dim`, no mask; the result is `[batch, 1, heads·head_dim]`. Equal to
    /// `scaled_dot_product_attention` on the grouped heads; inference only (panics when a
    /// gradient would be recorded).
    pub fn decode_attention(&self, k_cache: &Tensor, v_cache: &Tensor, len: usize) -> Tensor {
        let op = "decode_attention";
        assert!(
            k_cache.rank() == 4 && k_cache.dims() == v_cache.dims(),
            "{op}: k cache {} and v cache {} must be equal [batch, kv_heads, capacity, head_dim]",
            k_cache.shape(),
            v_cache.shape()
        );
        let (b, kv, cap, hd) = (
            k_cache.dim(0),
            k_cache.dim(1),
            k_cache.dim(2),
            k_cache.dim(3),
        );
        assert!(
            self.rank() == 3
                && self.dim(0) == b
                && self.dim(1) == 1
                && hd > 0
                && kv > 0
                && self.dim(2).is_multiple_of(hd * kv),
            "{op}: query {} must be [batch = {b}, 1, heads·{hd}] with heads a multiple of {kv} (cache {})",
            self.shape(),
            k_cache.shape()
        );
        assert!(
            len >= 1 && len <= cap,
            "{op}: {len} cached positions, the cache {} holds 1..={cap}",
            k_cache.shape()
        );
        assert!(
            self.dtype() == k_cache.dtype() && self.dtype() == v_cache.dtype(),
            "{op}: dtypes differ (query {}, k cache {}, v cache {})",
            self.dtype(),
            k_cache.dtype(),
            v_cache.dtype()
        );
        assert!(
            k_cache.is_contiguous() && v_cache.is_contiguous(),
            "{op}: the caches {} must be contiguous",
            k_cache.shape()
        );
        assert!(
            !(is_grad_enabled()
                && (self.tracks_grad() || k_cache.tracks_grad() || v_cache.tracks_grad())),
            "{op}: not differentiable; call it under no_grad (query {} tracks gradients)",
            self.shape()
        );
        let h = self.dim(2) / hd;
        let q = self.contiguous();
        let dims = (h, kv, cap, hd, len);
        let storage = dispatch_float!(self.dtype(), op, |T| {
            let (qs, ks, vs) = (q.storage(), k_cache.storage(), v_cache.storage());
            let qd =
                &crate::typed_slice!(qs, T, op)[q.layout().contiguous_range().expect("contiguous")];
            let kd = &crate::typed_slice!(ks, T, op)
                [k_cache.layout().contiguous_range().expect("contiguous")];
            let vd = &crate::typed_slice!(vs, T, op)
                [v_cache.layout().contiguous_range().expect("contiguous")];
            let mut out = Buffer::<T>::uninit(b * h * hd);
            // Each part holds whole heads. Reading the cache is bound by memory bandwidth,
            // which a second core about doubles: split from about 30 cached positions on
            // (SmolLM2's 9 heads of 64), where the decode team's dispatch costs little.
            parallel::for_each_split(&mut out, hd, b * h * hd * len * 4, |start, part| {
                heads_into(qd, kd, vd, dims, start / hd, part)
            });
            <T as Element>::into_storage(out)
        });
        Tensor::from_storage(
            storage,
            crate::Layout::contiguous(Shape::from([b, 1, h * hd])),
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    /// The unfused definition: per head, softmax(q·Kᵀ/√d)·V over the first `len` positions.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, len: usize) -> Tensor {
        let (b, kv, hd) = (k.dim(0), k.dim(1), k.dim(3));
        let h = q.dim(2) / hd;
        let g = h / kv;
        let q = q.reshape([b, kv, g, hd]);
        let (k, v) = (k.narrow(2, 0, len), v.narrow(2, 0, len));
        let scores = q
            .matmul(&k.transpose(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt());
        scores.softmax(-1).matmul(&v).reshape([b, 1, h * hd])
    }

    #[test]
    fn equals_the_unfused_attention_for_f32_and_f64_and_grouped_heads() {
        for dtype in [DType::F32, DType::F64] {
            // Head widths with a vector kernel (16·C: 64, 32, 128) and without (8, 12).
            for (b, h, kv, hd) in [
                (1, 9, 3, 64),
                (2, 4, 2, 32),
                (1, 2, 1, 128),
                (2, 4, 4, 8),
                (1, 6, 1, 12),
            ] {
                let cap = 40;
                let k = Tensor::randn([b, kv, cap, hd], 1).to_dtype(dtype);
                let v = Tensor::randn([b, kv, cap, hd], 2).to_dtype(dtype);
                let q = Tensor::randn([b, 1, h * hd], 3).to_dtype(dtype);
                for len in [1, 7, 40] {
                    let got = q.decode_attention(&k, &v, len);
                    assert_eq!(got.dims(), &[b, 1, h * hd]);
                    assert_eq!(got.dtype(), dtype);
                    let want = reference(&q, &k, &v, len).to_f64_vec();
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    for (a, w) in got.to_f64_vec().iter().zip(&want) {
                        assert!((a - w).abs() <= tol * w.abs().max(1.0), "{a} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn long_caches_split_over_threads_give_the_same_result() {
        let (b, h, kv, hd, cap) = (1, 8, 2, 64, 2048);
        let k = Tensor::randn([b, kv, cap, hd], 4);
        let v = Tensor::randn([b, kv, cap, hd], 5);
        let q = Tensor::randn([b, 1, h * hd], 6);
        let want = reference(&q, &k, &v, cap).to_vec::<f32>();
        for threads in [1, 2] {
            crate::parallel::set_num_threads(threads);
            let got = q.decode_attention(&k, &v, cap).to_vec::<f32>();
            for (a, w) in got.iter().zip(&want) {
                assert!((a - w).abs() <= 1e-5 * w.abs().max(1.0), "{a} vs {w}");
            }
        }
        crate::parallel::set_num_threads(0);
    }

    #[test]
    #[should_panic(
        expected = "decode_attention: 5 cached positions, the cache [1, 1, 4, 8] holds 1..=4"
    )]
    fn too_many_positions_panic_with_the_shape() {
        let k = Tensor::zeros([1, 1, 4, 8]);
        Tensor::zeros([1, 1, 8]).decode_attention(&k, &k, 5);
    }

    #[test]
    #[should_panic(expected = "decode_attention: not differentiable")]
    fn recording_a_gradient_panics() {
        let k = Tensor::zeros([1, 1, 4, 8]);
        let q = Tensor::zeros([1, 1, 8]).requires_grad();
        q.decode_attention(&k, &k, 2);
    }
}
