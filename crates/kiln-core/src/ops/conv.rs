//! 2-D and 1-D convolution (cross-correlation, as `torch.nn.functional.conv2d` / `conv1d`) on
//! NCHW / NCL layouts with zero padding, stride, dilation and groups, and its backward rule.
//!
//! Forward: per (batch item, group), im2col into a pooled column buffer then one gemm
//! `W_g [C_out/g, C_in/g·kH·kW] · col [C_in/g·kH·kW, H_out·W_out]`; a 1×1 kernel with stride 1
//! and no padding uses the input itself as the column matrix; depthwise convolutions
//! (`groups == C_in == C_out`) use a direct kernel. Backward (one rule for input, weight and
//! bias, computing only what is needed): `grad_input = col2im(W_gᵀ · grad_out)`,
//! `grad_weight = Σ_batch grad_out · colᵀ`, `grad_bias = Σ_{N,H,W} grad_out`.
//!
//! Threads: above [`CONV_PARALLEL_WORK`] multiply-adds the batch items are split over threads
//! (each with its own column buffers and weight-gradient partial sums, gemm on one thread);
//! otherwise the items run in order and a single large gemm may use gemm's own threads.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::Float;
use crate::ops::matmul::{gemm_into, gemm_par, Start};
use crate::parallel::{self, PARALLEL_THRESHOLD};
use crate::shape::Shape;
use crate::tensor::Tensor;
use gemm::Parallelism;

/// Multiply-adds of a whole convolution (all batch items) from which it is split over threads:
/// `8 · PARALLEL_THRESHOLD` = 2^19, the bar `matmul` uses for a batch of whole products.
pub const CONV_PARALLEL_WORK: usize = 8 * PARALLEL_THRESHOLD;

/// A size given for both spatial dims at once (`2`) or per dim (`(2, 1)`: height, width).
pub trait IntoPair {
    /// `(height, width)`.
    fn into_pair(self) -> (usize, usize);
}

impl IntoPair for usize {
    fn into_pair(self) -> (usize, usize) {
        (self, self)
    }
}

impl IntoPair for (usize, usize) {
    fn into_pair(self) -> (usize, usize) {
        self
    }
}

impl IntoPair for [usize; 2] {
    fn into_pair(self) -> (usize, usize) {
        (self[0], self[1])
    }
}

/// Options of [`Tensor::conv2d`]: `(height, width)` stride, zero padding and dilation, and the
/// number of groups. Default: stride 1, padding 0, dilation 1, groups 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dOptions {
    /// Step between output positions.
    pub stride: (usize, usize),
    /// Zeros added on both sides of each spatial dim.
    pub padding: (usize, usize),
    /// Spacing between kernel taps.
    pub dilation: (usize, usize),
    /// Channel groups: input and output channels are split into this many independent convs.
    pub groups: usize,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

impl Conv2dOptions {
    /// Sets the stride (`2` or `(2, 1)`).
    pub fn stride(mut self, s: impl IntoPair) -> Self {
        self.stride = s.into_pair();
        self
    }

    /// Sets the zero padding (`1` or `(1, 0)`).
    pub fn padding(mut self, p: impl IntoPair) -> Self {
        self.padding = p.into_pair();
        self
    }

    /// Sets the dilation (`2` or `(2, 1)`).
    pub fn dilation(mut self, d: impl IntoPair) -> Self {
        self.dilation = d.into_pair();
        self
    }

    /// Sets the number of groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
}

/// Options of [`Tensor::conv1d`]. Default: stride 1, padding 0, dilation 1, groups 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv1dOptions {
    /// Step between output positions.
    pub stride: usize,
    /// Zeros added on both sides.
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
}

impl Default for Conv1dOptions {
    fn default() -> Self {
        Conv1dOptions {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

impl Conv1dOptions {
    /// Sets the stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }

    /// Sets the zero padding.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = p;
        self
    }

    /// Sets the dilation.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = d;
        self
    }

    /// Sets the number of groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
}

/// Output size of one spatial dim (torch's formula), or `None` when the dilated kernel does not
/// fit in the padded input.
fn out_size(size: usize, k: usize, s: usize, p: usize, d: usize) -> Option<usize> {
    let span = d * (k - 1) + 1;
    (size + 2 * p).checked_sub(span).map(|r| r / s + 1)
}

/// Checks the shapes of a convolution of `spatial.len()` dims (`op` names it in panics) and
/// returns the output spatial sizes. `x` is batched (`[N, C, ..]`) or not (`[C, ..]`).
#[allow(clippy::too_many_arguments)]
fn validate(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: &[usize],
    padding: &[usize],
    dilation: &[usize],
    groups: usize,
) -> Vec<usize> {
    let nd = stride.len();
    let (xs, ws) = (x.shape(), w.shape());
    let layout = if nd == 2 {
        "[N, C, H, W] or [C, H, W]"
    } else {
        "[N, C, L] or [C, L]"
    };
    assert!(
        x.rank() == nd + 2 || x.rank() == nd + 1,
        "{op}: input must be {layout}, got shape {xs}"
    );
    assert!(
        w.rank() == nd + 2,
        "{op}: weight must have {} dims [C_out, C_in/groups, kernel..], got shape {ws}",
        nd + 2
    );
    assert!(
        x.dtype() == w.dtype(),
        "{op}: dtype mismatch, input {} vs weight {}",
        x.dtype(),
        w.dtype()
    );
    assert!(
        groups >= 1,
        "{op}: groups must be at least 1 (input {xs}, weight {ws})"
    );
    assert!(
        stride.iter().all(|&s| s >= 1) && dilation.iter().all(|&d| d >= 1),
        "{op}: stride {stride:?} and dilation {dilation:?} must be at least 1 (input {xs}, weight {ws})"
    );
    let xd = &x.dims()[x.rank() - nd - 1..];
    let (c, cout, cin_g) = (xd[0], w.dims()[0], w.dims()[1]);
    assert!(
        c.is_multiple_of(groups) && c > 0,
        "{op}: input channels {c} are not a positive multiple of groups {groups} (input {xs}, weight {ws})"
    );
    assert!(
        cout.is_multiple_of(groups) && cout > 0,
        "{op}: output channels {cout} are not a positive multiple of groups {groups} (input {xs}, weight {ws})"
    );
    assert!(
        cin_g * groups == c,
        "{op}: weight {ws} expects {} input channels ({cin_g} per group × {groups} groups), input {xs} has {c}",
        cin_g * groups
    );
    if let Some(b) = bias {
        assert!(
            b.dims() == [cout] && b.dtype() == x.dtype(),
            "{op}: bias must be [{cout}] {}, got {} {} (weight {ws})",
            x.dtype(),
            b.shape(),
            b.dtype()
        );
    }
    let kernel = &w.dims()[2..];
    (0..nd)
        .map(|i| {
            assert!(
                kernel[i] >= 1,
                "{op}: kernel size must be at least 1, weight {ws}"
            );
            out_size(xd[1 + i], kernel[i], stride[i], padding[i], dilation[i]).unwrap_or_else(
                || {
                    panic!(
                        "{op}: kernel {kernel:?} with dilation {dilation:?} is larger than the padded input \
                         (input {xs}, padding {padding:?}, weight {ws})"
                    )
                },
            )
        })
        .collect()
}

// ---------------------------------------------------------------------- geometry

/// Sizes of a batched 2-D convolution, all checked.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    stride: (usize, usize),
    pad: (usize, usize),
    dil: (usize, usize),
    groups: usize,
}

