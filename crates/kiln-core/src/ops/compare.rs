//! Comparisons that return masks (`eq`, `ne`, `lt`, `le`, `gt`, `ge` and their `_scalar`
//! forms), selection (`where_cond`, `masked_fill`) and the elementwise `maximum` / `minimum`,
//! all with NumPy broadcasting; plus the multi-operand broadcast drivers `zip2` / `zip3` /
//! `zip4` (operands of different dtypes) that these ops and `pow` use.
//!
//! There is no bool dtype: **a mask is a U32 tensor of 0 (false) and 1 (true)**. Comparisons
//! never record graph nodes. Ops that take a mask accept it in any dtype and read every
//! nonzero element (NaN included) as true.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dtype::{DType, Element};
use crate::layout::Layout;
use crate::ops::kernels::{map, zip_map};
use crate::parallel::{for_each_chunk, num_threads, PARALLEL_THRESHOLD};
use crate::shape::{DimVec, Shape};
use crate::tensor::Tensor;
use crate::{dispatch_dtype, dispatch_float, typed_slice};
use smallvec::SmallVec;

// ---------------------------------------------------------------------- broadcast drivers

/// Walks `shape` over `K` operand layouts (each already broadcast to `shape`), calling
/// `row(out_run, starts, steps)` for consecutive runs of the output: `starts[k]` is the
/// storage offset of operand `k` at the run's first element and `steps[k]` its stride along
/// the run. Dims are merged jointly first (fewest runs); contiguous operands take one pass in
/// chunks; large outputs are split across threads.
fn walk_runs<const K: usize, U: Send>(
    shape: &Shape,
    layouts: [&Layout; K],
    out: &mut [U],
    row: impl Fn(&mut [U], [usize; K], [usize; K]) + Sync,
) {
    let n = out.len();
    if n == 0 {
        return;
    }
    // Fast path: every operand contiguous with the output's shape.
    if layouts.iter().all(|l| l.is_contiguous()) {
        let starts: [usize; K] = std::array::from_fn(|k| layouts[k].offset());
        for_each_chunk(out, |s, chunk| {
            row(chunk, std::array::from_fn(|k| starts[k] + s), [1; K])
        });
        return;
    }

    let mut dims = DimVec::new();
    let mut strides: SmallVec<[[usize; K]; 6]> = SmallVec::new();
    for (i, &d) in shape.dims().iter().enumerate() {
        if d == 1 {
            continue;
        }
        let s: [usize; K] = std::array::from_fn(|k| layouts[k].strides()[i]);
        if let (Some(ld), Some(ls)) = (dims.last_mut(), strides.last_mut()) {
            if (0..K).all(|k| ls[k] == s[k] * d) {
                *ld *= d;
                *ls = s;
                continue;
            }
        }
        dims.push(d);
        strides.push(s);
    }
    if dims.is_empty() {
        dims.push(1);
        strides.push([1; K]);
    }
    let r = dims.len();
    let inner = dims[r - 1];
    let steps = strides[r - 1];
    let base: [usize; K] = std::array::from_fn(|k| layouts[k].offset());
    let rows = n / inner;

    let run = |row0: usize, out_rows: &mut [U]| {
        let mut idx = DimVec::from_elem(0, r - 1);
        let mut rem = row0;
        for d in (0..r - 1).rev() {
            idx[d] = rem % dims[d];
            rem /= dims[d];
        }
        let mut p: [usize; K] = std::array::from_fn(|k| {
            base[k] + (0..r - 1).map(|d| idx[d] * strides[d][k]).sum::<usize>()
        });
        for o in out_rows.chunks_mut(inner) {
            row(o, p, steps);
            // Advance the odometer over the outer dims.
            for d in (0..r - 1).rev() {
                idx[d] += 1;
                for k in 0..K {
                    p[k] += strides[d][k];
                }
                if idx[d] < dims[d] {
                    break;
                }
                for k in 0..K {
                    p[k] -= strides[d][k] * dims[d];
                }
                idx[d] = 0;
            }
        }
    };

    if n >= PARALLEL_THRESHOLD && num_threads() > 1 && rows > 1 {
        let rows_per_task = rows.div_ceil(num_threads() * 4).max(1);
        crate::parallel::for_chunks(out, rows_per_task * inner, true, |i, chunk| {
            run(i * rows_per_task, chunk)
        });
    } else {
        run(0, out);
    }
}

/// `f(a, b)` elementwise over `shape` (both operands broadcast to it; their dtypes may
/// differ), as a contiguous buffer. Panics naming `op` on a dtype or broadcast mismatch.
pub(crate) fn zip2<A: Element, B: Element, U: Element>(
    a: &Tensor,
    b: &Tensor,
    shape: &Shape,
    op: &str,
    f: impl Fn(A, B) -> U + Sync,
) -> Buffer<U> {
    let (ga, gb) = (a.storage(), b.storage());
    let (sa, sb) = (typed_slice!(ga, A, op), typed_slice!(gb, B, op));
    let la = a.layout().broadcast_as(shape, op);
    let lb = b.layout().broadcast_as(shape, op);
    let mut out = Buffer::<U>::uninit(shape.elem_count());
    walk_runs(shape, [&la, &lb], &mut out, |o, p, s| {
        let n = o.len();
        if s == [1, 1] {
            let (xa, xb) = (&sa[p[0]..p[0] + n], &sb[p[1]..p[1] + n]);
            for ((o, &x), &y) in o.iter_mut().zip(xa).zip(xb) {
                *o = f(x, y);
            }
        } else {
            for (k, o) in o.iter_mut().enumerate() {
                *o = f(sa[p[0] + k * s[0]], sb[p[1] + k * s[1]]);
            }
        }
    });
    out
}

/// `f(a, b, c)` elementwise over `shape` (all three broadcast to it; dtypes may differ).
pub(crate) fn zip3<A: Element, B: Element, C: Element, U: Element>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    shape: &Shape,
    op: &str,
    f: impl Fn(A, B, C) -> U + Sync,
) -> Buffer<U> {
    let (ga, gb, gc) = (a.storage(), b.storage(), c.storage());
    let (sa, sb, sc) = (
        typed_slice!(ga, A, op),
        typed_slice!(gb, B, op),
        typed_slice!(gc, C, op),
    );
    let la = a.layout().broadcast_as(shape, op);
    let lb = b.layout().broadcast_as(shape, op);
    let lc = c.layout().broadcast_as(shape, op);
    let mut out = Buffer::<U>::uninit(shape.elem_count());
    walk_runs(shape, [&la, &lb, &lc], &mut out, |o, p, s| {
        let n = o.len();
        if s == [1, 1, 1] {
            let (xa, xb, xc) = (
                &sa[p[0]..p[0] + n],
                &sb[p[1]..p[1] + n],
                &sc[p[2]..p[2] + n],
            );
            for (((o, &x), &y), &z) in o.iter_mut().zip(xa).zip(xb).zip(xc) {
                *o = f(x, y, z);
            }
        } else {
            for (k, o) in o.iter_mut().enumerate() {
                *o = f(
                    sa[p[0] + k * s[0]],
                    sb[p[1] + k * s[1]],
                    sc[p[2] + k * s[2]],
                );
            }
        }
    });
    out
}

