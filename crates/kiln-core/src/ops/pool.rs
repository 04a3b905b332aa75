//! Spatial pooling over `[N, C, H, W]` (or unbatched `[C, H, W]`) planes with PyTorch's
//! semantics: `max_pool2d` (padding with -inf, dilation, ceil mode, argmax recorded for the
//! backward, ties to the first maximum, NaN propagates), `avg_pool2d` (torch's divisor at the
//! borders, `count_include_pad`, `divisor_override`), `adaptive_avg_pool2d` (torch's
//! `floor(i·H/out) .. ceil((i+1)·H/out)` windows), and `max_pool1d` / `avg_pool1d` on
//! `[N, C, L]` through the 2-D kernels.
//!
//! Every kernel works on contiguous `(n, c)` planes (a non-contiguous input is copied once) and
//! splits the planes across threads when the work exceeds `PARALLEL_THRESHOLD`.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dtype::Float;
use crate::parallel::{install, num_threads, PARALLEL_THRESHOLD};
use crate::shape::Shape;
use crate::tensor::Tensor;
use crate::{dispatch_float, typed_slice};

// ---------------------------------------------------------------------- options

pub use crate::ops::conv::IntoPair;

/// Options of [`Tensor::max_pool2d`]: `MaxPool2dOptions::new(3).stride(2).padding(1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2dOptions {
    /// Window size (height, width).
    pub kernel: (usize, usize),
    /// Step between windows; `None` means the kernel size (torch's default).
    pub stride: Option<(usize, usize)>,
    /// Implicit -inf padding on each side (at most half the kernel).
    pub padding: (usize, usize),
    /// Spacing between window elements (1: dense).
    pub dilation: (usize, usize),
    /// Count a last partial window (that starts inside the input or the left padding).
    pub ceil_mode: bool,
}

impl MaxPool2dOptions {
    /// Windows of `kernel`, stride = kernel, no padding, dilation 1, floor mode.
    pub fn new(kernel: impl IntoPair) -> Self {
        MaxPool2dOptions {
            kernel: kernel.into_pair(),
            stride: None,
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode: false,
        }
    }

    /// Sets the stride.
    pub fn stride(mut self, stride: impl IntoPair) -> Self {
        self.stride = Some(stride.into_pair());
        self
    }

    /// Sets the padding.
    pub fn padding(mut self, padding: impl IntoPair) -> Self {
        self.padding = padding.into_pair();
        self
    }

    /// Sets the dilation.
    pub fn dilation(mut self, dilation: impl IntoPair) -> Self {
        self.dilation = dilation.into_pair();
        self
    }

    /// Sets ceil mode.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }
}

impl Default for MaxPool2dOptions {
    /// 2×2 windows with stride 2.
    fn default() -> Self {
        Self::new(2)
    }
}

/// Options of [`Tensor::avg_pool2d`]: `AvgPool2dOptions::new(3).stride(1).padding(1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvgPool2dOptions {
    /// Window size (height, width).
    pub kernel: (usize, usize),
    /// Step between windows; `None` means the kernel size.
    pub stride: Option<(usize, usize)>,
    /// Implicit zero padding on each side (at most half the kernel).
    pub padding: (usize, usize),
    /// Count a last partial window (that starts inside the input or the left padding).
    pub ceil_mode: bool,
    /// Divide by the window size including padding (torch default true), else by the number
    /// of input elements in the window.
    pub count_include_pad: bool,
    /// Divide every window by this instead.
    pub divisor_override: Option<usize>,
}

impl AvgPool2dOptions {
    /// Windows of `kernel`, stride = kernel, no padding, floor mode, padding counted.
    pub fn new(kernel: impl IntoPair) -> Self {
        AvgPool2dOptions {
            kernel: kernel.into_pair(),
            stride: None,
            padding: (0, 0),
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        }
    }

    /// Sets the stride.
    pub fn stride(mut self, stride: impl IntoPair) -> Self {
        self.stride = Some(stride.into_pair());
        self
    }

    /// Sets the padding.
    pub fn padding(mut self, padding: impl IntoPair) -> Self {
        self.padding = padding.into_pair();
        self
    }

    /// Sets ceil mode.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }

    /// Sets whether padded positions count in the divisor.
    pub fn count_include_pad(mut self, on: bool) -> Self {
        self.count_include_pad = on;
        self
    }

    /// Divides every window by `divisor` (must be non-zero).
    pub fn divisor_override(mut self, divisor: usize) -> Self {
        self.divisor_override = Some(divisor);
        self
    }
}

impl Default for AvgPool2dOptions {
    /// 2×2 windows with stride 2.
    fn default() -> Self {
        Self::new(2)
    }
}

/// Options of [`Tensor::max_pool1d`]: `MaxPool1dOptions::new(3).stride(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool1dOptions {
    /// Window length.
    pub kernel: usize,
    /// Step between windows; `None` means the kernel size.
    pub stride: Option<usize>,
    /// Implicit -inf padding on each side (at most half the kernel).
    pub padding: usize,
    /// Spacing between window elements.
    pub dilation: usize,
    /// Count a last partial window.
    pub ceil_mode: bool,
}

impl MaxPool1dOptions {
    /// Windows of `kernel`, stride = kernel, no padding, dilation 1, floor mode.
    pub fn new(kernel: usize) -> Self {
        MaxPool1dOptions {
            kernel,
            stride: None,
            padding: 0,
            dilation: 1,
            ceil_mode: false,
        }
    }