impl Geom {
    fn cin_g(&self) -> usize {
        self.c / self.groups
    }
    fn cout_g(&self) -> usize {
        self.cout / self.groups
    }
    /// Rows of the column matrix of one group: `C_in/g · kH · kW`.
    fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }
    /// Output positions per channel.
    fn p(&self) -> usize {
        self.ho * self.wo
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    /// The input is its own column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == (1, 1) && self.pad == (0, 0)
    }
    fn depthwise(&self) -> bool {
        self.groups == self.c && self.cout == self.c
    }
    /// Multiply-adds of the whole convolution.
    fn work(&self) -> usize {
        self.n * self.cout * self.p() * self.k()
    }
    /// Output rows `[lo, hi)` whose kernel row `i` lands inside the input.
    fn rows(&self, i: usize) -> (usize, usize) {
        valid_range(self.h, self.ho, i * self.dil.0, self.stride.0, self.pad.0)
    }
    /// Output columns `[lo, hi)` whose kernel column `j` lands inside the input.
    fn cols(&self, j: usize) -> (usize, usize) {
        valid_range(self.w, self.wo, j * self.dil.1, self.stride.1, self.pad.1)
    }
}

/// Outputs `o` in `[lo, hi)` with `0 <= o·s + off − p < size` (and `lo <= hi <= out`).
#[inline]
fn valid_range(size: usize, out: usize, off: usize, s: usize, p: usize) -> (usize, usize) {
    let lo = if off >= p { 0 } else { (p - off).div_ceil(s) };
    let hi = if size + p <= off {
        0
    } else {
        ((size + p - off - 1) / s + 1).min(out)
    };
    (lo.min(hi), hi)
}

// ---------------------------------------------------------------------- kernels

/// Writes the column matrix `[C_in/g · kH · kW, H_out · W_out]` of one group's input planes.
fn im2col<T: Float>(g: &Geom, x: &[T], col: &mut [T]) {
    let (p, wo, sw) = (g.p(), g.wo, g.stride.1);
    let mut rows = col.chunks_exact_mut(p);
    for xc in x.chunks_exact(g.hw()) {
        for i in 0..g.kh {
            let (hlo, hhi) = g.rows(i);
            for j in 0..g.kw {
                let row = rows.next().expect("column buffer too small");
                let (wlo, whi) = g.cols(j);
                let start = (wlo * sw + j * g.dil.1).wrapping_sub(g.pad.1);
                for (o, dst) in row.chunks_exact_mut(wo).enumerate() {
                    if o < hlo || o >= hhi || wlo == whi {
                        dst.fill(T::zero());
                        continue;
                    }
                    let ih = o * g.stride.0 + i * g.dil.0 - g.pad.0;
                    let xrow = &xc[ih * g.w..(ih + 1) * g.w];
                    dst[..wlo].fill(T::zero());
                    dst[whi..].fill(T::zero());
                    let dst = &mut dst[wlo..whi];
                    if sw == 1 {
                        dst.copy_from_slice(&xrow[start..start + dst.len()]);
                    } else {
                        for (t, d) in dst.iter_mut().enumerate() {
                            *d = xrow[start + t * sw];
                        }
                    }
                }
            }
        }
    }
}

/// Adds the column matrix `col` back onto one group's input-gradient planes `gx`.
fn col2im<T: Float>(g: &Geom, col: &[T], gx: &mut [T]) {
    let (p, wo, sw) = (g.p(), g.wo, g.stride.1);
    let mut rows = col.chunks_exact(p);
    for gc in gx.chunks_exact_mut(g.hw()) {
        for i in 0..g.kh {
            let (hlo, hhi) = g.rows(i);
            for j in 0..g.kw {
                let row = rows.next().expect("column buffer too small");
                let (wlo, whi) = g.cols(j);
                if wlo == whi {
                    continue;
                }
                let start = wlo * sw + j * g.dil.1 - g.pad.1;
                for o in hlo..hhi {
                    let ih = o * g.stride.0 + i * g.dil.0 - g.pad.0;
                    let grow = &mut gc[ih * g.w..(ih + 1) * g.w];
                    let src = &row[o * wo + wlo..o * wo + whi];
                    if sw == 1 {
                        for (d, &s) in grow[start..start + src.len()].iter_mut().zip(src) {
                            *d += s;
                        }
                    } else {
                        for (t, &s) in src.iter().enumerate() {
                            grow[start + t * sw] += s;
                        }
                    }
                }
            }
        }
    }
}

/// A matrix operand: elements, row stride and column stride.
type Mat<'a, T> = (&'a [T], usize, usize);