/// `f(a, b, c, d)` elementwise over `shape` (all four broadcast to it; dtypes may differ).
pub(crate) fn zip4<A: Element, B: Element, C: Element, D: Element, U: Element>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    shape: &Shape,
    op: &str,
    f: impl Fn(A, B, C, D) -> U + Sync,
) -> Buffer<U> {
    let (ga, gb, gc, gd) = (a.storage(), b.storage(), c.storage(), d.storage());
    let (sa, sb, sc, sd) = (
        typed_slice!(ga, A, op),
        typed_slice!(gb, B, op),
        typed_slice!(gc, C, op),
        typed_slice!(gd, D, op),
    );
    let la = a.layout().broadcast_as(shape, op);
    let lb = b.layout().broadcast_as(shape, op);
    let lc = c.layout().broadcast_as(shape, op);
    let ld = d.layout().broadcast_as(shape, op);
    let mut out = Buffer::<U>::uninit(shape.elem_count());
    walk_runs(shape, [&la, &lb, &lc, &ld], &mut out, |o, p, s| {
        let n = o.len();
        if s == [1, 1, 1, 1] {
            let (xa, xb, xc, xd) = (
                &sa[p[0]..p[0] + n],
                &sb[p[1]..p[1] + n],
                &sc[p[2]..p[2] + n],
                &sd[p[3]..p[3] + n],
            );
            for ((((o, &x), &y), &z), &w) in o.iter_mut().zip(xa).zip(xb).zip(xc).zip(xd) {
                *o = f(x, y, z, w);
            }
        } else {
            for (k, o) in o.iter_mut().enumerate() {
                *o = f(
                    sa[p[0] + k * s[0]],
                    sb[p[1] + k * s[1]],
                    sc[p[2] + k * s[2]],
                    sd[p[3] + k * s[3]],
                );
            }
        }
    });
    out
}

/// True when `from` broadcasts to exactly `to` (NumPy rules).
fn broadcasts_to(from: &Shape, to: &Shape) -> bool {
    let (r, rt) = (from.rank(), to.rank());
    r <= rt
        && from
            .dims()
            .iter()
            .zip(&to.dims()[rt - r..])
            .all(|(&f, &t)| f == t || f == 1)
}

/// The NumPy broadcast of the shapes of `where_cond`'s three operands.
fn broadcast3(m: &Shape, a: &Shape, b: &Shape) -> Shape {
    if m == a && a == b {
        return a.clone();
    }
    let r = m.rank().max(a.rank()).max(b.rank());
    let dim = |s: &Shape, i: usize| {
        if i + s.rank() >= r {
            s.dims()[i + s.rank() - r]
        } else {
            1
        }
    };
    let mut out = DimVec::from_elem(1, r);
    for (i, o) in out.iter_mut().enumerate() {
        for d in [dim(m, i), dim(a, i), dim(b, i)] {
            if d != 1 {
                assert!(
                    *o == 1 || *o == d,
                    "where_cond: shapes {m} (mask), {a} (on_true) and {b} (on_false) cannot be broadcast together"
                );
                *o = d;
            }
        }
    }
    Shape::from(out)
}

// ---------------------------------------------------------------------- comparisons

/// Which comparison a mask op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn name(self) -> &'static str {
        match self {
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
            Cmp::Lt => "lt",
            Cmp::Le => "le",
            Cmp::Gt => "gt",
            Cmp::Ge => "ge",
        }
    }

    fn scalar_name(self) -> &'static str {
        match self {
            Cmp::Eq => "eq_scalar",
            Cmp::Ne => "ne_scalar",
            Cmp::Lt => "lt_scalar",
            Cmp::Le => "le_scalar",
            Cmp::Gt => "gt_scalar",
            Cmp::Ge => "ge_scalar",
        }
    }
}

fn compare(a: &Tensor, b: &Tensor, op: Cmp) -> Tensor {
    let name = op.name();
    let (buf, shape) = dispatch_dtype!(a.dtype(), |T| match op {
        Cmp::Eq => zip_map::<T, u32>(a, b, name, |x, y| (x == y) as u32),
        Cmp::Ne => zip_map::<T, u32>(a, b, name, |x, y| (x != y) as u32),
        Cmp::Lt => zip_map::<T, u32>(a, b, name, |x, y| (x < y) as u32),
        Cmp::Le => zip_map::<T, u32>(a, b, name, |x, y| (x <= y) as u32),
        Cmp::Gt => zip_map::<T, u32>(a, b, name, |x, y| (x > y) as u32),
        Cmp::Ge => zip_map::<T, u32>(a, b, name, |x, y| (x >= y) as u32),
    });
    Tensor::from_buffer(buf, shape)
}

/// Mask of `x op c` for every element `x` of `t`.
fn compare_with<T: Element>(t: &Tensor, op: Cmp, c: T) -> Buffer<u32> {
    let name = op.scalar_name();
    match op {
        Cmp::Eq => map::<T, u32>(t, name, |x| (x == c) as u32),
        Cmp::Ne => map::<T, u32>(t, name, |x| (x != c) as u32),
        Cmp::Lt => map::<T, u32>(t, name, |x| (x < c) as u32),
        Cmp::Le => map::<T, u32>(t, name, |x| (x <= c) as u32),
        Cmp::Gt => map::<T, u32>(t, name, |x| (x > c) as u32),
        Cmp::Ge => map::<T, u32>(t, name, |x| (x >= c) as u32),
    }
}

/// An integer comparison against the real number `s`, rewritten exactly as a comparison
/// against an integer in `[lo, hi)` (the dtype's range), or as a constant when every element
/// compares the same way (NaN, infinities, out-of-range or non-integral `s` for `eq`/`ne`).
enum IntThreshold {
    Const(bool),
    Cmp(Cmp, f64),
}