    /// Sets the stride.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = Some(stride);
        self
    }

    /// Sets the padding.
    pub fn padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// Sets the dilation.
    pub fn dilation(mut self, dilation: usize) -> Self {
        self.dilation = dilation;
        self
    }

    /// Sets ceil mode.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }

    fn to_2d(self) -> MaxPool2dOptions {
        MaxPool2dOptions {
            kernel: (1, self.kernel),
            stride: Some((1, self.stride.unwrap_or(self.kernel))),
            padding: (0, self.padding),
            dilation: (1, self.dilation),
            ceil_mode: self.ceil_mode,
        }
    }
}

impl Default for MaxPool1dOptions {
    /// Windows of 2 with stride 2.
    fn default() -> Self {
        Self::new(2)
    }
}

/// Options of [`Tensor::avg_pool1d`]: `AvgPool1dOptions::new(3).stride(1).padding(1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvgPool1dOptions {
    /// Window length.
    pub kernel: usize,
    /// Step between windows; `None` means the kernel size.
    pub stride: Option<usize>,
    /// Implicit zero padding on each side (at most half the kernel).
    pub padding: usize,
    /// Count a last partial window.
    pub ceil_mode: bool,
    /// Divide by the window length including padding (default true).
    pub count_include_pad: bool,
}

impl AvgPool1dOptions {
    /// Windows of `kernel`, stride = kernel, no padding, floor mode, padding counted.
    pub fn new(kernel: usize) -> Self {
        AvgPool1dOptions {
            kernel,
            stride: None,
            padding: 0,
            ceil_mode: false,
            count_include_pad: true,
        }
    }

    /// Sets the stride.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = Some(stride);
        self
    }

    /// Sets the padding.
    pub fn padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// Sets ceil mode.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }

    /// Sets whether padded positions count in the divisor.
    pub fn count_include_pad(mut self, on: bool) -> Self {
        self.count_include_pad = on;
        self
    }

    fn to_2d(self) -> AvgPool2dOptions {
        AvgPool2dOptions {
            kernel: (1, self.kernel),
            stride: Some((1, self.stride.unwrap_or(self.kernel))),
            padding: (0, self.padding),
            ceil_mode: self.ceil_mode,
            count_include_pad: self.count_include_pad,
            divisor_override: None,
        }
    }
}

impl Default for AvgPool1dOptions {
    /// Windows of 2 with stride 2.
    fn default() -> Self {
        Self::new(2)
    }
}

// ---------------------------------------------------------------------- geometry

/// Planes of a pooling input: `(planes, h, w)` and the output shape for `(oh, ow)`.
struct Planes {
    planes: usize,
    h: usize,
    w: usize,
    /// Leading dims kept in the output (`[N, C]` or `[C]`).
    lead: Vec<usize>,
}

impl Planes {
    fn of(x: &Tensor, op: &str, shown: &Shape) -> Planes {
        let d = x.dims();
        assert!(
            d.len() == 3 || d.len() == 4,
            "{op}: expected a batched or unbatched input ({}), got shape {shown}",
            if op.ends_with("1d") {
                "[N, C, L] or [C, L]"
            } else {
                "[N, C, H, W] or [C, H, W]"
            }
        );
        let r = d.len();
        Planes {
            planes: d[..r - 2].iter().product(),
            h: d[r - 2],
            w: d[r - 1],
            lead: d[..r - 2].to_vec(),
        }
    }

    fn out_shape(&self, oh: usize, ow: usize) -> Shape {
        let mut s = self.lead.clone();
        s.extend([oh, ow]);
        Shape::from(s)
    }
}

/// The input span one output position covers along one dim: elements `start..end` step the
/// dilation (empty when `start >= end`), and for average pooling the padded length `full`.
#[derive(Debug, Clone, Copy)]
struct Win {
    start: usize,
    end: usize,
    full: usize,
}

/// torch's `pooling_output_shape`: floor (or ceil) division, and in ceil mode the last window
/// must start inside the input or the left padding.
fn out_len(len: usize, k: usize, s: usize, p: usize, d: usize, ceil: bool) -> i64 {
    let (len, k, s, p, d) = (len as i64, k as i64, s as i64, p as i64, d as i64);
    let num = len + 2 * p - d * (k - 1) - 1 + if ceil { s - 1 } else { 0 };
    let mut o = num.div_euclid(s) + 1;
    if ceil && (o - 1) * s >= len + p {
        o -= 1;
    }
    o
}

/// Windows along one dim of a (dilated) max or average pool.
fn windows(len: usize, out: usize, k: usize, s: usize, p: usize, d: usize) -> Vec<Win> {
    (0..out)
        .map(|o| {
            let start = (o * s) as i64 - p as i64;
            let end = (start + ((k - 1) * d) as i64 + 1).min(len as i64);
            // Padded length (average pooling: d = 1): clipped at the right padding.
            let full = ((start + k as i64).min((len + p) as i64) - start) as usize;
            let mut first = start;
            if first < 0 {
                first += (-first).div_euclid(d as i64) * d as i64;
                if first < 0 {
                    first += d as i64;
                }
            }
            Win {
                start: first as usize,
                end: end.max(0) as usize,
                full,
            }
        })
        .collect()
}