/// `dst[m × n] (+)= a[m × k] · b[k × n]` on slices (bounds checked once per call).
fn mm<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (a, a_rs, a_cs): Mat<T>,
    (b, b_rs, b_cs): Mat<T>,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "conv: gemm destination too small");
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "conv: gemm operand out of bounds"
    );
    // SAFETY: every element addressed lies inside `a`, `b` and `dst` (checked above), and
    // `dst` is a distinct mutable slice.
    unsafe {
        gemm_into(
            (m, n, k),
            dst.as_mut_ptr(),
            if accumulate { Start::Keep } else { Start::Zero },
            a.as_ptr(),
            (a_rs, a_cs),
            b.as_ptr(),
            (b_rs, b_cs),
            par,
        );
    }
}

/// Forward of one batch item: `out` is its `[C_out, P]` block.
fn forward_item<T: Float>(
    g: &Geom,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    out: &mut [T],
    col: &mut [T],
    par: Parallelism,
) {
    let (k, p, cin_g, cout_g, hw) = (g.k(), g.p(), g.cin_g(), g.cout_g(), g.hw());
    for grp in 0..g.groups {
        let xg = &x[grp * cin_g * hw..(grp + 1) * cin_g * hw];
        let b: &[T] = if g.pointwise() {
            xg
        } else {
            im2col(g, xg, col);
            col
        };
        let og = &mut out[grp * cout_g * p..(grp + 1) * cout_g * p];
        if let Some(bias) = bias {
            for (row, &bv) in og.chunks_exact_mut(p).zip(&bias[grp * cout_g..]) {
                row.fill(bv);
            }
        }
        mm(
            (cout_g, p, k),
            og,
            (&w[grp * cout_g * k..(grp + 1) * cout_g * k], k, 1),
            (b, p, 1),
            bias.is_some(),
            par,
        );
    }
}

/// Backward of one batch item: adds this item's weight gradient into `gw` (`[C_out, K]`) and
/// writes its input gradient into `gx` (`[C_in, H, W]`), each when asked for.
#[allow(clippy::too_many_arguments)]
fn backward_item<T: Float>(
    g: &Geom,
    x: &[T],
    w: &[T],
    go: &[T],
    mut gx: Option<&mut [T]>,
    mut gw: Option<&mut [T]>,
    col: &mut [T],
    par: Parallelism,
) {
    let (k, p, cin_g, cout_g, hw) = (g.k(), g.p(), g.cin_g(), g.cout_g(), g.hw());
    for grp in 0..g.groups {
        let gog = &go[grp * cout_g * p..(grp + 1) * cout_g * p];
        let wg = &w[grp * cout_g * k..(grp + 1) * cout_g * k];
        let xg = &x[grp * cin_g * hw..(grp + 1) * cin_g * hw];
        if let Some(gw) = gw.as_deref_mut() {
            // gw_g[cout_g × K] += go_g[cout_g × P] · colᵀ[P × K]
            let b: &[T] = if g.pointwise() {
                xg
            } else {
                im2col(g, xg, col);
                col
            };
            mm(
                (cout_g, k, p),
                &mut gw[grp * cout_g * k..(grp + 1) * cout_g * k],
                (gog, p, 1),
                (b, 1, p),
                true,
                par,
            );
        }
        if let Some(gx) = gx.as_deref_mut() {
            let gxg = &mut gx[grp * cin_g * hw..(grp + 1) * cin_g * hw];
            // col[K × P] = W_gᵀ[K × cout_g] · go_g[cout_g × P], then back onto the planes.
            if g.pointwise() {
                mm((k, p, cout_g), gxg, (wg, 1, k), (gog, p, 1), false, par);
            } else {
                mm((k, p, cout_g), col, (wg, 1, k), (gog, p, 1), false, par);
                gxg.fill(T::zero());
                col2im(g, col, gxg);
            }
        }
    }
}

/// Split over batch items: `(tasks, items per task)`, or `None` to run in order.
fn batch_split(g: &Geom) -> Option<(usize, usize)> {
    let threads = parallel::num_threads();
    (threads > 1 && g.n > 1 && g.work() >= CONV_PARALLEL_WORK).then(|| {
        let per = g.n.div_ceil(threads.min(g.n));
        (g.n.div_ceil(per), per)
    })
}

fn col_len(g: &Geom) -> usize {
    if g.pointwise() {
        0
    } else {
        g.k() * g.p()
    }
}

fn conv_forward<T: Float>(g: &Geom, x: &[T], w: &[T], bias: Option<&[T]>) -> Buffer<T> {
    let item = g.cout * g.p();
    let mut out = Buffer::<T>::uninit(g.n * item);
    if out.is_empty() {
        return out;
    }
    let chw = g.c * g.hw();
    if g.depthwise() {
        let (kk, p) = (g.kh * g.kw, g.p());
        parallel::for_chunks(&mut out, p, g.work() >= CONV_PARALLEL_WORK, |plane, o| {
            let c = plane % g.c;
            let b = bias.map_or(T::zero(), |b| b[c]);
            o.fill(b);
            depthwise_plane(
                g,
                &x[plane * g.hw()..(plane + 1) * g.hw()],
                &w[c * kk..(c + 1) * kk],
                o,
                DwMode::Forward,
            );
        });
        return out;
    }
    match batch_split(g) {
        Some((_, per)) => parallel::for_chunks(&mut out, per * item, true, |t, oc| {
            let mut col = Buffer::<T>::uninit(col_len(g));
            for (i, o) in oc.chunks_exact_mut(item).enumerate() {
                let n = t * per + i;
                let xi = &x[n * chw..(n + 1) * chw];
                forward_item(g, xi, w, bias, o, &mut col, Parallelism::None);
            }
        }),
        None => {
            let mut col = Buffer::<T>::uninit(col_len(g));
            let par = gemm_par(g.cout_g() * g.p() * g.k());
            for (n, o) in out.chunks_exact_mut(item).enumerate() {
                forward_item(g, &x[n * chw..(n + 1) * chw], w, bias, o, &mut col, par);
            }
        }
    }
    out
}