fn int_threshold(op: Cmp, s: f64, lo: f64, hi: f64) -> IntThreshold {
    use IntThreshold::{Cmp as C, Const};
    if s.is_nan() {
        return Const(op == Cmp::Ne);
    }
    let in_range = |v: f64| (lo..hi).contains(&v);
    match op {
        Cmp::Eq | Cmp::Ne => {
            if s.fract() == 0.0 && in_range(s) {
                C(op, s)
            } else {
                Const(op == Cmp::Ne)
            }
        }
        // For integers x: x < s <=> x < ceil(s), x >= s <=> x >= ceil(s).
        Cmp::Lt | Cmp::Ge => {
            let c = s.ceil();
            if c < lo {
                Const(op == Cmp::Ge)
            } else if c >= hi {
                Const(op == Cmp::Lt)
            } else {
                C(op, c)
            }
        }
        // x <= s <=> x <= floor(s), x > s <=> x > floor(s).
        Cmp::Le | Cmp::Gt => {
            let f = s.floor();
            if f < lo {
                Const(op == Cmp::Gt)
            } else if f >= hi {
                Const(op == Cmp::Le)
            } else {
                C(op, f)
            }
        }
    }
}

fn int_compare<T: Element>(t: &Tensor, op: Cmp, s: f64, lo: f64, hi: f64) -> Buffer<u32> {
    match int_threshold(op, s, lo, hi) {
        IntThreshold::Const(v) => Buffer::filled(t.elem_count(), v as u32),
        // `c` is an integer inside T's range, so the conversion is exact.
        IntThreshold::Cmp(op, c) => compare_with::<T>(t, op, T::from_f64(c)),
    }
}

fn compare_scalar(t: &Tensor, s: f64, op: Cmp) -> Tensor {
    const I64_BOUND: f64 = 9_223_372_036_854_775_808.0; // 2^63
    let buf = match t.dtype() {
        // Float tensors compare in their own precision (the scalar is rounded to the dtype).
        DType::F32 => compare_with::<f32>(t, op, s as f32),
        DType::F64 => compare_with::<f64>(t, op, s),
        // Integer tensors compare exactly against the real value of `s`.
        DType::I64 => int_compare::<i64>(t, op, s, -I64_BOUND, I64_BOUND),
        DType::U32 => int_compare::<u32>(t, op, s, 0.0, 4_294_967_296.0),
    };
    Tensor::from_buffer(buf, t.shape().clone())
}

// ---------------------------------------------------------------------- selection

/// `g` where the mask is nonzero (`keep_true`) or zero (`!keep_true`), 0 elsewhere, with the
/// mask broadcast to `g`'s shape: the gradient of a selection.
fn select_grad(mask: &Tensor, g: &Tensor, keep_true: bool, op: &str) -> Tensor {
    let shape = g.shape().clone();
    let storage = dispatch_dtype!(mask.dtype(), |M| {
        dispatch_float!(g.dtype(), op, |T| {
            let (mz, tz) = (
                <M as num_traits::Zero>::zero(),
                <T as num_traits::Zero>::zero(),
            );
            let buf = if keep_true {
                zip2::<M, T, T>(mask, g, &shape, op, |m, v| if m != mz { v } else { tz })
            } else {
                zip2::<M, T, T>(mask, g, &shape, op, |m, v| if m != mz { tz } else { v })
            };
            <T as Element>::into_storage(buf)
        })
    });
    Tensor::from_storage(storage, Layout::contiguous(shape))
}

/// Backward of `where_cond`. The mask is held here, detached, rather than recorded as an
/// input: it never takes part in the graph, even when it is a float tensor that tracks grad.
struct WhereBackward {
    mask: Tensor,
}

impl GradFn for WhereBackward {
    fn name(&self) -> &'static str {
        "where_cond"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (mask, x, y) = (&self.mask, &inputs[0], &inputs[1]);
        let op = "where_cond_backward";
        vec![
            x.tracks_grad()
                .then(|| select_grad(mask, g, true, op).sum_to(x.shape())),
            y.tracks_grad()
                .then(|| select_grad(mask, g, false, op).sum_to(y.shape())),
        ]
    }
}

/// Backward of `masked_fill`; holds the mask detached, like [`WhereBackward`].
struct MaskedFillBackward {
    mask: Tensor,
}

impl GradFn for MaskedFillBackward {
    fn name(&self) -> &'static str {
        "masked_fill"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        vec![x
            .tracks_grad()
            .then(|| select_grad(&self.mask, g, false, "masked_fill_backward"))]
    }
}

// ---------------------------------------------------------------------- maximum / minimum

/// NaN test that also compiles for integer elements (where it is always false).
#[inline(always)]
#[allow(clippy::eq_op)]
fn is_nan<T: PartialOrd>(x: T) -> bool {
    x != x
}

/// The larger of `x` and `y`, NaN when either is NaN.
#[inline(always)]
fn max_elem<T: PartialOrd + Copy>(x: T, y: T) -> T {
    if x > y || is_nan(x) {
        x
    } else {
        y
    }
}

/// The smaller of `x` and `y`, NaN when either is NaN.
#[inline(always)]
fn min_elem<T: PartialOrd + Copy>(x: T, y: T) -> T {
    if x < y || is_nan(x) {
        x
    } else {
        y
    }
}

/// Share of the gradient that `x` gets from `maximum(x, y)` (`is_max`) or `minimum(x, y)`:
/// all of it where it wins, half on ties, none where it loses. Where NaN is involved neither
/// side loses, so both get all of it (as PyTorch's `where(x == y, g / 2, g)` rule does).
#[inline(always)]
fn extremum_share<T: Element>(gv: T, x: T, y: T, is_max: bool, half: T) -> T {
    let loses = if is_max { x < y } else { x > y };
    if x == y {
        gv * half
    } else if loses {
        <T as num_traits::Zero>::zero()
    } else {
        gv
    }
}

fn extremum(a: &Tensor, b: &Tensor, is_max: bool) -> Tensor {
    let name = if is_max { "maximum" } else { "minimum" };
    let (storage, shape) = dispatch_dtype!(a.dtype(), |T| {
        let (buf, shape) = if is_max {
            zip_map::<T, T>(a, b, name, max_elem)
        } else {
            zip_map::<T, T>(a, b, name, min_elem)
        };
        (<T as Element>::into_storage(buf), shape)
    });
    Tensor::op_result(storage, shape, &[a, b], || {
        Box::new(ExtremumBackward { is_max, name })
    })
}

struct ExtremumBackward {
    is_max: bool,
    name: &'static str,
}