/// Adaptive windows: `floor(i·len/out) .. ceil((i+1)·len/out)`.
fn adaptive_windows(len: usize, out: usize) -> Vec<Win> {
    (0..out)
        .map(|i| {
            let start = i * len / out;
            let end = ((i + 1) * len).div_ceil(out);
            Win {
                start,
                end,
                full: end - start,
            }
        })
        .collect()
}

/// Checks kernel/stride/dilation/padding and returns the windows along H and W.
#[allow(clippy::too_many_arguments)]
fn checked_windows(
    op: &str,
    shown: &Shape,
    pl: &Planes,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil: bool,
) -> (Vec<Win>, Vec<Win>) {
    assert!(
        kernel.0 > 0 && kernel.1 > 0 && stride.0 > 0 && stride.1 > 0,
        "{op}: kernel {kernel:?} and stride {stride:?} must be positive (input shape {shown})"
    );
    assert!(
        dilation.0 > 0 && dilation.1 > 0,
        "{op}: dilation {dilation:?} must be positive (input shape {shown})"
    );
    assert!(
        padding.0 <= kernel.0 / 2 && padding.1 <= kernel.1 / 2,
        "{op}: padding {padding:?} must be at most half the kernel {kernel:?} (input shape {shown})"
    );
    let oh = out_len(pl.h, kernel.0, stride.0, padding.0, dilation.0, ceil);
    let ow = out_len(pl.w, kernel.1, stride.1, padding.1, dilation.1, ceil);
    assert!(
        oh >= 1 && ow >= 1,
        "{op}: output size ({oh}, {ow}) is too small for input shape {shown} (kernel {kernel:?}, stride {stride:?}, padding {padding:?}, dilation {dilation:?})"
    );
    (
        windows(pl.h, oh as usize, kernel.0, stride.0, padding.0, dilation.0),
        windows(pl.w, ow as usize, kernel.1, stride.1, padding.1, dilation.1),
    )
}

// ---------------------------------------------------------------------- drivers

/// Runs `f(plane, a_plane, b_plane)` over the planes of `a` (`a_per` elements each) and `b`
/// (`b_per` each), on several threads when `work` reaches `PARALLEL_THRESHOLD`.
fn par_planes<A: Send, B: Send>(
    work: usize,
    a: &mut [A],
    a_per: usize,
    b: &mut [B],
    b_per: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let planes = a.len().checked_div(a_per).unwrap_or(0);
    if planes == 0 {
        return;
    }
    let threads = num_threads();
    if work < PARALLEL_THRESHOLD || threads == 1 || planes == 1 {
        for (p, (pa, pb)) in a.chunks_mut(a_per).zip(b.chunks_mut(b_per)).enumerate() {
            f(p, pa, pb);
        }
        return;
    }
    use rayon::prelude::*;
    let per_task = planes.div_ceil(threads * 4).max(1);
    install(|| {
        a.par_chunks_mut(per_task * a_per)
            .zip(b.par_chunks_mut(per_task * b_per))
            .enumerate()
            .for_each(|(t, (ca, cb))| {
                for (k, (pa, pb)) in ca.chunks_mut(a_per).zip(cb.chunks_mut(b_per)).enumerate() {
                    f(t * per_task + k, pa, pb);
                }
            });
    });
}

/// Sentinel argmax of a window that covers no input element.
const NO_INDEX: u32 = u32::MAX;

/// Max pooling of one `h × w` plane: value and in-plane index of each window's first maximum
/// (a NaN wins, as in torch).
fn max_plane<T: Float>(
    x: &[T],
    w: usize,
    rows: &[Win],
    cols: &[Win],
    (dh, dw): (usize, usize),
    out: &mut [T],
    idx: &mut [u32],
) {
    let ow = cols.len();
    for (oy, r) in rows.iter().enumerate() {
        let (orow, irow) = (
            &mut out[oy * ow..(oy + 1) * ow],
            &mut idx[oy * ow..(oy + 1) * ow],
        );
        for ((o, i), c) in orow.iter_mut().zip(irow.iter_mut()).zip(cols) {
            let mut best = T::neg_infinity();
            let mut at = NO_INDEX;
            if r.start < r.end && c.start < c.end {
                at = (r.start * w + c.start) as u32;
                let mut y = r.start;
                while y < r.end {
                    let line = &x[y * w..(y + 1) * w];
                    if dw == 1 {
                        for (xx, &v) in line[c.start..c.end].iter().enumerate() {
                            if v > best || v.is_nan() {
                                best = v;
                                at = (y * w + c.start + xx) as u32;
                            }
                        }
                    } else {
                        let mut xx = c.start;
                        while xx < c.end {
                            let v = line[xx];
                            if v > best || v.is_nan() {
                                best = v;
                                at = (y * w + xx) as u32;
                            }
                            xx += dw;
                        }
                    }
                    y += dh;
                }
            }
            *o = best;
            *i = at;
        }
    }
}

/// How an average window is divided.
#[derive(Debug, Clone, Copy)]
enum Divisor {
    /// The padded window size (`count_include_pad`).
    Padded,
    /// The number of input elements in the window (also adaptive pooling).
    Valid,
    /// A fixed divisor.
    Fixed(usize),
}

impl Divisor {
    #[inline]
    fn of(self, r: &Win, c: &Win) -> usize {
        match self {
            Divisor::Padded => r.full * c.full,
            Divisor::Valid => (r.end - r.start) * (c.end - c.start),
            Divisor::Fixed(d) => d,
        }
    }
}