/// Input and weight gradients (each when asked for).
fn conv_backward<T: Float>(
    g: &Geom,
    x: &[T],
    w: &[T],
    go: &[T],
    need_x: bool,
    need_w: bool,
) -> (Option<Buffer<T>>, Option<Buffer<T>>) {
    let chw = g.c * g.hw();
    let item = g.cout * g.p();
    let wlen = g.cout * g.k();
    let mut gx = need_x.then(|| Buffer::<T>::uninit(g.n * chw));
    if g.depthwise() {
        let (kk, p, hw) = (g.kh * g.kw, g.p(), g.hw());
        let par = g.work() >= CONV_PARALLEL_WORK;
        if let Some(gx) = gx.as_mut() {
            parallel::for_chunks(gx, hw, par, |plane, gxp| {
                let c = plane % g.c;
                gxp.fill(T::zero());
                depthwise_plane(
                    g,
                    &go[plane * p..(plane + 1) * p],
                    &w[c * kk..(c + 1) * kk],
                    gxp,
                    DwMode::GradInput,
                );
            });
        }
        let gw = need_w.then(|| {
            // Per-plane partial sums, then a sum over the batch.
            let mut partial = Buffer::<T>::filled(g.n * g.c * kk, T::zero());
            parallel::for_chunks(&mut partial, kk, par, |plane, gwp| {
                depthwise_plane(
                    g,
                    &x[plane * hw..(plane + 1) * hw],
                    &go[plane * p..(plane + 1) * p],
                    gwp,
                    DwMode::GradWeight,
                );
            });
            let mut gw = Buffer::<T>::filled(g.c * kk, T::zero());
            for chunk in partial.chunks_exact(g.c * kk) {
                for (a, &b) in gw.iter_mut().zip(chunk) {
                    *a += b;
                }
            }
            gw
        });
        return (gx, gw);
    }
    if g.n == 0 {
        return (gx, need_w.then(|| Buffer::filled(wlen, T::zero())));
    }
    match batch_split(g) {
        Some((tasks, per)) => {
            use rayon::prelude::*;
            let gx_chunks: Vec<Option<&mut [T]>> = match gx.as_mut() {
                Some(b) => b.chunks_mut(per * chw).map(Some).collect(),
                None => (0..tasks).map(|_| None).collect(),
            };
            let partials: Vec<Option<Buffer<T>>> = parallel::install(|| {
                gx_chunks
                    .into_par_iter()
                    .enumerate()
                    .map(|(t, gxc)| {
                        let first = t * per;
                        let count = per.min(g.n - first);
                        let mut gw = need_w.then(|| Buffer::<T>::filled(wlen, T::zero()));
                        let mut col = Buffer::<T>::uninit(col_len(g));
                        let mut gxc = gxc;
                        for i in 0..count {
                            let n = first + i;
                            backward_item(
                                g,
                                &x[n * chw..(n + 1) * chw],
                                w,
                                &go[n * item..(n + 1) * item],
                                gxc.as_deref_mut().map(|gx| &mut gx[i * chw..(i + 1) * chw]),
                                gw.as_deref_mut(),
                                &mut col,
                                Parallelism::None,
                            );
                        }
                        gw
                    })
                    .collect()
            });
            let gw = need_w.then(|| {
                let mut it = partials.into_iter().flatten();
                let mut acc = it.next().expect("at least one task");
                for part in it {
                    for (a, &b) in acc.iter_mut().zip(part.iter()) {
                        *a += b;
                    }
                }
                acc
            });
            (gx, gw)
        }
        None => {
            let mut gw = need_w.then(|| Buffer::<T>::filled(wlen, T::zero()));
            let par = gemm_par(g.cout_g() * g.p() * g.k());
            let mut col = Buffer::<T>::uninit(col_len(g));
            for n in 0..g.n {
                backward_item(
                    g,
                    &x[n * chw..(n + 1) * chw],
                    w,
                    &go[n * item..(n + 1) * item],
                    gx.as_deref_mut().map(|gx| &mut gx[n * chw..(n + 1) * chw]),
                    gw.as_deref_mut(),
                    &mut col,
                    par,
                );
            }
            (gx, gw)
        }
    }
}

/// What a pass of [`depthwise_plane`] computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DwMode {
    /// `out[o] += Σ w[k] · x[i(o, k)]`: args (x plane, kernel, out plane).
    Forward,
    /// `gx[i(o, k)] += w[k] · g[o]`: args (grad-out plane, kernel, grad-in plane).
    GradInput,
    /// `gw[k] += Σ_o g[o] · x[i(o, k)]`: args (x plane, grad-out plane, kernel gradient).
    GradWeight,
}

/// One channel plane of a depthwise convolution, walking each kernel tap over the output rows
/// and the contiguous range of output columns where it lands inside the input.
fn depthwise_plane<T: Float>(g: &Geom, a: &[T], b: &[T], dst: &mut [T], mode: DwMode) {
    let (sw, wo) = (g.stride.1, g.wo);
    for i in 0..g.kh {
        let (hlo, hhi) = g.rows(i);
        for j in 0..g.kw {
            let (wlo, whi) = g.cols(j);
            if wlo == whi {
                continue;
            }
            let tap = i * g.kw + j;
            let start = wlo * sw + j * g.dil.1 - g.pad.1;
            let len = whi - wlo;
            let mut acc = T::zero();
            for o in hlo..hhi {
                let ih = o * g.stride.0 + i * g.dil.0 - g.pad.0;
                let irow = ih * g.w + start;
                let orow = o * wo + wlo;
                match mode {
                    DwMode::Forward => {
                        let wv = b[tap];
                        let out = &mut dst[orow..orow + len];
                        if sw == 1 {
                            for (d, &xv) in out.iter_mut().zip(&a[irow..irow + len]) {
                                *d += wv * xv;
                            }
                        } else {
                            for (t, d) in out.iter_mut().enumerate() {
                                *d += wv * a[irow + t * sw];
                            }
                        }
                    }
                    DwMode::GradInput => {
                        let wv = b[tap];
                        let go = &a[orow..orow + len];
                        if sw == 1 {
                            for (d, &gv) in dst[irow..irow + len].iter_mut().zip(go) {
                                *d += wv * gv;
                            }
                        } else {
                            for (t, &gv) in go.iter().enumerate() {
                                dst[irow + t * sw] += wv * gv;
                            }
                        }
                    }
                    DwMode::GradWeight => {
                        let go = &b[orow..orow + len];
                        if sw == 1 {
                            for (&gv, &xv) in go.iter().zip(&a[irow..irow + len]) {
                                acc += gv * xv;
                            }
                        } else {
                            for (t, &gv) in go.iter().enumerate() {
                                acc += gv * a[irow + t * sw];
                            }
                        }
                    }
                }
            }
            if mode == DwMode::GradWeight {
                dst[tap] += acc;
            }
        }
    }
}