impl GradFn for ExtremumBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        let is_max = self.is_max;
        let shape = g.shape().clone();
        let op = self.name;
        dispatch_float!(g.dtype(), op, |T| {
            let half = <T as Element>::from_f64(0.5);
            // The share of `b` is that of `a` with the operands swapped.
            let grad = |first: &Tensor, second: &Tensor| {
                let buf = if is_max {
                    zip3::<T, T, T, T>(g, first, second, &shape, op, |gv, x, y| {
                        extremum_share(gv, x, y, true, half)
                    })
                } else {
                    zip3::<T, T, T, T>(g, first, second, &shape, op, |gv, x, y| {
                        extremum_share(gv, x, y, false, half)
                    })
                };
                Tensor::from_buffer(buf, shape.clone()).sum_to(first.shape())
            };
            vec![
                a.tracks_grad().then(|| grad(a, b)),
                b.tracks_grad().then(|| grad(b, a)),
            ]
        })
    }
}

fn extremum_scalar(t: &Tensor, s: f64, is_max: bool) -> Tensor {
    let name = if is_max {
        "maximum_scalar"
    } else {
        "minimum_scalar"
    };
    let storage = dispatch_dtype!(t.dtype(), |T| {
        let c = <T as Element>::from_f64(s);
        let buf = if is_max {
            map::<T, T>(t, name, |x| max_elem(x, c))
        } else {
            map::<T, T>(t, name, |x| min_elem(x, c))
        };
        <T as Element>::into_storage(buf)
    });
    Tensor::op_result(storage, t.shape().clone(), &[t], || {
        Box::new(ExtremumScalarBackward { s, is_max, name })
    })
}

struct ExtremumScalarBackward {
    s: f64,
    is_max: bool,
    name: &'static str,
}

impl GradFn for ExtremumScalarBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let op = self.name;
        let storage = dispatch_float!(g.dtype(), op, |T| {
            let (c, half) = (
                <T as Element>::from_f64(self.s),
                <T as Element>::from_f64(0.5),
            );
            let (buf, _) = if self.is_max {
                zip_map::<T, T>(g, x, op, |gv, xv| extremum_share(gv, xv, c, true, half))
            } else {
                zip_map::<T, T>(g, x, op, |gv, xv| extremum_share(gv, xv, c, false, half))
            };
            <T as Element>::into_storage(buf)
        });
        vec![Some(Tensor::from_storage(
            storage,
            Layout::contiguous(x.shape().clone()),
        ))]
    }
}

// ---------------------------------------------------------------------- public API