/// Average pooling of one plane (dense windows; empty windows give 0 like torch).
fn avg_plane<T: Float>(x: &[T], w: usize, rows: &[Win], cols: &[Win], div: Divisor, out: &mut [T]) {
    let ow = cols.len();
    for (oy, r) in rows.iter().enumerate() {
        for (o, c) in out[oy * ow..(oy + 1) * ow].iter_mut().zip(cols) {
            if r.start >= r.end || c.start >= c.end {
                *o = T::zero();
                continue;
            }
            let mut sum = T::zero();
            for y in r.start..r.end {
                for &v in &x[y * w + c.start..y * w + c.end] {
                    sum += v;
                }
            }
            *o = sum / T::from_f64(div.of(r, c) as f64);
        }
    }
}

/// Backward of [`avg_plane`]: spreads each output gradient over its window.
fn avg_plane_backward<T: Float>(
    g: &[T],
    w: usize,
    rows: &[Win],
    cols: &[Win],
    div: Divisor,
    gi: &mut [T],
) {
    gi.fill(T::zero());
    let ow = cols.len();
    for (oy, r) in rows.iter().enumerate() {
        for (&go, c) in g[oy * ow..(oy + 1) * ow].iter().zip(cols) {
            if r.start >= r.end || c.start >= c.end {
                continue;
            }
            let v = go / T::from_f64(div.of(r, c) as f64);
            for y in r.start..r.end {
                for s in &mut gi[y * w + c.start..y * w + c.end] {
                    *s += v;
                }
            }
        }
    }
}

/// `x` as a contiguous tensor outside of any graph (the op records its own node on `x`).
fn contiguous_values(x: &Tensor) -> Tensor {
    let d = x.detach();
    if d.is_contiguous() {
        d
    } else {
        d.contiguous()
    }
}

// ---------------------------------------------------------------------- max pooling

/// Backward of max pooling: scatters each output gradient to its recorded argmax.
struct MaxPoolBackward {
    name: &'static str,
    idx: Buffer<u32>,
    plane_in: usize,
    plane_out: usize,
}

impl GradFn for MaxPoolBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let g = contiguous_values(g);
        let guard = g.storage();
        let storage = dispatch_float!(x.dtype(), self.name, |T| {
            let gv = &typed_slice!(guard, T, self.name)[g.layout().contiguous_range().unwrap()];
            let mut gi = Buffer::<T>::uninit(x.elem_count());
            let mut unit = vec![(); gi.len().checked_div(self.plane_in).unwrap_or(0)];
            let (pi, po) = (self.plane_in, self.plane_out);
            par_planes(
                gi.len() + gv.len(),
                &mut gi,
                pi,
                &mut unit,
                1,
                |p, gi, _| {
                    gi.fill(T::default());
                    let idx = &self.idx[p * po..(p + 1) * po];
                    for (&i, &v) in idx.iter().zip(&gv[p * po..(p + 1) * po]) {
                        if i != NO_INDEX {
                            gi[i as usize] += v;
                        }
                    }
                },
            );
            <T as crate::Element>::into_storage(gi)
        });
        drop(guard);
        vec![Some(Tensor::from_storage(
            storage,
            crate::Layout::contiguous(x.shape().clone()),
        ))]
    }
}

fn max_pool2d_impl(
    x: &Tensor,
    o: MaxPool2dOptions,
    op: &'static str,
    shown: &Shape,
    with_indices: bool,
) -> (Tensor, Option<Tensor>) {
    let pl = Planes::of(x, op, shown);
    let stride = o.stride.unwrap_or(o.kernel);
    let (rows, cols) = checked_windows(
        op,
        shown,
        &pl,
        o.kernel,
        stride,
        o.padding,
        o.dilation,
        o.ceil_mode,
    );
    let (oh, ow) = (rows.len(), cols.len());
    let (plane_in, plane_out) = (pl.h * pl.w, oh * ow);
    assert!(
        plane_in < NO_INDEX as usize,
        "{op}: planes of {plane_in} elements are too large (input shape {shown})"
    );
    let xc = contiguous_values(x);
    let guard = xc.storage();
    let mut idx = Buffer::<u32>::uninit(pl.planes * plane_out);
    let storage = dispatch_float!(x.dtype(), op, |T| {
        let xv = &typed_slice!(guard, T, op)[xc.layout().contiguous_range().unwrap()];
        let mut out = Buffer::<T>::uninit(pl.planes * plane_out);
        let work = xv.len() * o.kernel.0 * o.kernel.1 / (stride.0 * stride.1).max(1);
        par_planes(
            work.max(out.len()),
            &mut out,
            plane_out,
            &mut idx,
            plane_out,
            |p, out, idx| {
                let plane = &xv[p * plane_in..(p + 1) * plane_in];
                max_plane(plane, pl.w, &rows, &cols, o.dilation, out, idx);
            },
        );
        <T as crate::Element>::into_storage(out)
    });
    drop(guard);
    let shape = pl.out_shape(oh, ow);
    let indices = with_indices.then(|| {
        let v = Buffer::from_fn(idx.len(), |i| match idx[i] {
            NO_INDEX => -1i64,
            k => k as i64,
        });
        Tensor::from_buffer(v, shape.clone())
    });
    let out = Tensor::op_result(storage, shape, &[x], || MaxPoolBackward {
        name: op,
        idx,
        plane_in,
        plane_out,
    });
    (out, indices)
}

// ---------------------------------------------------------------------- average pooling

