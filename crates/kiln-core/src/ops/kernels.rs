//! Shared kernel drivers: walk one or two (broadcast) layouts and apply a per-element function,
//! with a contiguous fast path and threading above the work threshold.

use crate::alloc::Buffer;
use crate::dtype::Element;
use crate::layout::Layout;
use crate::parallel::{for_each_chunk, num_threads, PARALLEL_THRESHOLD};
use crate::shape::{broadcast_shape, DimVec, Shape};
use crate::tensor::Tensor;

/// Borrowed elements of `t` (of type `T`): panics naming `op` when the dtype differs.
#[macro_export]
#[doc(hidden)]
macro_rules! typed_slice {
    ($guard:expr, $T:ty, $op:expr) => {
        <$T as $crate::dtype::Element>::slice(&$guard).unwrap_or_else(|| {
            panic!(
                "{}: expected dtype {}, got {}",
                $op,
                <$T as $crate::dtype::Element>::DTYPE,
                $guard.dtype()
            )
        })
    };
}

/// Applies `f` to every element of `t` (any layout), returning a contiguous buffer.
pub fn map<T: Element, U: Element>(t: &Tensor, op: &str, f: impl Fn(T) -> U + Sync) -> Buffer<U> {
    let storage = t.storage();
    let src = crate::typed_slice!(storage, T, op);
    let mut out = Buffer::<U>::uninit(t.elem_count());
    match t.layout().contiguous_range() {
        Some(r) => {
            let src = &src[r];
            for_each_chunk(&mut out, |start, chunk| {
                let end = start + chunk.len();
                for (o, &x) in chunk.iter_mut().zip(&src[start..end]) {
                    *o = f(x);
                }
            });
        }
        None => {
            // Run by run along the innermost merged dim (a whole row of a transposed view at a
            // time), not element by element through the strided iterator.
            let mut i = 0;
            t.layout().for_each_run(|start, n, stride| {
                let dst = &mut out[i..i + n];
                if stride == 1 {
                    for (o, &x) in dst.iter_mut().zip(&src[start..start + n]) {
                        *o = f(x);
                    }
                } else {
                    for (k, o) in dst.iter_mut().enumerate() {
                        *o = f(src[start + k * stride]);
                    }
                }
                i += n;
            });
        }
    }
    out
}

/// Applies `f` to a contiguous slice chunk-wise (`f(input_chunk, output_chunk)`), for kernels
/// that vectorise over whole slices; non-contiguous inputs are made contiguous first.
pub fn map_slices<T: Element, U: Element>(
    t: &Tensor,
    op: &str,
    f: impl Fn(&[T], &mut [U]) + Sync,
) -> Buffer<U> {
    let t = t.contiguous();
    let storage = t.storage();
    let src = crate::typed_slice!(storage, T, op);
    let src = &src[t.layout().contiguous_range().unwrap()];
    let mut out = Buffer::<U>::uninit(t.elem_count());
    for_each_chunk(&mut out, |start, chunk| {
        let end = start + chunk.len();
        f(&src[start..end], chunk)
    });
    out
}

/// Dims and the two operands' strides after broadcasting, with dims merged where both operands
/// allow it (fewest dims to walk).
fn joint_merge(shape: &Shape, la: &Layout, lb: &Layout) -> (DimVec, DimVec, DimVec) {
    let (mut dims, mut sa, mut sb) = (DimVec::new(), DimVec::new(), DimVec::new());
    for i in 0..shape.rank() {
        let (d, a, b) = (shape.dims()[i], la.strides()[i], lb.strides()[i]);
        if d == 1 {
            continue;
        }
        if let (Some(ld), Some(&pa), Some(&pb)) = (dims.last_mut(), sa.last(), sb.last()) {
            if pa == a * d && pb == b * d {
                *ld *= d;
                *sa.last_mut().unwrap() = a;
                *sb.last_mut().unwrap() = b;
                continue;
            }
        }
        dims.push(d);
        sa.push(a);
        sb.push(b);
    }
    if dims.is_empty() {
        dims.push(1);
        sa.push(1);
        sb.push(1);
    }
    (dims, sa, sb)
}