impl Tensor {
    /// Mask of `self == other` (broadcasting): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn eq(&self, other: &Tensor) -> Tensor {
        compare(self, other, Cmp::Eq)
    }

    /// Mask of `self != other` (broadcasting; true where either is NaN): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn ne(&self, other: &Tensor) -> Tensor {
        compare(self, other, Cmp::Ne)
    }

    /// Mask of `self < other` (broadcasting): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn lt(&self, other: &Tensor) -> Tensor {
        compare(self, other, Cmp::Lt)
    }

    /// Mask of `self <= other` (broadcasting): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn le(&self, other: &Tensor) -> Tensor {
        compare(self, other, Cmp::Le)
    }

    /// Mask of `self > other` (broadcasting): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn gt(&self, other: &Tensor) -> Tensor {
        compare(self, other, Cmp::Gt)
    }

    /// Mask of `self >= other` (broadcasting): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn ge(&self, other: &Tensor) -> Tensor {
        compare(self, other, Cmp::Ge)
    }

    /// Mask of `self == s` (exact for integer dtypes): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn eq_scalar(&self, s: f64) -> Tensor {
        compare_scalar(self, s, Cmp::Eq)
    }

    /// Mask of `self != s` (exact for integer dtypes): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn ne_scalar(&self, s: f64) -> Tensor {
        compare_scalar(self, s, Cmp::Ne)
    }

    /// Mask of `self < s` (exact for integer dtypes): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn lt_scalar(&self, s: f64) -> Tensor {
        compare_scalar(self, s, Cmp::Lt)
    }

    /// Mask of `self <= s` (exact for integer dtypes): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn le_scalar(&self, s: f64) -> Tensor {
        compare_scalar(self, s, Cmp::Le)
    }

    /// Mask of `self > s` (exact for integer dtypes): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn gt_scalar(&self, s: f64) -> Tensor {
        compare_scalar(self, s, Cmp::Gt)
    }

    /// Mask of `self >= s` (exact for integer dtypes): a U32 tensor of 0/1 (no bool dtype); no graph node.
    pub fn ge_scalar(&self, s: f64) -> Tensor {
        compare_scalar(self, s, Cmp::Ge)
    }

    /// `on_true` where `mask` (any dtype, nonzero = true; a U32 0/1 mask from the comparisons) is true, else `on_false`, all three broadcast; differentiable in `on_true` and `on_false`.
    pub fn where_cond(mask: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Tensor {
        assert!(
            on_true.dtype() == on_false.dtype(),
            "where_cond: dtype mismatch, on_true is {} and on_false is {} (shapes {} and {})",
            on_true.dtype(),
            on_false.dtype(),
            on_true.shape(),
            on_false.shape()
        );
        let shape = broadcast3(mask.shape(), on_true.shape(), on_false.shape());
        let op = "where_cond";
        let storage = dispatch_dtype!(mask.dtype(), |M| {
            dispatch_dtype!(on_true.dtype(), |T| {
                let mz = <M as num_traits::Zero>::zero();
                let buf = zip3::<M, T, T, T>(mask, on_true, on_false, &shape, op, |m, x, y| {
                    if m != mz {
                        x
                    } else {
                        y
                    }
                });
                <T as Element>::into_storage(buf)
            })
        });
        Tensor::op_result(storage, shape, &[on_true, on_false], || {
            Box::new(WhereBackward {
                mask: mask.detach(),
            })
        })
    }

    /// `value` where `mask` (any dtype, nonzero = true, a U32 0/1 mask from the comparisons; broadcast to this shape) is true, else `self`; the gradient flows where the mask is 0.
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Tensor {
        assert!(
            broadcasts_to(mask.shape(), self.shape()),
            "masked_fill: mask of shape {} cannot be broadcast to the tensor's shape {}",
            mask.shape(),
            self.shape()
        );
        let shape = self.shape().clone();
        let op = "masked_fill";
        let storage = dispatch_dtype!(mask.dtype(), |M| {
            dispatch_dtype!(self.dtype(), |T| {
                let (mz, v) = (
                    <M as num_traits::Zero>::zero(),
                    <T as Element>::from_f64(value),
                );
                let buf =
                    zip2::<M, T, T>(mask, self, &shape, op, |m, x| if m != mz { v } else { x });
                <T as Element>::into_storage(buf)
            })
        });
        Tensor::op_result(storage, shape, &[self], || {
            Box::new(MaskedFillBackward {
                mask: mask.detach(),
            })
        })
    }

    /// Elementwise maximum (broadcasting, NaN-propagating); ties split the gradient half/half (PyTorch's rule).
    pub fn maximum(&self, other: &Tensor) -> Tensor {
        extremum(self, other, true)
    }

    /// Elementwise minimum (broadcasting, NaN-propagating); ties split the gradient half/half (PyTorch's rule).
    pub fn minimum(&self, other: &Tensor) -> Tensor {
        extremum(self, other, false)
    }

    /// `maximum` against the constant `s` (converted to this dtype): elements equal to `s` get half the gradient.
    pub fn maximum_scalar(&self, s: f64) -> Tensor {
        extremum_scalar(self, s, true)
    }

    /// `minimum` against the constant `s` (converted to this dtype): elements equal to `s` get half the gradient.
    pub fn minimum_scalar(&self, s: f64) -> Tensor {
        extremum_scalar(self, s, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};

    /// Row-major index of `idx` (an index into the broadcast shape `out`) in an operand of
    /// shape `shape`, by NumPy rules: leading dims dropped, size-1 dims pinned to 0.
    fn source_index(idx: &[usize], out: &[usize], shape: &[usize]) -> usize {
        let lead = out.len() - shape.len();
        let mut flat = 0;
        for (i, &d) in shape.iter().enumerate() {
            flat = flat * d + if d == 1 { 0 } else { idx[lead + i] };
        }
        flat
    }

    /// Every multi-index of `shape` in row-major order.
    fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut i| {
                let mut idx = vec![0; shape.len()];
                for d in (0..shape.len()).rev() {
                    idx[d] = i % shape[d];
                    i /= shape[d];
                }
                idx
            })
            .collect()
    }

    /// Values drawn from a small set so that ties are frequent.
    fn small_ints(shape: &[usize], seed: u64) -> Vec<f64> {
        randn_f64(shape, seed)
            .to_vec::<f64>()
            .iter()
            .map(|v| (v * 2.0).round())
            .collect()
    }

    fn reference_cmp(op: Cmp, x: f64, y: f64) -> bool {
        match op {
            Cmp::Eq => x == y,
            Cmp::Ne => x != y,
            Cmp::Lt => x < y,
            Cmp::Le => x <= y,
            Cmp::Gt => x > y,
            Cmp::Ge => x >= y,
        }
    }

    const ALL: [Cmp; 6] = [Cmp::Eq, Cmp::Ne, Cmp::Lt, Cmp::Le, Cmp::Gt, Cmp::Ge];

    #[test]
    fn comparisons_broadcast_for_every_dtype() {
        let (sa, sb) = ([2usize, 3, 4], [3usize, 1]);
        let (va, vb) = (small_ints(&sa, 1), small_ints(&sb, 2));
        let out = [2usize, 3, 4];
        for dtype in [DType::F32, DType::F64, DType::I64] {
            let a = Tensor::from_slice(&va, sa).to_dtype(dtype);
            let b = Tensor::from_slice(&vb, sb).to_dtype(dtype);
            for op in ALL {
                let m = compare(&a, &b, op);
                assert_eq!(m.dtype(), DType::U32);
                assert_eq!(m.dims(), &out);
                let got = m.to_vec::<u32>();
                for (i, idx) in indices(&out).iter().enumerate() {
                    let (x, y) = (va[i], vb[source_index(idx, &out, &sb)]);
                    assert_eq!(
                        got[i],
                        reference_cmp(op, x, y) as u32,
                        "{op:?} {dtype} at {idx:?}"
                    );
                }
            }
        }
        // u32: shift values to be non-negative.
        let ua: Vec<u32> = va.iter().map(|v| (v + 10.0) as u32).collect();
        let ub: Vec<u32> = vb.iter().map(|v| (v + 10.0) as u32).collect();
        let (a, b) = (Tensor::from_slice(&ua, sa), Tensor::from_slice(&ub, sb));
        for op in ALL {
            let got = compare(&b, &a, op).to_vec::<u32>();
            for (i, idx) in indices(&out).iter().enumerate() {
                let (x, y) = (ub[source_index(idx, &out, &sb)] as f64, ua[i] as f64);
                assert_eq!(
                    got[i],
                    reference_cmp(op, x, y) as u32,
                    "{op:?} u32 at {idx:?}"
                );
            }
        }
    }

    #[test]
    fn comparisons_of_non_contiguous_operands() {
        let base = small_ints(&[4, 3], 3);
        let a = Tensor::from_slice(&base, [4, 3]).t(); // [3, 4]
        let wide = small_ints(&[3, 6], 4);
        let b = Tensor::from_slice(&wide, [3, 6]).narrow(1, 1, 4); // [3, 4]
        let got = a.le(&b).to_vec::<u32>();
        for i in 0..3 {
            for j in 0..4 {
                let want = base[j * 3 + i] <= wide[i * 6 + 1 + j];
                assert_eq!(got[i * 4 + j], want as u32);
            }
        }
    }

    #[test]
    fn masks_never_record_graph_nodes() {
        let a = randn_f64(&[3], 5).requires_grad();
        let b = randn_f64(&[3], 6).requires_grad();
        for m in [
            a.lt(&b),
            a.ge_scalar(0.0),
            a.eq(&a),
            a.mul(&b).ne_scalar(1.0),
        ] {
            assert_eq!(m.dtype(), DType::U32);
            assert!(m.is_leaf());
            assert!(!m.tracks_grad());
        }
    }

    #[test]
    fn nan_compares_false_except_ne() {
        let a = Tensor::from_slice(&[f64::NAN, 1.0, f64::NAN], [3]);
        let b = Tensor::from_slice(&[1.0, f64::NAN, f64::NAN], [3]);
        for op in ALL {
            let want = if op == Cmp::Ne { 1 } else { 0 };
            assert_eq!(compare(&a, &b, op).to_vec::<u32>(), vec![want; 3], "{op:?}");
        }
        let one = Tensor::from_slice(&[1.0f32], [1]);
        for op in ALL {
            let want = (op == Cmp::Ne) as u32;
            assert_eq!(
                compare_scalar(&one, f64::NAN, op).to_vec::<u32>(),
                vec![want]
            );
        }
    }

    #[test]
    fn scalar_comparisons_match_real_arithmetic_for_every_dtype() {
        let vals = [-3.0, -2.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0];
        let scalars = [
            -2.5,
            -2.0,
            0.0,
            0.25,
            1.0,
            2.5,
            3.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e30,
            -1e30,
        ];
        for s in scalars {
            for op in ALL {
                // f64 and f32 (values exactly representable in both).
                for dtype in [DType::F32, DType::F64] {
                    let t = Tensor::from_slice(&vals, [8]).to_dtype(dtype);
                    let got = compare_scalar(&t, s, op).to_vec::<u32>();
                    let want: Vec<u32> = vals
                        .iter()
                        .map(|&x| reference_cmp(op, x, s) as u32)
                        .collect();
                    assert_eq!(got, want, "{op:?} {dtype} vs {s}");
                }
                // i64, including the extremes of its range.
                let ints = [i64::MIN, -3, -2, 0, 1, 2, 3, i64::MAX];
                let t = Tensor::from_slice(&ints, [8]);
                let got = compare_scalar(&t, s, op).to_vec::<u32>();
                let want: Vec<u32> = ints
                    .iter()
                    .map(|&x| reference_cmp(op, x as f64, s) as u32)
                    .collect();
                assert_eq!(got, want, "{op:?} i64 vs {s}");
                // u32.
                let uints = [0u32, 1, 2, 3, u32::MAX];
                let t = Tensor::from_slice(&uints, [5]);
                let got = compare_scalar(&t, s, op).to_vec::<u32>();
                let want: Vec<u32> = uints
                    .iter()
                    .map(|&x| reference_cmp(op, x as f64, s) as u32)
                    .collect();
                assert_eq!(got, want, "{op:?} u32 vs {s}");
            }
        }
    }

    #[test]
    fn large_i64_compare_exactly_with_scalars() {
        // 2^53 + 1 is not an f64: comparing through f64 would call it equal to 2^53.
        let big = (1i64 << 53) + 1;
        let t = Tensor::from_slice(&[big, big - 1], [2]);
        let s = (1u64 << 53) as f64;
        assert_eq!(t.eq_scalar(s).to_vec::<u32>(), vec![0, 1]);
        assert_eq!(t.ne_scalar(s).to_vec::<u32>(), vec![1, 0]);
        assert_eq!(t.gt_scalar(s).to_vec::<u32>(), vec![1, 0]);
        assert_eq!(t.le_scalar(s).to_vec::<u32>(), vec![0, 1]);
        assert_eq!(t.lt_scalar(s + 2.0).to_vec::<u32>(), vec![1, 1]);
        assert_eq!(t.ge_scalar(9.3e18).to_vec::<u32>(), vec![0, 0]);
    }

    #[test]
    #[should_panic(expected = "lt: shapes [2, 3] and [4] cannot be broadcast together")]
    fn comparison_shape_mismatch_panics() {
        let _ = Tensor::zeros([2, 3]).lt(&Tensor::zeros([4]));
    }

    #[test]
    #[should_panic(expected = "eq: dtype mismatch, f32 vs f64")]
    fn comparison_dtype_mismatch_panics() {
        let _ = Tensor::zeros([2]).eq(&Tensor::zeros([2]).to_dtype(DType::F64));
    }

    #[test]
    fn where_cond_broadcasts_three_ways() {
        let (sm, sa, sb) = ([3usize, 1], [4usize], [2usize, 1, 1]);
        let out = [2usize, 3, 4];
        let mv: Vec<i64> = vec![0, 5, -1];
        // Non-negative so that u32 holds them too.
        let va: Vec<f64> = small_ints(&sa, 7).iter().map(|v| v.abs()).collect();
        let vb: Vec<f64> = small_ints(&sb, 8).iter().map(|v| v.abs() + 0.5).collect();
        let m = Tensor::from_slice(&mv, sm);
        for dtype in [DType::F32, DType::F64, DType::I64, DType::U32] {
            let (a, b) = (
                Tensor::from_slice(&va, sa).to_dtype(dtype),
                Tensor::from_slice(&vb, sb).to_dtype(dtype),
            );
            let got = Tensor::where_cond(&m, &a, &b);
            assert_eq!(got.dims(), &out);
            assert_eq!(got.dtype(), dtype);
            let got = got.to_f64_vec();
            for (i, idx) in indices(&out).iter().enumerate() {
                let want = if mv[source_index(idx, &out, &sm)] != 0 {
                    va[source_index(idx, &out, &sa)]
                } else {
                    vb[source_index(idx, &out, &sb)]
                };
                // Integer dtypes truncate the .5 of `vb`.
                let want = if dtype.is_float() { want } else { want.trunc() };
                assert_eq!(got[i], want, "{dtype} at {idx:?}");
            }
        }
    }

    #[test]
    fn where_cond_masks_of_every_dtype_and_nan_is_true() {
        let a = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0], [4]);
        let b = Tensor::from_slice(&[-1.0f64, -2.0, -3.0, -4.0], [4]);
        let want = vec![-1.0, 2.0, 3.0, -4.0];
        let masks = [
            Tensor::from_slice(&[0u32, 1, 7, 0], [4]),
            Tensor::from_slice(&[0i64, -1, 3, 0], [4]),
            Tensor::from_slice(&[0f32, f32::NAN, 0.5, -0.0], [4]),
            Tensor::from_slice(&[0f64, -2.0, f64::INFINITY, 0.0], [4]),
        ];
        for m in &masks {
            assert_eq!(
                Tensor::where_cond(m, &a, &b).to_vec::<f64>(),
                want,
                "{}",
                m.dtype()
            );
        }
    }

    #[test]
    fn where_cond_non_contiguous_and_parallel_sizes() {
        // Big enough for the threaded path, with a transposed and a narrowed operand.
        let (r, c) = (300, 256);
        let x = randn_f64(&[c, r], 9); // transposed to [r, c]
        let y = randn_f64(&[r, c + 4], 10); // narrowed to [r, c]
        let mvals: Vec<u32> = (0..c).map(|j| (j % 3 == 0) as u32).collect();
        let m = Tensor::from_slice(&mvals, [c]);
        let got = Tensor::where_cond(&m, &x.t(), &y.narrow(1, 2, c)).to_vec::<f64>();
        let (vx, vy) = (x.to_vec::<f64>(), y.to_vec::<f64>());
        for i in 0..r {
            for j in 0..c {
                let want = if mvals[j] != 0 {
                    vx[j * r + i]
                } else {
                    vy[i * (c + 4) + 2 + j]
                };
                assert_eq!(got[i * c + j], want);
            }
        }
        // Same-shape contiguous fast path, threaded.
        let n = 1 << 17;
        let a = randn_f64(&[n], 11);
        let b = randn_f64(&[n], 12);
        let m = a.gt(&b);
        let got = Tensor::where_cond(&m, &a, &b).to_vec::<f64>();
        let (va, vb) = (a.to_vec::<f64>(), b.to_vec::<f64>());
        for i in 0..n {
            assert_eq!(got[i], va[i].max(vb[i]));
        }
    }

    #[test]
    fn gradcheck_where_cond_with_broadcast_and_non_contiguous() {
        let m = Tensor::from_slice(&[1u32, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0], [3, 4]);
        let a = randn_f64(&[4], 13).requires_grad();
        let b = randn_f64(&[3, 1], 14).requires_grad();
        gradcheck(|x| Tensor::where_cond(&m, &x[0], &x[1]), &[a, b]).unwrap();
        let a = randn_f64(&[4, 3], 15).requires_grad(); // transposed
        let b = randn_f64(&[2, 3, 6], 16).requires_grad(); // narrowed, broadcasts m
        gradcheck(
            |x| Tensor::where_cond(&m, &x[0].t(), &x[1].narrow(2, 1, 4)),
            &[a, b],
        )
        .unwrap();
    }

    #[test]
    fn where_cond_grads_are_split_by_the_mask() {
        let m = Tensor::from_slice(&[1u32, 0, 0], [3]);
        let a = Tensor::from_slice(&[1.0f64, 2.0, 3.0], [3]).requires_grad();
        let b = Tensor::scalar(5.0f64).requires_grad();
        Tensor::where_cond(&m, &a, &b)
            .backward_with_grad(&Tensor::from_slice(&[10.0f64, 20.0, 30.0], [3]));
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![10.0, 0.0, 0.0]);
        assert_eq!(b.grad().unwrap().dims(), &[] as &[usize]);
        assert_eq!(b.grad().unwrap().to_vec::<f64>(), vec![50.0]);
        // A float mask that itself tracks grad stays out of the graph.
        let fm = Tensor::from_slice(&[0.0f64, 2.0, 0.0], [3]).requires_grad();
        a.zero_grad();
        let out = Tensor::where_cond(&fm, &a, &b);
        out.masked_fill(&fm, 0.0).sum_all().backward();
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![0.0, 0.0, 0.0]);
        assert!(fm.grad().is_none());
        assert!(!Tensor::where_cond(&fm, &m, &m).tracks_grad());
    }

    #[test]
    #[should_panic(
        expected = "where_cond: shapes [2] (mask), [3] (on_true) and [3] (on_false) cannot be broadcast together"
    )]
    fn where_cond_shape_mismatch_panics() {
        let _ = Tensor::where_cond(
            &Tensor::zeros([2]),
            &Tensor::zeros([3]),
            &Tensor::zeros([3]),
        );
    }

    #[test]
    #[should_panic(expected = "where_cond: dtype mismatch, on_true is f32 and on_false is i64")]
    fn where_cond_dtype_mismatch_panics() {
        let _ = Tensor::where_cond(
            &Tensor::zeros([2]),
            &Tensor::zeros([2]),
            &Tensor::zeros([2]).to_dtype(DType::I64),
        );
    }

    #[test]
    fn masked_fill_values_with_broadcast_mask() {
        let (sx, sm) = ([2usize, 3, 4], [3usize, 4]);
        let vx = small_ints(&sx, 17);
        let x = Tensor::from_slice(&vx, sx);
        // A causal-style mask built with a comparison.
        let row = Tensor::arange(0.0, 3.0, 1.0).reshape([3, 1]);
        let col = Tensor::arange(0.0, 4.0, 1.0);
        let m = col.gt(&row);
        assert_eq!(m.dims(), &sm);
        for dtype in [DType::F32, DType::F64, DType::I64] {
            let got = x.to_dtype(dtype).masked_fill(&m, -7.0).to_f64_vec();
            for (i, idx) in indices(&sx).iter().enumerate() {
                let want = if idx[2] > idx[1] { -7.0 } else { vx[i] };
                assert_eq!(got[i], want, "{dtype} at {idx:?}");
            }
        }
        // Non-contiguous self, float mask.
        let base = small_ints(&[4, 3], 18);
        let xt = Tensor::from_slice(&base, [4, 3]).t(); // [3, 4]
        let fm = Tensor::from_slice(&[0.0f32, 2.5, 0.0, f32::NAN], [4]);
        let got = xt.masked_fill(&fm, f64::NEG_INFINITY).to_vec::<f64>();
        for i in 0..3 {
            for j in 0..4 {
                let want = if j % 2 == 1 {
                    f64::NEG_INFINITY
                } else {
                    base[j * 3 + i]
                };
                assert_eq!(got[i * 4 + j], want);
            }
        }
    }

    #[test]
    fn gradcheck_masked_fill() {
        let m = Tensor::from_slice(&[1u32, 0, 0, 1], [4]);
        let x = randn_f64(&[3, 4], 19).requires_grad();
        gradcheck(|x| x[0].masked_fill(&m, 2.0), std::slice::from_ref(&x)).unwrap();
        let x = randn_f64(&[4, 3], 20).requires_grad();
        gradcheck(|x| x[0].t().masked_fill(&m, -1.0), std::slice::from_ref(&x)).unwrap();
        let x = randn_f64(&[3, 7], 21).requires_grad();
        gradcheck(
            |x| x[0].narrow(1, 2, 4).masked_fill(&m, 0.0),
            std::slice::from_ref(&x),
        )
        .unwrap();
        // The gradient is exactly the incoming one where the mask is 0.
        let x = randn_f64(&[2, 4], 22).requires_grad();
        x.masked_fill(&m, 9.0).sum_all().backward();
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
        );
    }

    #[test]
    #[should_panic(
        expected = "masked_fill: mask of shape [2, 4] cannot be broadcast to the tensor's shape [4]"
    )]
    fn masked_fill_mask_must_broadcast_to_self() {
        let _ = Tensor::zeros([4]).masked_fill(&Tensor::zeros([2, 4]), 1.0);
    }

    #[test]
    fn maximum_minimum_values_broadcast_and_propagate_nan() {
        let (sa, sb) = ([2usize, 1, 3], [4usize, 1]);
        let out = [2usize, 4, 3];
        let (va, vb) = (small_ints(&sa, 23), small_ints(&sb, 24));
        for dtype in [DType::F32, DType::F64, DType::I64] {
            let a = Tensor::from_slice(&va, sa).to_dtype(dtype);
            let b = Tensor::from_slice(&vb, sb).to_dtype(dtype);
            let (mx, mn) = (a.maximum(&b), a.minimum(&b));
            assert_eq!(mx.dims(), &out);
            let (mx, mn) = (mx.to_f64_vec(), mn.to_f64_vec());
            for (i, idx) in indices(&out).iter().enumerate() {
                let (x, y) = (
                    va[source_index(idx, &out, &sa)],
                    vb[source_index(idx, &out, &sb)],
                );
                assert_eq!(mx[i], x.max(y), "{dtype}");
                assert_eq!(mn[i], x.min(y), "{dtype}");
            }
        }
        let a = Tensor::from_slice(&[f64::NAN, 1.0, f64::NAN, 2.0], [4]);
        let b = Tensor::from_slice(&[1.0, f64::NAN, f64::NAN, 3.0], [4]);
        for r in [a.maximum(&b), a.minimum(&b), b.maximum(&a), b.minimum(&a)] {
            let v = r.to_vec::<f64>();
            assert!(v[..3].iter().all(|x| x.is_nan()), "{v:?}");
        }
        assert_eq!(a.maximum(&b).to_vec::<f64>()[3], 3.0);
        assert_eq!(a.minimum(&b).to_vec::<f64>()[3], 2.0);
        assert!(a.maximum_scalar(0.0).to_vec::<f64>()[0].is_nan());
        assert!(Tensor::from_slice(&[1.0f32], [1])
            .minimum_scalar(f64::NAN)
            .item()
            .is_nan());
    }

    #[test]
    fn maximum_minimum_scalar_values() {
        let v = small_ints(&[10], 25);
        let t = Tensor::from_slice(&v, [10]);
        let want_max: Vec<f64> = v.iter().map(|x| x.max(0.5)).collect();
        let want_min: Vec<f64> = v.iter().map(|x| x.min(0.5)).collect();
        assert_eq!(t.maximum_scalar(0.5).to_vec::<f64>(), want_max);
        assert_eq!(t.minimum_scalar(0.5).to_vec::<f64>(), want_min);
        let ti = t.to_dtype(DType::I64);
        let want: Vec<i64> = v.iter().map(|x| x.max(-1.0) as i64).collect();
        assert_eq!(ti.maximum_scalar(-1.0).to_vec::<i64>(), want);
    }

    #[test]
    fn gradcheck_maximum_minimum_with_broadcast_and_non_contiguous() {
        for is_max in [true, false] {
            let a = randn_f64(&[3, 4], 26).requires_grad();
            let b = randn_f64(&[4], 27).requires_grad();
            gradcheck(|x| extremum(&x[0], &x[1], is_max), &[a, b]).unwrap();
            let a = randn_f64(&[4, 3], 28).requires_grad();
            let b = randn_f64(&[2, 3, 6], 29).requires_grad();
            gradcheck(
                |x| extremum(&x[0].t(), &x[1].narrow(2, 1, 4), is_max),
                &[a, b],
            )
            .unwrap();
            let a = randn_f64(&[3, 5], 30).requires_grad();
            gradcheck(
                |x| extremum_scalar(&x[0], 0.1, is_max),
                std::slice::from_ref(&a),
            )
            .unwrap();
            gradcheck(
                |x| extremum_scalar(&x[0].t(), -0.2, is_max),
                std::slice::from_ref(&a),
            )
            .unwrap();
        }
    }

    #[test]
    fn ties_split_the_gradient_half_half() {
        let a = Tensor::from_slice(&[1.0f64, 2.0, 3.0], [3]).requires_grad();
        let b = Tensor::from_slice(&[1.0f64, 5.0, 0.0], [3]).requires_grad();
        let g = Tensor::from_slice(&[4.0f64, 8.0, 16.0], [3]);
        a.maximum(&b).backward_with_grad(&g);
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![2.0, 0.0, 16.0]);
        assert_eq!(b.grad().unwrap().to_vec::<f64>(), vec![2.0, 8.0, 0.0]);
        a.zero_grad();
        b.zero_grad();
        a.minimum(&b).backward_with_grad(&g);
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![2.0, 8.0, 0.0]);
        assert_eq!(b.grad().unwrap().to_vec::<f64>(), vec![2.0, 0.0, 16.0]);
        // A broadcast operand collects its shares from every position.
        a.zero_grad();
        let s = Tensor::scalar(2.0f64).requires_grad();
        a.maximum(&s).backward_with_grad(&g);
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![0.0, 4.0, 16.0]);
        assert_eq!(s.grad().unwrap().to_vec::<f64>(), vec![4.0 + 4.0]);
        // Scalar variants: ties get half.
        a.zero_grad();
        a.maximum_scalar(2.0).backward_with_grad(&g);
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![0.0, 4.0, 16.0]);
        a.zero_grad();
        a.minimum_scalar(2.0).backward_with_grad(&g);
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![4.0, 4.0, 0.0]);
    }

    #[test]
    #[should_panic(expected = "maximum: shapes [3, 2] and [3] cannot be broadcast together")]
    fn maximum_shape_mismatch_panics() {
        let _ = Tensor::zeros([3, 2]).maximum(&Tensor::zeros([3]));
    }

    #[test]
    fn zip4_broadcasts_four_operands() {
        let a = Tensor::from_slice(&[1.0f64, 2.0], [2, 1]);
        let b = Tensor::from_slice(&[10.0f64, 20.0, 30.0], [3]);
        let c = Tensor::from_slice(&[100.0f64, 200.0, 300.0, 400.0, 500.0, 600.0], [3, 2]).t();
        let d = Tensor::scalar(1000u32);
        let shape = Shape::from([2, 3]);
        let got = zip4::<f64, f64, f64, u32, f64>(&a, &b, &c, &d, &shape, "test", |x, y, z, w| {
            x + y + z + w as f64
        });
        let want: Vec<f64> = (0..6)
            .map(|i| {
                let (r, k) = (i / 3, i % 3);
                [1.0, 2.0][r]
                    + [10.0, 20.0, 30.0][k]
                    + [100.0, 300.0, 500.0, 200.0, 400.0, 600.0][i]
                    + 1000.0
            })
            .collect();
        assert_eq!(got.to_vec(), want);
    }
}