/// Backward of average (and adaptive average) pooling.
struct AvgPoolBackward {
    name: &'static str,
    rows: Vec<Win>,
    cols: Vec<Win>,
    div: Divisor,
    w: usize,
}

impl GradFn for AvgPoolBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let d = x.dims();
        let plane_in = d[d.len() - 2] * d[d.len() - 1];
        let plane_out = self.rows.len() * self.cols.len();
        let g = contiguous_values(g);
        let guard = g.storage();
        let storage = dispatch_float!(x.dtype(), self.name, |T| {
            let gv = &typed_slice!(guard, T, self.name)[g.layout().contiguous_range().unwrap()];
            let mut gi = Buffer::<T>::uninit(x.elem_count());
            let mut unit = vec![(); gi.len().checked_div(plane_in).unwrap_or(0)];
            par_planes(
                gi.len() + gv.len(),
                &mut gi,
                plane_in,
                &mut unit,
                1,
                |p, gi, _| {
                    let gp = &gv[p * plane_out..(p + 1) * plane_out];
                    avg_plane_backward(gp, self.w, &self.rows, &self.cols, self.div, gi);
                },
            );
            <T as crate::Element>::into_storage(gi)
        });
        drop(guard);
        vec![Some(Tensor::from_storage(
            storage,
            crate::Layout::contiguous(x.shape().clone()),
        ))]
    }
}

fn avg_pool_windows(
    x: &Tensor,
    pl: Planes,
    rows: Vec<Win>,
    cols: Vec<Win>,
    div: Divisor,
    op: &'static str,
) -> Tensor {
    let (oh, ow) = (rows.len(), cols.len());
    let (plane_in, plane_out) = (pl.h * pl.w, oh * ow);
    let xc = contiguous_values(x);
    let guard = xc.storage();
    let storage = dispatch_float!(x.dtype(), op, |T| {
        let xv = &typed_slice!(guard, T, op)[xc.layout().contiguous_range().unwrap()];
        let mut out = Buffer::<T>::uninit(pl.planes * plane_out);
        let mut unit = vec![(); pl.planes];
        par_planes(
            xv.len() + out.len(),
            &mut out,
            plane_out,
            &mut unit,
            1,
            |p, out, _| {
                let plane = &xv[p * plane_in..(p + 1) * plane_in];
                avg_plane(plane, pl.w, &rows, &cols, div, out);
            },
        );
        <T as crate::Element>::into_storage(out)
    });
    drop(guard);
    let w = pl.w;
    Tensor::op_result(storage, pl.out_shape(oh, ow), &[x], || AvgPoolBackward {
        name: op,
        rows,
        cols,
        div,
        w,
    })
}

fn avg_pool2d_impl(x: &Tensor, o: AvgPool2dOptions, op: &'static str, shown: &Shape) -> Tensor {
    let pl = Planes::of(x, op, shown);
    let stride = o.stride.unwrap_or(o.kernel);
    let (rows, cols) = checked_windows(
        op,
        shown,
        &pl,
        o.kernel,
        stride,
        o.padding,
        (1, 1),
        o.ceil_mode,
    );
    let div = match o.divisor_override {
        Some(d) => {
            assert!(
                d > 0,
                "{op}: divisor_override must be non-zero (input shape {shown})"
            );
            Divisor::Fixed(d)
        }
        None if o.count_include_pad => Divisor::Padded,
        None => Divisor::Valid,
    };
    avg_pool_windows(x, pl, rows, cols, div, op)
}

/// Adds a unit height to a 1-D pooling input (`[N, C, L]` → `[N, C, 1, L]`).
fn lift_1d(x: &Tensor, op: &str) -> Tensor {
    assert!(
        x.rank() == 2 || x.rank() == 3,
        "{op}: expected a batched or unbatched input ([N, C, L] or [C, L]), got shape {}",
        x.shape()
    );
    x.unsqueeze(-2i32)
}

impl Tensor {
    /// 2-D max pooling of `[N, C, H, W]` or `[C, H, W]` (torch's `F.max_pool2d`).
    pub fn max_pool2d(&self, opts: MaxPool2dOptions) -> Tensor {
        max_pool2d_impl(self, opts, "max_pool2d", self.shape(), false).0
    }

    /// [`Tensor::max_pool2d`] and the i64 in-plane index (`h·W + w`) of each maximum, like
    /// `F.max_pool2d(.., return_indices=True)`.
    pub fn max_pool2d_with_indices(&self, opts: MaxPool2dOptions) -> (Tensor, Tensor) {
        let (out, idx) = max_pool2d_impl(self, opts, "max_pool2d", self.shape(), true);
        (out, idx.expect("indices requested"))
    }

    /// 2-D average pooling of `[N, C, H, W]` or `[C, H, W]` (torch's `F.avg_pool2d`).
    pub fn avg_pool2d(&self, opts: AvgPool2dOptions) -> Tensor {
        avg_pool2d_impl(self, opts, "avg_pool2d", self.shape())
    }

    /// Adaptive average pooling to `output_size` (height, width) of `[N, C, H, W]` or
    /// `[C, H, W]`, with torch's `floor(i·H/out) .. ceil((i+1)·H/out)` windows.
    pub fn adaptive_avg_pool2d(&self, output_size: impl IntoPair) -> Tensor {
        let op = "adaptive_avg_pool2d";
        let (oh, ow) = output_size.into_pair();
        let pl = Planes::of(self, op, self.shape());
        assert!(
            oh >= 1 && ow >= 1,
            "{op}: output size ({oh}, {ow}) must be positive (input shape {})",
            self.shape()
        );
        assert!(
            pl.h >= 1 && pl.w >= 1,
            "{op}: input shape {} has an empty spatial dim",
            self.shape()
        );
        let rows = adaptive_windows(pl.h, oh);
        let cols = adaptive_windows(pl.w, ow);
        avg_pool_windows(self, pl, rows, cols, Divisor::Valid, op)
    }