/// `Σ_{N, P} grad_out` per output channel, summed in f64.
fn bias_grad<T: Float>(go: &[T], cout: usize, p: usize) -> Buffer<T> {
    let mut acc = vec![0f64; cout];
    if p > 0 {
        for (r, row) in go.chunks_exact(p).enumerate() {
            acc[r % cout] += row.iter().map(|&v| crate::Element::to_f64(v)).sum::<f64>();
        }
    }
    Buffer::from_fn(cout, |i| T::from_f64(acc[i]))
}

// ---------------------------------------------------------------------- op and backward

/// Runs `f` on the elements of `t` in row-major order (borrowed; copied only when `t` is not
/// contiguous).
fn with_values<T: Float, R>(t: &Tensor, op: &str, f: impl FnOnce(&[T]) -> R) -> R {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.detach().contiguous()
    };
    let s = t.storage();
    let data = crate::typed_slice!(s, T, op);
    f(&data[t.layout().contiguous_range().expect("contiguous")])
}

/// Backward of [`Tensor::conv2d`]; inputs are `[x, weight, bias?]` (x batched, 4-D).
struct ConvBackward {
    geom: Geom,
    has_bias: bool,
}

impl GradFn for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, go: &Tensor) -> Vec<Option<Tensor>> {
        let (x, w) = (&inputs[0], &inputs[1]);
        let g = &self.geom;
        let (need_x, need_w) = (x.tracks_grad(), w.tracks_grad());
        let need_b = self.has_bias && inputs[2].tracks_grad();
        dispatch_float!(x.dtype(), "conv2d", |T| {
            with_values::<T, _>(go, "conv2d", |gov| {
                let (gx, gw) = if need_x || need_w {
                    with_values::<T, _>(x, "conv2d", |xv| {
                        with_values::<T, _>(w, "conv2d", |wv| {
                            conv_backward(g, xv, wv, gov, need_x, need_w)
                        })
                    })
                } else {
                    (None, None)
                };
                let mut grads = vec![
                    gx.map(|b| Tensor::from_buffer(b, x.shape().clone())),
                    gw.map(|b| Tensor::from_buffer(b, w.shape().clone())),
                ];
                if self.has_bias {
                    grads.push(
                        need_b.then(|| Tensor::from_buffer(bias_grad(gov, g.cout, g.p()), g.cout)),
                    );
                }
                grads
            })
        })
    }
}

/// Batched 2-D convolution on checked 4-D operands.
fn conv2d_batched(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: Geom) -> Tensor {
    let storage = dispatch_float!(x.dtype(), "conv2d", |T| {
        let out = with_values::<T, _>(x, "conv2d", |xv| {
            with_values::<T, _>(w, "conv2d", |wv| match bias {
                Some(b) => {
                    with_values::<T, _>(b, "conv2d", |bv| conv_forward(&g, xv, wv, Some(bv)))
                }
                None => conv_forward(&g, xv, wv, None),
            })
        });
        <T as crate::Element>::into_storage(out)
    });
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    Tensor::op_result(
        storage,
        Shape::from([g.n, g.cout, g.ho, g.wo]),
        &inputs,
        || ConvBackward {
            geom: g,
            has_bias: bias.is_some(),
        },
    )
}