/// Applies `f` elementwise to `a` and `b` broadcast together (NumPy rules); returns the
/// contiguous result and its shape. Panics naming `op` on mismatched dtypes or shapes.
pub fn zip_map<T: Element, U: Element>(
    a: &Tensor,
    b: &Tensor,
    op: &str,
    f: impl Fn(T, T) -> U + Sync,
) -> (Buffer<U>, Shape) {
    assert!(
        a.dtype() == b.dtype(),
        "{op}: dtype mismatch, {} vs {} (shapes {} and {})",
        a.dtype(),
        b.dtype(),
        a.shape(),
        b.shape()
    );
    let shape = if a.shape() == b.shape() {
        a.shape().clone()
    } else {
        broadcast_shape(a.shape(), b.shape(), op)
    };
    let (ga, gb) = (a.storage(), b.storage());
    let (sa, sb) = (
        crate::typed_slice!(ga, T, op),
        crate::typed_slice!(gb, T, op),
    );
    let n = shape.elem_count();
    let mut out = Buffer::<U>::uninit(n);

    // Fast path: both contiguous with the same shape.
    if a.shape() == b.shape() {
        if let (Some(ra), Some(rb)) = (a.layout().contiguous_range(), b.layout().contiguous_range())
        {
            let (xa, xb) = (&sa[ra], &sb[rb]);
            for_each_chunk(&mut out, |s, chunk| {
                let e = s + chunk.len();
                for ((o, &x), &y) in chunk.iter_mut().zip(&xa[s..e]).zip(&xb[s..e]) {
                    *o = f(x, y);
                }
            });
            return (out, shape);
        }
    }

    let la = a.layout().broadcast_as(&shape, op);
    let lb = b.layout().broadcast_as(&shape, op);
    let (dims, str_a, str_b) = joint_merge(&shape, &la, &lb);
    let r = dims.len();
    let inner = dims[r - 1];
    let (ia, ib) = (str_a[r - 1], str_b[r - 1]);
    let (oa, ob) = (la.offset(), lb.offset());
    let rows = n / inner.max(1);
    if n == 0 {
        return (out, shape);
    }

    // Each output row of `inner` elements starts at offsets found by unravelling its index.
    let run_rows = |row0: usize, out_rows: &mut [U]| {
        let mut idx = DimVec::from_elem(0, r - 1);
        let mut rem = row0;
        for d in (0..r - 1).rev() {
            idx[d] = rem % dims[d];
            rem /= dims[d];
        }
        let mut pa = oa + (0..r - 1).map(|d| idx[d] * str_a[d]).sum::<usize>();
        let mut pb = ob + (0..r - 1).map(|d| idx[d] * str_b[d]).sum::<usize>();
        for row in out_rows.chunks_mut(inner) {
            match (ia, ib) {
                (1, 1) => {
                    for ((o, &x), &y) in row
                        .iter_mut()
                        .zip(&sa[pa..pa + inner])
                        .zip(&sb[pb..pb + inner])
                    {
                        *o = f(x, y);
                    }
                }
                (1, 0) => {
                    let y = sb[pb];
                    for (o, &x) in row.iter_mut().zip(&sa[pa..pa + inner]) {
                        *o = f(x, y);
                    }
                }
                (0, 1) => {
                    let x = sa[pa];
                    for (o, &y) in row.iter_mut().zip(&sb[pb..pb + inner]) {
                        *o = f(x, y);
                    }
                }
                _ => {
                    for (k, o) in row.iter_mut().enumerate() {
                        *o = f(sa[pa + k * ia], sb[pb + k * ib]);
                    }
                }
            }
            // Advance the odometer over the outer dims.
            for d in (0..r - 1).rev() {
                idx[d] += 1;
                pa += str_a[d];
                pb += str_b[d];
                if idx[d] < dims[d] {
                    break;
                }
                pa -= str_a[d] * dims[d];
                pb -= str_b[d] * dims[d];
                idx[d] = 0;
            }
        }
    };

    if n >= PARALLEL_THRESHOLD && num_threads() > 1 && rows > 1 {
        let rows_per_task = rows.div_ceil(num_threads() * 4).max(1);
        crate::parallel::for_chunks(&mut out, rows_per_task * inner, true, |i, chunk| {
            run_rows(i * rows_per_task, chunk)
        });
    } else {
        run_rows(0, &mut out);
    }
    (out, shape)
}