    /// 1-D max pooling of `[N, C, L]` or `[C, L]` (torch's `F.max_pool1d`).
    pub fn max_pool1d(&self, opts: MaxPool1dOptions) -> Tensor {
        let op = "max_pool1d";
        let x = lift_1d(self, op);
        max_pool2d_impl(&x, opts.to_2d(), op, self.shape(), false)
            .0
            .squeeze(-2i32)
    }

    /// 1-D average pooling of `[N, C, L]` or `[C, L]` (torch's `F.avg_pool1d`).
    pub fn avg_pool1d(&self, opts: AvgPool1dOptions) -> Tensor {
        let op = "avg_pool1d";
        let x = lift_1d(self, op);
        avg_pool2d_impl(&x, opts.to_2d(), op, self.shape()).squeeze(-2i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::DType;

    /// Naive reference: every window enumerated in padded coordinates; windows are kept while
    /// they fit in the padded input, or (ceil mode) while the previous one stopped short of its
    /// end and the window starts inside the input or the left padding.
    fn ref_windows(len: usize, k: usize, s: usize, p: usize, d: usize, ceil: bool) -> Vec<i64> {
        let (padded, eff) = (len + 2 * p, d * (k - 1) + 1);
        let mut starts = Vec::new();
        for i in 0.. {
            let st = i * s;
            let keep = if ceil {
                st + eff < padded + s && st < len + p
            } else {
                st + eff <= padded
            };
            if !keep {
                break;
            }
            starts.push(st as i64 - p as i64);
        }
        starts
    }

    /// Reference max (value, in-plane index of the first maximum) or average of `[P, H, W]`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f64],
        (pn, h, w): (usize, usize, usize),
        k: (usize, usize),
        s: (usize, usize),
        p: (usize, usize),
        d: (usize, usize),
        ceil: bool,
        max: bool,
        include_pad: bool,
    ) -> (Vec<f64>, Vec<i64>, usize, usize) {
        let ys = ref_windows(h, k.0, s.0, p.0, d.0, ceil);
        let xs = ref_windows(w, k.1, s.1, p.1, d.1, ceil);
        let (mut out, mut idx) = (Vec::new(), Vec::new());
        for pl in 0..pn {
            for &y0 in &ys {
                for &x0 in &xs {
                    let (mut best, mut at, mut sum, mut valid, mut padded) =
                        (f64::NEG_INFINITY, -1i64, 0.0, 0usize, 0usize);
                    for i in 0..k.0 {
                        for j in 0..k.1 {
                            let (y, xx) = (y0 + (i * d.0) as i64, x0 + (j * d.1) as i64);
                            if y < h as i64 + p.0 as i64 && xx < w as i64 + p.1 as i64 {
                                padded += 1;
                            }
                            if y < 0 || xx < 0 || y >= h as i64 || xx >= w as i64 {
                                continue;
                            }
                            let v = x[pl * h * w + y as usize * w + xx as usize];
                            valid += 1;
                            sum += v;
                            if v > best {
                                best = v;
                                at = y * w as i64 + xx;
                            }
                        }
                    }
                    if max {
                        out.push(best);
                        idx.push(at);
                    } else {
                        out.push(sum / if include_pad { padded } else { valid } as f64);
                    }
                }
            }
        }
        (out, idx, ys.len(), xs.len())
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    type Cfg = (
        (usize, usize),
        (usize, usize),
        (usize, usize),
        (usize, usize),
        bool,
    );

    fn configs() -> Vec<Cfg> {
        vec![
            ((2, 2), (2, 2), (0, 0), (1, 1), false),
            ((3, 3), (1, 1), (1, 1), (1, 1), false),
            ((3, 2), (2, 1), (1, 0), (1, 1), true),
            ((3, 3), (2, 2), (1, 1), (1, 1), true),
            ((2, 3), (3, 2), (0, 1), (2, 1), true),
            ((3, 3), (2, 3), (1, 0), (2, 2), false),
            ((4, 4), (3, 3), (2, 2), (1, 1), true),
        ]
    }

    #[test]
    fn forward_matches_naive_reference() {
        let dims = (2usize, 3usize, 7usize, 8usize);
        let x = randn_f64(&[dims.0, dims.1, dims.2, dims.3], 1);
        let xv = x.to_vec::<f64>();
        let geo = (dims.0 * dims.1, dims.2, dims.3);
        for (k, s, p, d, ceil) in configs() {
            let o = MaxPool2dOptions::new(k)
                .stride(s)
                .padding(p)
                .dilation(d)
                .ceil_mode(ceil);
            let (want, want_idx, oh, ow) = reference(&xv, geo, k, s, p, d, ceil, true, true);
            let (got, idx) = x.max_pool2d_with_indices(o);
            assert_eq!(got.dims(), &[2, 3, oh, ow], "{o:?}");
            assert_eq!(max_diff(&got.to_vec::<f64>(), &want), 0.0, "{o:?}");
            assert_eq!(idx.to_vec::<i64>(), want_idx, "{o:?}");
            // f32 agrees too.
            let g32 = x.to_dtype(DType::F32).max_pool2d(o);
            assert!(max_diff(&g32.to_f64_vec(), &want) < 1e-6);
            if d == (1, 1) {
                for include in [true, false] {
                    let o = AvgPool2dOptions::new(k)
                        .stride(s)
                        .padding(p)
                        .ceil_mode(ceil)
                        .count_include_pad(include);
                    let (want, _, oh, ow) = reference(&xv, geo, k, s, p, d, ceil, false, include);
                    let got = x.avg_pool2d(o);
                    assert_eq!(got.dims(), &[2, 3, oh, ow], "{o:?}");
                    assert!(max_diff(&got.to_vec::<f64>(), &want) < 1e-12, "{o:?}");
                    let g32 = x.to_dtype(DType::F32).avg_pool2d(o);
                    assert!(max_diff(&g32.to_f64_vec(), &want) < 1e-5, "{o:?}");
                }
            }
        }
        // divisor_override divides every window by the given number.
        let got = x.avg_pool2d(AvgPool2dOptions::new(3).padding(1).divisor_override(4));
        let (sum9, _, _, _) =
            reference(&xv, geo, (3, 3), (3, 3), (1, 1), (1, 1), false, false, true);
        let want: Vec<f64> = sum9.iter().map(|v| v * 9.0 / 4.0).collect();
        assert!(max_diff(&got.to_vec::<f64>(), &want) < 1e-12);
    }

    #[test]
    fn one_d_and_unbatched_inputs_match_the_2d_reference() {
        let x = randn_f64(&[2, 3, 11], 2);
        let xv = x.to_vec::<f64>();
        let geo = (6, 1, 11);
        for (k, s, p, d, ceil) in [(3, 2, 1, 1, true), (4, 3, 2, 2, false), (2, 2, 0, 1, false)] {
            let o = MaxPool1dOptions::new(k)
                .stride(s)
                .padding(p)
                .dilation(d)
                .ceil_mode(ceil);
            let (want, _, _, ol) =
                reference(&xv, geo, (1, k), (1, s), (0, p), (1, d), ceil, true, true);
            let got = x.max_pool1d(o);
            assert_eq!(got.dims(), &[2, 3, ol]);
            assert_eq!(max_diff(&got.to_vec::<f64>(), &want), 0.0);
            // Unbatched [C, L].
            let x2 = x.reshape([6, 11]);
            assert_eq!(x2.max_pool1d(o).to_vec::<f64>(), got.to_vec::<f64>());
            let o = AvgPool1dOptions::new(k)
                .stride(s)
                .padding(p)
                .ceil_mode(ceil)
                .count_include_pad(false);
            let (want, _, _, _) =
                reference(&xv, geo, (1, k), (1, s), (0, p), (1, 1), ceil, false, false);
            assert!(max_diff(&x.avg_pool1d(o).to_vec::<f64>(), &want) < 1e-12);
        }
        // Unbatched [C, H, W] equals the batched result of one image.
        let x = randn_f64(&[3, 6, 5], 3);
        let o = MaxPool2dOptions::new(3).stride(2).padding(1);
        let a = x.max_pool2d(o);
        assert_eq!(a.dims(), &[3, 3, 3]);
        assert_eq!(
            a.to_vec::<f64>(),
            x.unsqueeze(0).max_pool2d(o).to_vec::<f64>()
        );
    }

    #[test]
    fn adaptive_windows_follow_torch() {
        let x = randn_f64(&[2, 2, 7, 5], 4);
        let xv = x.to_vec::<f64>();
        for (oh, ow) in [(3, 2), (1, 1), (7, 5), (4, 4), (9, 6)] {
            let got = x.adaptive_avg_pool2d((oh, ow));
            assert_eq!(got.dims(), &[2, 2, oh, ow]);
            let mut want = Vec::new();
            for p in 0..4 {
                for i in 0..oh {
                    let (y0, y1) = (
                        (i as f64 * 7.0 / oh as f64).floor() as usize,
                        ((i + 1) as f64 * 7.0 / oh as f64).ceil() as usize,
                    );
                    for j in 0..ow {
                        let (x0, x1) = (
                            (j as f64 * 5.0 / ow as f64).floor() as usize,
                            ((j + 1) as f64 * 5.0 / ow as f64).ceil() as usize,
                        );
                        let mut s = 0.0;
                        for y in y0..y1 {
                            for xx in x0..x1 {
                                s += xv[p * 35 + y * 5 + xx];
                            }
                        }
                        want.push(s / ((y1 - y0) * (x1 - x0)) as f64);
                    }
                }
            }
            assert!(max_diff(&got.to_vec::<f64>(), &want) < 1e-12, "{oh}x{ow}");
        }
    }

    #[test]
    fn ties_go_to_the_first_maximum_and_nan_propagates() {
        let x = Tensor::ones([1, 1, 3, 3])
            .to_dtype(DType::F64)
            .requires_grad();
        let y = x.max_pool2d(MaxPool2dOptions::new(2).stride(1));
        y.sum_all().backward();
        // Windows start at (0,0), (0,1), (1,0), (1,1): each takes its top-left element.
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        );
        let x = Tensor::from_slice(&[1f32, f32::NAN, 3.0, 2.0], [1, 1, 2, 2]);
        assert!(x.max_pool2d(MaxPool2dOptions::new(2)).item().is_nan());
    }

    #[test]
    fn gradcheck_all_pools_with_overlap_padding_ceil_and_non_contiguous_input() {
        // [N, C, W, H] transposed to [N, C, H, W]: a non-contiguous input.
        let x = randn_f64(&[2, 2, 6, 7], 5).requires_grad();
        let view = |t: &Tensor| t.transpose(2, 3);
        for (k, s, p, d, ceil) in configs() {
            let o = MaxPool2dOptions::new(k)
                .stride(s)
                .padding(p)
                .dilation(d)
                .ceil_mode(ceil);
            gradcheck(|t| view(&t[0]).max_pool2d(o), std::slice::from_ref(&x)).unwrap();
            if d == (1, 1) {
                for include in [true, false] {
                    let o = AvgPool2dOptions::new(k)
                        .stride(s)
                        .padding(p)
                        .ceil_mode(ceil)
                        .count_include_pad(include);
                    gradcheck(|t| view(&t[0]).avg_pool2d(o), std::slice::from_ref(&x)).unwrap();
                }
            }
        }
        for size in [(3, 4), (5, 3), (1, 1), (9, 8)] {
            gradcheck(
                |t| view(&t[0]).adaptive_avg_pool2d(size),
                std::slice::from_ref(&x),
            )
            .unwrap();
        }
        let x1 = randn_f64(&[9, 2, 3], 6).requires_grad();
        let o = MaxPool1dOptions::new(3)
            .stride(2)
            .padding(1)
            .ceil_mode(true);
        gradcheck(
            |t| t[0].permute(&[1, 2, 0]).max_pool1d(o),
            std::slice::from_ref(&x1),
        )
        .unwrap();
        let o = AvgPool1dOptions::new(4)
            .stride(3)
            .padding(2)
            .ceil_mode(true)
            .count_include_pad(false);
        gradcheck(|t| t[0].permute(&[1, 2, 0]).avg_pool1d(o), &[x1]).unwrap();
    }

    #[test]
    fn large_inputs_split_planes_across_threads() {
        let x = Tensor::randn([4, 16, 40, 40], 7)
            .to_dtype(DType::F64)
            .requires_grad();
        let xv = x.to_vec::<f64>();
        let geo = (64, 40, 40);
        let o = MaxPool2dOptions::new(3)
            .stride(2)
            .padding(1)
            .ceil_mode(true);
        let (want, _, _, _) = reference(&xv, geo, (3, 3), (2, 2), (1, 1), (1, 1), true, true, true);
        let y = x.max_pool2d(o);
        assert_eq!(max_diff(&y.to_vec::<f64>(), &want), 0.0);
        // The gradient is a scatter of ones: each input gets the number of windows it won.
        y.sum_all().backward();
        let g = x.grad().unwrap();
        assert_eq!(g.sum_all().item(), y.elem_count() as f64);
        x.zero_grad();
        let o = AvgPool2dOptions::new(3).stride(2).padding(1);
        let (want, _, _, _) =
            reference(&xv, geo, (3, 3), (2, 2), (1, 1), (1, 1), false, false, true);
        let y = x.avg_pool2d(o);
        assert!(max_diff(&y.to_vec::<f64>(), &want) < 1e-12);
        // Sum of gradients = Σ over windows of (valid elements / divisor).
        y.sum_all().backward();
        let (counts, _, _, _) = reference(
            &vec![1.0; xv.len()],
            geo,
            (3, 3),
            (2, 2),
            (1, 1),
            (1, 1),
            false,
            false,
            true,
        );
        let want_total: f64 = counts.iter().sum();
        let got_total = x.grad().unwrap().sum_all().item();
        assert!(
            (got_total - want_total).abs() < 1e-12 * want_total,
            "{got_total} vs {want_total}"
        );
    }

    #[test]
    #[should_panic(expected = "max_pool2d: padding (2, 1) must be at most half the kernel (3, 3)")]
    fn padding_over_half_the_kernel_panics() {
        let _ = Tensor::zeros([1, 1, 8, 8]).max_pool2d(MaxPool2dOptions::new(3).padding((2, 1)));
    }

    #[test]
    #[should_panic(
        expected = "avg_pool2d: output size (0, 2) is too small for input shape [1, 2, 2, 5]"
    )]
    fn output_size_below_one_panics() {
        let _ = Tensor::zeros([1, 2, 2, 5]).avg_pool2d(AvgPool2dOptions::new(3).stride(2));
    }

    #[test]
    #[should_panic(
        expected = "max_pool1d: expected a batched or unbatched input ([N, C, L] or [C, L]), got shape [4]"
    )]
    fn wrong_rank_panics_1d() {
        let _ = Tensor::zeros([4]).max_pool1d(MaxPool1dOptions::new(2));
    }

    #[test]
    #[should_panic(
        expected = "adaptive_avg_pool2d: expected a batched or unbatched input ([N, C, H, W] or [C, H, W]), got shape [3, 4]"
    )]
    fn wrong_rank_panics_2d() {
        let _ = Tensor::zeros([3, 4]).adaptive_avg_pool2d(2);
    }

    #[test]
    #[should_panic(expected = "max_pool2d: expected a float tensor (f32 or f64), got i64")]
    fn integer_input_panics() {
        let _ = Tensor::zeros([1, 1, 2, 2])
            .to_dtype(DType::I64)
            .max_pool2d(MaxPool2dOptions::default());
    }
}