impl Tensor {
    /// 2-D convolution (cross-correlation) like `torch.nn.functional.conv2d`: input
    /// `[N, C_in, H, W]` (or unbatched `[C_in, H, W]`), weight `[C_out, C_in/groups, kH, kW]`,
    /// optional bias `[C_out]`; output `[N, C_out, H_out, W_out]` with
    /// `H_out = (H + 2·pad − dil·(kH − 1) − 1) / stride + 1`.
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, opts: Conv2dOptions) -> Tensor {
        let (s, p, d) = (opts.stride, opts.padding, opts.dilation);
        let out = validate(
            "conv2d",
            self,
            weight,
            bias,
            &[s.0, s.1],
            &[p.0, p.1],
            &[d.0, d.1],
            opts.groups,
        );
        let unbatched = self.rank() == 3;
        let x = if unbatched {
            self.unsqueeze(0)
        } else {
            self.clone()
        };
        let (xd, wd) = (x.dims(), weight.dims());
        let g = Geom {
            n: xd[0],
            c: xd[1],
            h: xd[2],
            w: xd[3],
            cout: wd[0],
            kh: wd[2],
            kw: wd[3],
            ho: out[0],
            wo: out[1],
            stride: s,
            pad: p,
            dil: d,
            groups: opts.groups,
        };
        let y = conv2d_batched(&x, weight, bias, g);
        if unbatched {
            y.squeeze(0)
        } else {
            y
        }
    }

    /// 1-D convolution like `torch.nn.functional.conv1d`: input `[N, C_in, L]` (or `[C_in, L]`),
    /// weight `[C_out, C_in/groups, k]`, optional bias `[C_out]`; output `[N, C_out, L_out]`.
    /// Runs the 2-D kernel with a height of 1.
    pub fn conv1d(&self, weight: &Tensor, bias: Option<&Tensor>, opts: Conv1dOptions) -> Tensor {
        validate(
            "conv1d",
            self,
            weight,
            bias,
            &[opts.stride],
            &[opts.padding],
            &[opts.dilation],
            opts.groups,
        );
        let h = self.rank() - 1;
        let o2 = Conv2dOptions {
            stride: (1, opts.stride),
            padding: (0, opts.padding),
            dilation: (1, opts.dilation),
            groups: opts.groups,
        };
        self.unsqueeze(h)
            .conv2d(&weight.unsqueeze(2), bias, o2)
            .squeeze(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};

    /// Direct-loop reference convolution in f64 (batched NCHW).
    fn naive(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        o: Conv2dOptions,
    ) -> (Vec<f64>, Vec<usize>) {
        let (xd, wd) = (x.dims().to_vec(), w.dims().to_vec());
        let (xv, wv) = (x.to_f64_vec(), w.to_f64_vec());
        let bv = b.map(|b| b.to_f64_vec());
        let (n, c, h, wi) = (xd[0], xd[1], xd[2], xd[3]);
        let (co, cig, kh, kw) = (wd[0], wd[1], wd[2], wd[3]);
        let ho = (h + 2 * o.padding.0 - o.dilation.0 * (kh - 1) - 1) / o.stride.0 + 1;
        let wo = (wi + 2 * o.padding.1 - o.dilation.1 * (kw - 1) - 1) / o.stride.1 + 1;
        let cog = co / o.groups;
        let mut out = vec![0.0; n * co * ho * wo];
        for ni in 0..n {
            for oc in 0..co {
                let grp = oc / cog;
                for y in 0..ho {
                    for xx in 0..wo {
                        let mut s = bv.as_ref().map_or(0.0, |b| b[oc]);
                        for ic in 0..cig {
                            let cin = grp * cig + ic;
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (y * o.stride.0 + i * o.dilation.0) as isize
                                        - o.padding.0 as isize;
                                    let ix = (xx * o.stride.1 + j * o.dilation.1) as isize
                                        - o.padding.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wi as isize {
                                        continue;
                                    }
                                    s += wv[((oc * cig + ic) * kh + i) * kw + j]
                                        * xv[((ni * c + cin) * h + iy as usize) * wi + ix as usize];
                                }
                            }
                        }
                        out[((ni * co + oc) * ho + y) * wo + xx] = s;
                    }
                }
            }
        }
        (out, vec![n, co, ho, wo])
    }

    fn assert_close(got: &Tensor, want: &[f64], tol: f64, what: &str) {
        let g = got.to_f64_vec();
        assert_eq!(g.len(), want.len(), "{what}: length");
        for (i, (a, b)) in g.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what} at {i}: {a} vs {b}"
            );
        }
    }

    /// The configurations every check runs over: (name, x shape, w shape, options).
    fn cases() -> Vec<(&'static str, [usize; 4], [usize; 4], Conv2dOptions)> {
        let o = Conv2dOptions::default;
        vec![
            ("plain", [2, 3, 6, 5], [4, 3, 3, 3], o()),
            ("stride2", [2, 2, 7, 6], [3, 2, 3, 2], o().stride(2)),
            (
                "stride21_pad",
                [1, 2, 5, 6],
                [3, 2, 3, 3],
                o().stride((2, 1)).padding((1, 2)),
            ),
            ("padding", [2, 2, 4, 4], [2, 2, 3, 3], o().padding(1)),
            (
                "dilation2",
                [1, 2, 7, 7],
                [2, 2, 3, 3],
                o().dilation(2).padding((2, 1)),
            ),
            (
                "groups2",
                [2, 4, 5, 5],
                [6, 2, 3, 3],
                o().groups(2).padding(1),
            ),
            (
                "depthwise",
                [2, 3, 6, 6],
                [3, 1, 3, 3],
                o().groups(3).padding(1),
            ),
            (
                "depthwise_strided",
                [1, 2, 7, 6],
                [2, 1, 3, 2],
                o().groups(2)
                    .stride((2, 3))
                    .padding((1, 2))
                    .dilation((1, 2)),
            ),
            ("pointwise", [2, 4, 3, 5], [3, 4, 1, 1], o()),
            (
                "pointwise_groups",
                [2, 4, 3, 3],
                [4, 2, 1, 1],
                o().groups(2),
            ),
            (
                "one_by_one_strided",
                [1, 3, 5, 5],
                [2, 3, 1, 1],
                o().stride(2),
            ),
            (
                "big_padding",
                [1, 1, 2, 3],
                [2, 1, 2, 2],
                o().padding(3).stride(2),
            ),
        ]
    }

    #[test]
    fn forward_matches_direct_loops() {
        for (name, xs, ws, opts) in cases() {
            let x = randn_f64(&xs, 1);
            let w = randn_f64(&ws, 2);
            let b = randn_f64(&[ws[0]], 3);
            for bias in [None, Some(&b)] {
                let (want, shape) = naive(&x, &w, bias, opts);
                let y = x.conv2d(&w, bias, opts);
                assert_eq!(y.dims(), shape.as_slice(), "{name}");
                assert_close(&y, &want, 1e-12, name);
                // f32 too.
                let y32 = x.to_dtype(crate::DType::F32).conv2d(
                    &w.to_dtype(crate::DType::F32),
                    bias.map(|b| b.to_dtype(crate::DType::F32)).as_ref(),
                    opts,
                );
                assert_close(&y32, &want, 1e-5, name);
            }
        }
    }

    #[test]
    fn gradcheck_every_configuration_with_and_without_bias() {
        for (name, xs, ws, opts) in cases() {
            let x = randn_f64(&xs, 4).requires_grad();
            let w = randn_f64(&ws, 5).requires_grad();
            let b = randn_f64(&[ws[0]], 6).requires_grad();
            gradcheck(
                |t| t[0].conv2d(&t[1], Some(&t[2]), opts),
                &[x.clone(), w.clone(), b],
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            gradcheck(|t| t[0].conv2d(&t[1], None, opts), &[x, w])
                .unwrap_or_else(|e| panic!("{name} (no bias): {e}"));
        }
    }

    #[test]
    fn gradcheck_non_contiguous_input_and_weight() {
        // A permuted, then narrowed view as input; a transposed weight view.
        let x = randn_f64(&[2, 6, 5, 3], 7).requires_grad();
        let w = randn_f64(&[4, 3, 3, 2], 8).requires_grad();
        let b = randn_f64(&[4], 9).requires_grad();
        let opts = Conv2dOptions::default().padding(1).stride((1, 2));
        gradcheck(
            |t| {
                let xv = t[0].permute(&[0, 3, 2, 1]).narrow(3, 1, 5); // [2, 3, 5, 5]
                assert!(!xv.is_contiguous());
                xv.conv2d(&t[1].transpose(2, 3).narrow(2, 0, 2), Some(&t[2]), opts)
            },
            &[x.clone(), w.clone(), b],
        )
        .unwrap();
        // Depthwise and 1×1 paths on a non-contiguous input.
        let dw = randn_f64(&[3, 1, 3, 3], 10).requires_grad();
        gradcheck(
            |t| {
                t[0].permute(&[0, 3, 2, 1]).narrow(3, 0, 3).conv2d(
                    &t[1],
                    None,
                    Conv2dOptions::default().groups(3).padding(1),
                )
            },
            &[x.clone(), dw],
        )
        .unwrap();
        let pw = randn_f64(&[2, 3, 1, 1], 11).requires_grad();
        gradcheck(
            |t| {
                t[0].permute(&[0, 3, 2, 1]).narrow(3, 2, 3).conv2d(
                    &t[1],
                    None,
                    Conv2dOptions::default(),
                )
            },
            &[x, pw],
        )
        .unwrap();
    }

    #[test]
    fn unbatched_and_conv1d() {
        let x = randn_f64(&[3, 5, 4], 12).requires_grad();
        let w = randn_f64(&[2, 3, 2, 2], 13).requires_grad();
        let b = randn_f64(&[2], 14).requires_grad();
        let opts = Conv2dOptions::default().padding(1);
        let y = x.conv2d(&w, Some(&b), opts);
        let (want, _) = naive(&x.unsqueeze(0), &w, Some(&b), opts);
        assert_eq!(y.dims(), &[2, 6, 5]);
        assert_close(&y, &want, 1e-12, "unbatched");
        gradcheck(|t| t[0].conv2d(&t[1], Some(&t[2]), opts), &[x, w, b]).unwrap();

        // conv1d against the 2-D reference with a height of 1, batched and unbatched.
        let x = randn_f64(&[2, 4, 9], 15).requires_grad();
        let w = randn_f64(&[6, 2, 3], 16).requires_grad();
        let b = randn_f64(&[6], 17).requires_grad();
        let o1 = Conv1dOptions::default()
            .stride(2)
            .padding(2)
            .dilation(2)
            .groups(2);
        let y = x.conv1d(&w, Some(&b), o1);
        let o2 = Conv2dOptions::default()
            .stride((1, 2))
            .padding((0, 2))
            .dilation((1, 2))
            .groups(2);
        let (want, shape) = naive(&x.unsqueeze(2), &w.unsqueeze(2), Some(&b), o2);
        assert_eq!(y.dims(), &[shape[0], shape[1], shape[3]]);
        assert_close(&y, &want, 1e-12, "conv1d");
        gradcheck(
            |t| t[0].conv1d(&t[1], Some(&t[2]), o1),
            &[x.clone(), w.clone(), b],
        )
        .unwrap();
        gradcheck(
            |t| t[0].narrow(0, 1, 1).squeeze(0).conv1d(&t[1], None, o1),
            &[x, w],
        )
        .unwrap();
        // Depthwise conv1d.
        let x = randn_f64(&[2, 3, 8], 18).requires_grad();
        let w = randn_f64(&[3, 1, 3], 19).requires_grad();
        gradcheck(
            |t| t[0].conv1d(&t[1], None, Conv1dOptions::default().groups(3).padding(1)),
            &[x, w],
        )
        .unwrap();
    }

    /// Direct-loop input and weight gradients of `sum(conv(x, w) * g)`.
    fn naive_grads(x: &Tensor, w: &Tensor, g: &[f64], o: Conv2dOptions) -> (Vec<f64>, Vec<f64>) {
        let (xd, wd) = (x.dims().to_vec(), w.dims().to_vec());
        let (xv, wv) = (x.to_f64_vec(), w.to_f64_vec());
        let (n, c, h, wi) = (xd[0], xd[1], xd[2], xd[3]);
        let (co, cig, kh, kw) = (wd[0], wd[1], wd[2], wd[3]);
        let ho = (h + 2 * o.padding.0 - o.dilation.0 * (kh - 1) - 1) / o.stride.0 + 1;
        let wo = (wi + 2 * o.padding.1 - o.dilation.1 * (kw - 1) - 1) / o.stride.1 + 1;
        let cog = co / o.groups;
        let (mut gx, mut gw) = (vec![0.0; xv.len()], vec![0.0; wv.len()]);
        for ni in 0..n {
            for oc in 0..co {
                for y in 0..ho {
                    for xx in 0..wo {
                        let gv = g[((ni * co + oc) * ho + y) * wo + xx];
                        for ic in 0..cig {
                            let cin = oc / cog * cig + ic;
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (y * o.stride.0 + i * o.dilation.0) as isize
                                        - o.padding.0 as isize;
                                    let ix = (xx * o.stride.1 + j * o.dilation.1) as isize
                                        - o.padding.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wi as isize {
                                        continue;
                                    }
                                    let xi = ((ni * c + cin) * h + iy as usize) * wi + ix as usize;
                                    let wk = ((oc * cig + ic) * kh + i) * kw + j;
                                    gx[xi] += wv[wk] * gv;
                                    gw[wk] += xv[xi] * gv;
                                }
                            }
                        }
                    }
                }
            }
        }
        (gx, gw)
    }

    #[test]
    fn threaded_paths_match_direct_loops() {
        // Large enough to cross CONV_PARALLEL_WORK: split over batch items (N > 1), gemm's own
        // threads (N = 1, one large product), and the depthwise kernel over planes.
        let o = Conv2dOptions::default;
        for (xs, ws, opts) in [
            ([8usize, 8, 16, 16], [16usize, 8, 3, 3], o().padding(1)),
            (
                [5, 4, 15, 13],
                [6, 2, 3, 3],
                o().groups(2).stride(2).padding(1),
            ),
            ([1, 32, 40, 40], [48, 32, 3, 3], o().padding(1)),
            ([4, 64, 32, 32], [64, 1, 3, 3], o().groups(64).padding(1)),
            ([6, 32, 20, 20], [48, 32, 1, 1], o()),
        ] {
            let x = Tensor::randn_f64(xs, 20).requires_grad();
            let w = Tensor::randn_f64(ws, 21).requires_grad();
            let b = Tensor::randn_f64([ws[0]], 22).requires_grad();
            let y = x.conv2d(&w, Some(&b), opts);
            let (want, _) = naive(&x, &w, Some(&b), opts);
            assert_close(&y, &want, 1e-10, "threaded forward");
            let g = Tensor::randn_f64(y.shape().clone(), 23);
            y.backward_with_grad(&g);
            let gv = g.to_vec::<f64>();
            let (gx, gw) = naive_grads(&x, &w, &gv, opts);
            assert_close(&x.grad().unwrap(), &gx, 1e-10, "threaded grad input");
            assert_close(&w.grad().unwrap(), &gw, 1e-10, "threaded grad weight");
            let p = y.dims()[2] * y.dims()[3];
            let gb: Vec<f64> = (0..ws[0])
                .map(|oc| {
                    (0..xs[0])
                        .map(|n| {
                            gv[(n * ws[0] + oc) * p..(n * ws[0] + oc + 1) * p]
                                .iter()
                                .sum::<f64>()
                        })
                        .sum()
                })
                .collect();
            assert_close(&b.grad().unwrap(), &gb, 1e-10, "threaded grad bias");
        }
    }

    #[test]
    fn only_requested_gradients_are_computed() {
        let x = randn_f64(&[1, 2, 4, 4], 30);
        let w = randn_f64(&[2, 2, 3, 3], 31).requires_grad();
        let b = randn_f64(&[2], 32);
        let y = x.conv2d(&w, Some(&b), Conv2dOptions::default());
        assert_eq!(y.grad_fn_name(), Some("conv2d"));
        y.sum_all().backward();
        assert!(x.grad().is_none() && b.grad().is_none());
        assert_eq!(w.grad().unwrap().dims(), &[2, 2, 3, 3]);
        // Nothing requires grad: no graph.
        assert!(x
            .conv2d(
                &b.reshape([2, 1, 1, 1]),
                None,
                Conv2dOptions::default().groups(2)
            )
            .is_leaf());
    }

    #[test]
    #[should_panic(
        expected = "conv2d: input channels 3 are not a positive multiple of groups 2 (input [1, 3, 4, 4], weight [2, 1, 3, 3])"
    )]
    fn channels_not_divisible_by_groups_panics() {
        let _ = Tensor::zeros([1, 3, 4, 4]).conv2d(
            &Tensor::zeros([2, 1, 3, 3]),
            None,
            Conv2dOptions::default().groups(2),
        );
    }

    #[test]
    #[should_panic(
        expected = "conv2d: weight [2, 2, 3, 3] expects 2 input channels (2 per group × 1 groups), input [1, 3, 4, 4] has 3"
    )]
    fn channel_mismatch_panics() {
        let _ = Tensor::zeros([1, 3, 4, 4]).conv2d(
            &Tensor::zeros([2, 2, 3, 3]),
            None,
            Conv2dOptions::default(),
        );
    }

    #[test]
    #[should_panic(
        expected = "conv2d: kernel [5, 5] with dilation [1, 1] is larger than the padded input (input [1, 1, 4, 4], padding [0, 0], weight [1, 1, 5, 5])"
    )]
    fn kernel_larger_than_padded_input_panics() {
        let _ = Tensor::zeros([1, 1, 4, 4]).conv2d(
            &Tensor::zeros([1, 1, 5, 5]),
            None,
            Conv2dOptions::default(),
        );
    }

    #[test]
    #[should_panic(expected = "conv2d: input must be [N, C, H, W] or [C, H, W], got shape [4, 4]")]
    fn bad_input_rank_panics() {
        let _ = Tensor::zeros([4, 4]).conv2d(
            &Tensor::zeros([1, 1, 3, 3]),
            None,
            Conv2dOptions::default(),
        );
    }

    #[test]
    #[should_panic(expected = "conv2d: bias must be [2] f32, got [3] f32 (weight [2, 1, 3, 3])")]
    fn bad_bias_panics() {
        let _ = Tensor::zeros([1, 1, 4, 4]).conv2d(
            &Tensor::zeros([2, 1, 3, 3]),
            Some(&Tensor::zeros([3])),
            Conv2dOptions::default(),
        );
    }

    #[test]
    #[should_panic(
        expected = "conv1d: kernel [4] with dilation [2] is larger than the padded input (input [1, 2, 5], padding [0], weight [1, 2, 4])"
    )]
    fn conv1d_kernel_too_large_panics() {
        let _ = Tensor::zeros([1, 2, 5]).conv1d(
            &Tensor::zeros([1, 2, 4]),
            None,
            Conv1dOptions::default().dilation(2),
        );
    }

    #[test]
    #[should_panic(expected = "conv2d: stride [0, 1] and dilation [1, 1] must be at least 1")]
    fn zero_stride_panics() {
        let _ = Tensor::zeros([1, 1, 4, 4]).conv2d(
            &Tensor::zeros([1, 1, 3, 3]),
            None,
            Conv2dOptions::default().stride((0, 1)),
        );
    }

    #[test]
    fn empty_batch_gives_empty_output_and_zero_weight_grad() {
        let x = Tensor::randn_f64([0, 2, 5, 5], 40);
        let w = randn_f64(&[3, 2, 3, 3], 41).requires_grad();
        let y = x.conv2d(&w, None, Conv2dOptions::default());
        assert_eq!(y.dims(), &[0, 3, 3, 3]);
        y.sum_all().backward();
        assert!(w.grad().unwrap().to_vec::<f64>().iter().all(|&v| v == 0.0));
    }
}
