//! Indexing by integer tensors (i64 or u32): `index_select`, `gather`, `scatter_add`,
//! `embedding` and `one_hot`, with their backward rules (index_add / scatter_add into zeros).

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dtype::Element;
use crate::layout::Layout;
use crate::ops::concat::{Odometer, StridedSource};
use crate::parallel::{num_threads, PARALLEL_THRESHOLD};
use crate::shape::{Dim, DimVec, Shape};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{dispatch_dtype, dispatch_float};

// ---------------------------------------------------------------------- index reading

/// The values of an i64 or u32 index tensor (any layout) in row-major order, each checked to
/// lie in `0..bound`; `context` describes the bound in the panic message.
fn read_indices(
    index: &Tensor,
    bound: usize,
    op: &str,
    context: impl Fn() -> String,
) -> Buffer<usize> {
    fn convert<I: Element>(
        src: &[I],
        layout: &Layout,
        bound: usize,
        to_index: impl Fn(I) -> Option<usize>,
        fail: impl Fn(I),
    ) -> Buffer<usize> {
        let mut out = Buffer::<usize>::uninit(layout.elem_count());
        let put = |o: &mut usize, v: I| match to_index(v) {
            Some(i) if i < bound => *o = i,
            _ => fail(v),
        };
        match layout.contiguous_range() {
            Some(r) => out.iter_mut().zip(&src[r]).for_each(|(o, &v)| put(o, v)),
            None => out
                .iter_mut()
                .zip(layout.offsets())
                .for_each(|(o, off)| put(o, src[off])),
        }
        out
    }
    let fail = |v: &dyn std::fmt::Display| -> ! {
        panic!(
            "{op}: index {v} out of range for {} (valid: 0..{bound})",
            context()
        )
    };
    let storage = index.storage();
    match &*storage {
        Storage::I64(b) => convert(
            b,
            index.layout(),
            bound,
            |v: i64| usize::try_from(v).ok(),
            |v| fail(&v),
        ),
        Storage::U32(b) => convert(
            b,
            index.layout(),
            bound,
            |v: u32| Some(v as usize),
            |v| fail(&v),
        ),
        other => panic!(
            "{op}: indices must be i64 or u32, got {} (index shape {})",
            other.dtype(),
            index.shape()
        ),
    }
}

/// True when an op over `n` elements in `tasks` independent pieces is worth threading.
fn threaded(n: usize, tasks: usize) -> bool {
    n >= PARALLEL_THRESHOLD && tasks > 1 && num_threads() > 1
}

// ---------------------------------------------------------------------- index_select

/// `out[pre, j, post] = x[pre, idx[j], post]`: one block copy (a `memcpy` when `x` is dense
/// past `dim`) per output row of `inner` elements.
fn index_select_kernel<T: Element>(x: &Tensor, dim: usize, idx: &[usize], op: &str) -> Buffer<T> {
    let (dims, strides) = (x.dims(), x.layout().strides());
    let inner: usize = dims[dim + 1..].iter().product();
    let outer: usize = dims[..dim].iter().product();
    let n_idx = idx.len();
    let n = outer * n_idx * inner;
    let mut out = Buffer::<T>::uninit(n);
    if n == 0 {
        return out;
    }
    let guard = x.storage();
    let src = crate::typed_slice!(guard, T, op);
    let block = StridedSource::block(&dims[dim + 1..], &strides[dim + 1..]);
    let (pre_dims, pre_strides) = (&dims[..dim], &strides[..dim]);
    let (base, sd) = (x.layout().offset(), strides[dim]);
    let dense = block.is_dense();
    if inner == 1 {
        // One element per (outer, j): a tight gather loop along each outer row.
        let run = |e0: usize, out: &mut [T]| {
            let mut pre = Odometer::new(pre_dims, pre_strides, base, e0 / n_idx);
            let (mut j, mut done) = (e0 % n_idx, 0);
            while done < out.len() {
                let m = (n_idx - j).min(out.len() - done);
                let at = pre.offset;
                for (o, &i) in out[done..done + m].iter_mut().zip(&idx[j..j + m]) {
                    *o = src[at + i * sd];
                }
                done += m;
                j = 0;
                pre.step();
            }
        };
        if threaded(n, 2) {
            let per_task = n.div_ceil(num_threads() * 4).max(1);
            crate::parallel::for_chunks(&mut out, per_task, true, |t, chunk| {
                run(t * per_task, chunk)
            });
        } else {
            run(0, &mut out);
        }
        return out;
    }
    let run = |row0: usize, out: &mut [T]| {
        let mut pre = Odometer::new(pre_dims, pre_strides, base, row0 / n_idx);
        let mut j = row0 % n_idx;
        for dst in out.chunks_exact_mut(inner) {
            let at = pre.offset + idx[j] * sd;
            if dense {
                dst.copy_from_slice(&src[at..at + inner]);
            } else {
                block.copy_logical(src, at, 0, dst);
            }
            j += 1;
            if j == n_idx {
                j = 0;
                pre.step();
            }
        }
    };
    let rows = outer * n_idx;
    if threaded(n, rows) {
        let per_task = rows.div_ceil(num_threads() * 4).max(1);
        crate::parallel::for_chunks(&mut out, per_task * inner, true, |t, chunk| {
            run(t * per_task, chunk)
        });
    } else {
        run(0, &mut out);
    }
    out
}

/// Adds row `g[o, j, :]` into `dst[o, idx[j], :]` for every `o`, `j` (`dst` contiguous
/// `[outer, d, inner]`, `g` contiguous `[outer, idx.len(), inner]`): the adjoint of
/// `index_select`. Threads over `outer`, or over disjoint ranges of `dst` rows when `outer`
/// is 1 (each task scans the indices and keeps its own rows).
fn index_add_kernel<T: Element>(
    dst: &mut [T],
    g: &[T],
    idx: &[usize],
    outer: usize,
    d: usize,
    inner: usize,
) {
    let n_idx = idx.len();
    if dst.is_empty() || g.is_empty() {
        return;
    }
    let add_rows = |dst: &mut [T], g: &[T], lo: usize, hi: usize| {
        for (&r, grow) in idx.iter().zip(g.chunks_exact(inner)) {
            if (lo..hi).contains(&r) {
                let drow = &mut dst[(r - lo) * inner..(r - lo + 1) * inner];
                for (a, &b) in drow.iter_mut().zip(grow) {
                    *a += b;
                }
            }
        }
    };
    use rayon::prelude::*;
    if threaded(g.len(), outer) {
        dst.par_chunks_mut(d * inner)
            .zip(g.par_chunks(n_idx * inner))
            .for_each(|(dst, g)| add_rows(dst, g, 0, d));
    } else if outer == 1 && threaded(g.len(), d) {
        let per_task = d.div_ceil(num_threads()).max(1);
        crate::parallel::for_chunks(dst, per_task * inner, true, |t, chunk| {
            let lo = t * per_task;
            add_rows(chunk, g, lo, lo + chunk.len() / inner)
        });
    } else {
        for (dst, g) in dst
            .chunks_exact_mut(d * inner)
            .zip(g.chunks_exact(n_idx * inner))
        {
            add_rows(dst, g, 0, d);
        }
    }
}

/// Shared by `index_select` and `embedding`: selects `indices` (already flattened to 1-D)
/// along `dim`, giving a result of `out_shape`.
fn select_rows(
    x: &Tensor,
    dim: usize,
    indices: &Tensor,
    out_shape: Shape,
    op: &'static str,
) -> Tensor {
    let bound = x.dims()[dim];
    let idx = read_indices(indices, bound, op, || {
        format!("dim {dim} of shape {}", x.shape())
    });
    let storage = dispatch_dtype!(x.dtype(), |T| {
        <T as Element>::into_storage(index_select_kernel::<T>(x, dim, &idx, op))
    });
    Tensor::op_result(storage, out_shape, &[x, indices], move || {
        Box::new(IndexSelectBackward { dim, op })
    })
}

struct IndexSelectBackward {
    dim: usize,
    op: &'static str,
}

impl GradFn for IndexSelectBackward {
    fn name(&self) -> &'static str {
        self.op
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (x, indices) = (&inputs[0], &inputs[1]);
        let dims = x.dims();
        let (dim, d) = (self.dim, dims[self.dim]);
        let idx = read_indices(indices, d, self.op, || {
            format!("dim {dim} of shape {}", x.shape())
        });
        let inner: usize = dims[dim + 1..].iter().product();
        let outer: usize = dims[..dim].iter().product();
        let g = g.contiguous();
        let storage = dispatch_float!(x.dtype(), self.op, |T| {
            let zero = <T as num_traits::Zero>::zero();
            let mut dst = Buffer::<T>::filled(x.elem_count(), zero);
            let guard = g.storage();
            let gs = crate::typed_slice!(guard, T, self.op);
            let gs = &gs[g.layout().contiguous_range().unwrap()];
            index_add_kernel(&mut dst, gs, &idx, outer, d, inner);
            <T as Element>::into_storage(dst)
        });
        vec![
            Some(Tensor::from_storage(
                storage,
                Layout::contiguous(x.shape().clone()),
            )),
            None,
        ]
    }
}

// ---------------------------------------------------------------------- gather / scatter_add

/// The walk shared by gather and scatter: positions of the index tensor (shape `shape`, values
/// `idx` in row-major order), grouped in rows along its last dim.
struct IndexWalk<'a> {
    shape: &'a [usize],
    idx: &'a [usize],
    dim: usize,
}

impl IndexWalk<'_> {
    fn row_len(&self) -> usize {
        *self.shape.last().unwrap()
    }

    fn rows(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }

    /// Calls `f(p0, a, b)` for each row `row0..row1` of index positions `p0..p0 + row_len`,
    /// where `a` and `b` are the offsets of the row's first position walked with `strides_a`
    /// from `base_a` and `strides_b` from `base_b` (the strides of `dim` are counted by the
    /// caller through `idx[p]`).
    fn for_each_row(
        &self,
        rows: std::ops::Range<usize>,
        (strides_a, base_a): (&[usize], usize),
        (strides_b, base_b): (&[usize], usize),
        mut f: impl FnMut(usize, usize, usize),
    ) {
        let r = self.shape.len();
        let len = self.row_len();
        let outer = &self.shape[..r - 1];
        let mut oa = Odometer::new(outer, &strides_a[..r - 1], base_a, rows.start);
        let mut ob = Odometer::new(outer, &strides_b[..r - 1], base_b, rows.start);
        for row in rows {
            f(row * len, oa.offset, ob.offset);
            oa.step();
            ob.step();
        }
    }
}

/// Strides with the entry of `dim` zeroed (that coordinate comes from the index instead).
fn without_dim(strides: &[usize], dim: usize) -> DimVec {
    let mut s = DimVec::from_slice(strides);
    s[dim] = 0;
    s
}

/// `out[i] = x[i with i[dim] = idx[i]]` over the index positions, `out` contiguous.
fn gather_kernel<T: Element>(x: &Tensor, walk: &IndexWalk, op: &str) -> Buffer<T> {
    let n = walk.idx.len();
    let mut out = Buffer::<T>::uninit(n);
    if n == 0 {
        return out;
    }
    let guard = x.storage();
    let src = crate::typed_slice!(guard, T, op);
    let xs = x.layout().strides();
    let sd = xs[walk.dim];
    let read = without_dim(xs, walk.dim);
    let zero = DimVec::from_elem(0, xs.len());
    let idx = walk.idx;
    let len = walk.row_len();
    let sl = read[read.len() - 1];
    let run = |row0: usize, out: &mut [T]| {
        let rows = row0..row0 + out.len() / len;
        let first = row0 * len;
        walk.for_each_row(
            rows,
            (&read[..], x.layout().offset()),
            (&zero[..], 0),
            |p0, a, _| {
                let dst = &mut out[p0 - first..p0 - first + len];
                let ids = &idx[p0..p0 + len];
                if sl == 0 {
                    for (o, &i) in dst.iter_mut().zip(ids) {
                        *o = src[a + i * sd];
                    }
                } else {
                    for (k, (o, &i)) in dst.iter_mut().zip(ids).enumerate() {
                        *o = src[a + k * sl + i * sd];
                    }
                }
            },
        );
    };
    let rows = walk.rows();
    if threaded(n, rows) {
        let per_task = rows.div_ceil(num_threads() * 4).max(1);
        crate::parallel::for_chunks(&mut out, per_task * len, true, |t, chunk| {
            run(t * per_task, chunk)
        });
    } else {
        run(0, &mut out);
    }
    out
}

/// `dst[i with i[dim] = idx[i]] += src[i]` over the index positions; `dst` is contiguous with
/// shape `dst_shape`. Threads over the leading dim when `dim != 0` (rows with different
/// leading coordinates write disjoint parts of `dst`).
fn scatter_add_kernel<T: Element>(
    dst: &mut [T],
    dst_shape: &Shape,
    src: &Tensor,
    walk: &IndexWalk,
    op: &str,
) {
    let n = walk.idx.len();
    if n == 0 {
        return;
    }
    let guard = src.storage();
    let s = crate::typed_slice!(guard, T, op);
    let ds_full = dst_shape.contiguous_strides();
    let sd = ds_full[walk.dim];
    let write = without_dim(&ds_full, walk.dim);
    let idx = walk.idx;
    let read = (src.layout().strides(), src.layout().offset());
    let (wl, rl) = (write[write.len() - 1], read.0[read.0.len() - 1]);
    let len = walk.row_len();
    let run = |dst: &mut [T], origin: usize, rows: std::ops::Range<usize>| {
        walk.for_each_row(rows, (&write[..], 0), read, |p0, a, b| {
            let ids = &idx[p0..p0 + len];
            for (k, &i) in ids.iter().enumerate() {
                dst[a + k * wl + i * sd - origin] += s[b + k * rl];
            }
        });
    };
    let lead = walk.shape[0];
    let rows = walk.rows();
    if walk.dim != 0 && walk.shape.len() > 1 && threaded(n, lead) {
        let rows_per_lead = rows / lead;
        let per_task = lead.div_ceil(num_threads() * 2).max(1);
        let stride0 = ds_full[0];
        crate::parallel::for_chunks(dst, per_task * stride0, true, |t, chunk| {
            let (l0, l1) = (t * per_task, ((t + 1) * per_task).min(lead));
            if l0 < l1 {
                run(chunk, l0 * stride0, l0 * rows_per_lead..l1 * rows_per_lead);
            }
        });
    } else {
        run(dst, 0, 0..rows);
    }
}

/// Shape checks of gather / scatter_add: `index` has the rank of `x`, and fits in `x`
/// outside `dim` (and in `src`, if any, everywhere).
fn check_index_shape(op: &str, x: &Tensor, dim: usize, index: &Tensor, src: Option<&Tensor>) {
    assert!(
        index.rank() == x.rank(),
        "{op}: index shape {} must have the rank of self shape {}",
        index.shape(),
        x.shape()
    );
    let fits = (0..x.rank()).all(|d| d == dim || index.dims()[d] <= x.dims()[d]);
    assert!(
        fits,
        "{op}: index shape {} exceeds self shape {} outside dim {dim}",
        index.shape(),
        x.shape()
    );
    if let Some(src) = src {
        assert!(
            src.rank() == index.rank() && (0..src.rank()).all(|d| index.dims()[d] <= src.dims()[d]),
            "{op}: index shape {} exceeds src shape {}",
            index.shape(),
            src.shape()
        );
        assert!(
            src.dtype() == x.dtype(),
            "{op}: dtype mismatch, self is {} and src is {}",
            x.dtype(),
            src.dtype()
        );
    }
}

fn gather_impl(x: &Tensor, dim: usize, index: &Tensor) -> Tensor {
    let idx = read_indices(index, x.dims()[dim], "gather", || {
        format!("dim {dim} of shape {}", x.shape())
    });
    let walk = IndexWalk {
        shape: index.dims(),
        idx: &idx,
        dim,
    };
    let storage = dispatch_dtype!(x.dtype(), |T| {
        <T as Element>::into_storage(gather_kernel::<T>(x, &walk, "gather"))
    });
    Tensor::op_result(storage, index.shape().clone(), &[x, index], move || {
        Box::new(GatherBackward { dim })
    })
}

/// Zeros of `shape` (dtype `T`) with `src` (contiguous, dtype `T`) scattered at `index`.
fn scatter_into_zeros<T: Element>(
    shape: &Shape,
    dim: usize,
    index: &Tensor,
    src: &Tensor,
    op: &str,
) -> Buffer<T> {
    let idx = read_indices(index, shape.dims()[dim], op, || {
        format!("dim {dim} of shape {shape}")
    });
    let walk = IndexWalk {
        shape: index.dims(),
        idx: &idx,
        dim,
    };
    let mut dst = Buffer::<T>::filled(shape.elem_count(), <T as num_traits::Zero>::zero());
    scatter_add_kernel(&mut dst, shape, src, &walk, op);
    dst
}

struct GatherBackward {
    dim: usize,
}

impl GradFn for GatherBackward {
    fn name(&self) -> &'static str {
        "gather"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (x, index) = (&inputs[0], &inputs[1]);
        let storage = dispatch_float!(x.dtype(), "gather", |T| {
            let buf = scatter_into_zeros::<T>(x.shape(), self.dim, index, g, "gather");
            <T as Element>::into_storage(buf)
        });
        vec![
            Some(Tensor::from_storage(
                storage,
                Layout::contiguous(x.shape().clone()),
            )),
            None,
        ]
    }
}

fn scatter_add_impl(x: &Tensor, dim: usize, index: &Tensor, src: &Tensor) -> Tensor {
    let idx = read_indices(index, x.dims()[dim], "scatter_add", || {
        format!("dim {dim} of shape {}", x.shape())
    });
    let walk = IndexWalk {
        shape: index.dims(),
        idx: &idx,
        dim,
    };
    let storage = dispatch_dtype!(x.dtype(), |T| {
        let mut dst = Buffer::<T>::uninit(x.elem_count());
        {
            let guard = x.storage();
            let xs = crate::typed_slice!(guard, T, "scatter_add");
            StridedSource::new(x.layout()).copy_logical(xs, 0, 0, &mut dst);
        }
        scatter_add_kernel(&mut dst, x.shape(), src, &walk, "scatter_add");
        <T as Element>::into_storage(dst)
    });
    Tensor::op_result(storage, x.shape().clone(), &[x, index, src], move || {
        Box::new(ScatterAddBackward { dim })
    })
}

struct ScatterAddBackward {
    dim: usize,
}

impl GradFn for ScatterAddBackward {
    fn name(&self) -> &'static str {
        "scatter_add"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (x, index, src) = (&inputs[0], &inputs[1], &inputs[2]);
        let gx = x.tracks_grad().then(|| g.clone());
        let gsrc = src.tracks_grad().then(|| {
            let picked = gather_impl(g, self.dim, index);
            if picked.shape() == src.shape() {
                return picked;
            }
            // src is larger than index: positions the index does not reach get zero.
            let region = (0..src.rank()).fold(Layout::contiguous(src.shape().clone()), |l, d| {
                l.narrow(d, 0, index.dims()[d])
            });
            let storage = dispatch_float!(src.dtype(), "scatter_add", |T| {
                let mut out =
                    Buffer::<T>::filled(src.elem_count(), <T as num_traits::Zero>::zero());
                let guard = picked.storage();
                let vals = crate::typed_slice!(guard, T, "scatter_add");
                let mut i = 0;
                region.for_each_run(|start, n, stride| {
                    for k in 0..n {
                        out[start + k * stride] = vals[i + k];
                    }
                    i += n;
                });
                <T as Element>::into_storage(out)
            });
            Tensor::from_storage(storage, Layout::contiguous(src.shape().clone()))
        });
        vec![gx, None, gsrc]
    }
}

// ---------------------------------------------------------------------- public API

impl Tensor {
    /// The entries at 1-D `indices` (i64 or u32) along `dim`: that dim gets `indices.len()`.
    pub fn index_select(&self, dim: impl Dim, indices: &Tensor) -> Tensor {
        let dim = dim.resolve(self.rank(), "index_select");
        assert!(
            indices.rank() == 1,
            "index_select: indices must be 1-D, got shape {} (self shape {})",
            indices.shape(),
            self.shape()
        );
        let mut dims = DimVec::from_slice(self.dims());
        dims[dim] = indices.elem_count();
        select_rows(self, dim, indices, Shape::from(dims), "index_select")
    }

    /// PyTorch's `gather`: `out[i] = self[i with i[dim] = index[i]]`, shaped like `index`.
    pub fn gather(&self, dim: impl Dim, index: &Tensor) -> Tensor {
        let dim = dim.resolve(self.rank(), "gather");
        check_index_shape("gather", self, dim, index, None);
        gather_impl(self, dim, index)
    }

    /// A copy of `self` with `src[i]` added at `i with i[dim] = index[i]` for each `i` of `index`.
    pub fn scatter_add(&self, dim: impl Dim, index: &Tensor, src: &Tensor) -> Tensor {
        let dim = dim.resolve(self.rank(), "scatter_add");
        check_index_shape("scatter_add", self, dim, index, Some(src));
        scatter_add_impl(self, dim, index, src)
    }

    /// Rows of this `[vocab, dim]` weight picked by integer `ids` of any shape: `[ids.., dim]`.
    pub fn embedding(&self, ids: &Tensor) -> Tensor {
        assert!(
            self.rank() == 2,
            "embedding: weight must be 2-D [vocab, dim], got shape {} (ids shape {})",
            self.shape(),
            ids.shape()
        );
        let mut dims = DimVec::from_slice(ids.dims());
        dims.push(self.dims()[1]);
        let flat = ids.reshape([ids.elem_count()]);
        select_rows(self, 0, &flat, Shape::from(dims), "embedding")
    }

    /// An f32 tensor `[.., num_classes]` with a 1 at each integer's class and 0 elsewhere.
    pub fn one_hot(&self, num_classes: usize) -> Tensor {
        let idx = read_indices(self, num_classes, "one_hot", || {
            format!("{num_classes} classes")
        });
        let mut out = Buffer::<f32>::filled(idx.len() * num_classes, 0.0);
        for (row, &i) in idx.iter().enumerate() {
            out[row * num_classes + i] = 1.0;
        }
        let mut dims = DimVec::from_slice(self.dims());
        dims.push(num_classes);
        Tensor::from_buffer(out, Shape::from(dims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::gradcheck::{gradcheck, randn_f64};

    fn ids(v: &[i64], shape: impl Into<Shape>) -> Tensor {
        Tensor::from_slice(v, shape)
    }

    fn ids_u32(v: &[u32], shape: impl Into<Shape>) -> Tensor {
        Tensor::from_slice(v, shape)
    }

    fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; dims.len()];
        for d in (0..dims.len()).rev() {
            idx[d] = i % dims[d];
            i /= dims[d];
        }
        idx
    }

    fn ravel(idx: &[usize], dims: &[usize]) -> usize {
        idx.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
    }

    #[test]
    fn index_select_matches_reference_on_every_dim() {
        // A transposed [4, 3, 5] view.
        let x = randn_f64(&[4, 5, 3], 1).transpose(1, 2);
        let xv = x.to_vec::<f64>();
        let xd = [4, 3, 5];
        for dim in 0..3 {
            let sel: Vec<i64> = (0..6).map(|k| (k * 7 % xd[dim]) as i64).collect();
            let got = x.index_select(dim, &ids(&sel, 6));
            let mut od = xd.to_vec();
            od[dim] = 6;
            assert_eq!(got.dims(), &od[..]);
            for (i, v) in got.to_vec::<f64>().into_iter().enumerate() {
                let mut idx = unravel(i, &od);
                idx[dim] = sel[idx[dim]] as usize;
                assert_eq!(v, xv[ravel(&idx, &xd)]);
            }
        }
        // u32 indices, an int tensor, non-contiguous indices.
        let t = Tensor::arange_i64(0, 12, 1).reshape([3, 4]);
        let u = ids_u32(&[2, 0, 9, 1], 4).narrow(0, 0, 4);
        let every_other = ids(&[3, 9, 0, 9, 3, 9], 6)
            .reshape([3, 2])
            .narrow(1, 0, 1)
            .squeeze(1);
        assert_eq!(
            t.index_select(0, &u.narrow(0, 0, 2)).to_vec::<i64>(),
            vec![8, 9, 10, 11, 0, 1, 2, 3]
        );
        assert_eq!(
            t.index_select(1, &every_other).to_vec::<i64>(),
            vec![3, 0, 3, 7, 4, 7, 11, 8, 11]
        );
    }

    #[test]
    fn large_index_select_and_embedding_threads_correctly() {
        let w = Tensor::randn_f64([500, 130], 2);
        let id_vals: Vec<i64> = (0..700).map(|k| (k * 37 % 500) as i64).collect();
        let e = w.embedding(&ids(&id_vals, [7, 100]));
        assert_eq!(e.dims(), &[7, 100, 130]);
        let (wv, ev) = (w.to_vec::<f64>(), e.to_vec::<f64>());
        for (p, &i) in id_vals.iter().enumerate() {
            assert_eq!(
                &ev[p * 130..(p + 1) * 130],
                &wv[i as usize * 130..(i as usize + 1) * 130]
            );
        }
        // Transposed weight: strided rows.
        let wt = Tensor::randn_f64([130, 500], 3).t();
        let e = wt.embedding(&ids(&id_vals, 700));
        let (wv, ev) = (wt.to_vec::<f64>(), e.to_vec::<f64>());
        for (p, &i) in id_vals.iter().enumerate() {
            assert_eq!(
                &ev[p * 130..(p + 1) * 130],
                &wv[i as usize * 130..(i as usize + 1) * 130]
            );
        }
    }

    #[test]
    fn embedding_backward_accumulates_repeated_rows() {
        for (vocab, n, dim) in [(5, 4, 3), (300, 2000, 64)] {
            let w = Tensor::randn_f64([vocab, dim], 4).requires_grad();
            let id_vals: Vec<i64> = (0..n).map(|k| (k * k % vocab) as i64).collect();
            let g = Tensor::randn_f64([n, dim], 5);
            w.embedding(&ids(&id_vals, n)).backward_with_grad(&g);
            let gv = g.to_vec::<f64>();
            let mut want = vec![0.0; vocab * dim];
            for (p, &i) in id_vals.iter().enumerate() {
                for c in 0..dim {
                    want[i as usize * dim + c] += gv[p * dim + c];
                }
            }
            let got = w.grad().unwrap().to_vec::<f64>();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
        }
    }

    /// Reference gather by index arithmetic.
    fn gather_ref(xv: &[f64], xd: &[usize], dim: usize, iv: &[i64], id: &[usize]) -> Vec<f64> {
        (0..iv.len())
            .map(|p| {
                let mut i = unravel(p, id);
                i[dim] = iv[p] as usize;
                xv[ravel(&i, xd)]
            })
            .collect()
    }

    #[test]
    fn gather_matches_reference() {
        let x = randn_f64(&[4, 6, 5], 6).narrow(1, 1, 4); // [4, 4, 5], non-contiguous
        let xv = x.to_vec::<f64>();
        for dim in 0..3 {
            let id = [3, 2, 4];
            let n: usize = id.iter().product();
            let iv: Vec<i64> = (0..n)
                .map(|k| ((k * 5 + 1) % x.dims()[dim]) as i64)
                .collect();
            let got = x.gather(dim, &ids(&iv, id));
            assert_eq!(got.dims(), &id);
            assert_eq!(
                got.to_vec::<f64>(),
                gather_ref(&xv, &[4, 4, 5], dim, &iv, &id)
            );
        }
        // A large gather (threaded), index along the last dim.
        let x = Tensor::randn_f64([300, 400], 7);
        let iv: Vec<i64> = (0..300 * 250).map(|k| (k * 13 % 400) as i64).collect();
        let got = x.gather(1, &ids(&iv, [300, 250]));
        assert_eq!(
            got.to_vec::<f64>(),
            gather_ref(&x.to_vec(), &[300, 400], 1, &iv, &[300, 250])
        );
    }

    #[test]
    fn scatter_add_matches_reference_and_accumulates_duplicates() {
        for (xd, idd, sd, dim) in [
            (vec![3, 5], vec![3, 4], vec![3, 4], 1),
            (vec![3, 5], vec![6, 2], vec![7, 3], 0),
            (vec![200, 40, 30], vec![200, 50, 20], vec![200, 50, 20], 1),
            (vec![4, 3, 2], vec![2, 3, 2], vec![2, 4, 2], 2),
        ] {
            let x = randn_f64(&xd, 8);
            let src = randn_f64(&sd, 9);
            let n: usize = idd.iter().product();
            let iv: Vec<i64> = (0..n).map(|k| ((k * 7 + 3) % xd[dim]) as i64).collect();
            let got = x.scatter_add(dim, &ids(&iv, &idd[..]), &src);
            let mut want = x.to_vec::<f64>();
            let sv = src.to_vec::<f64>();
            for (p, &v) in iv.iter().enumerate() {
                let mut i = unravel(p, &idd);
                let s = sv[ravel(&i, &sd)];
                i[dim] = v as usize;
                want[ravel(&i, &xd)] += s;
            }
            let got = got.to_vec::<f64>();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn one_hot_marks_classes() {
        let y = ids(&[2, 0, 1, 2], [2, 2]);
        let h = y.one_hot(3);
        assert_eq!(h.dims(), &[2, 2, 3]);
        assert_eq!(h.dtype(), DType::F32);
        let hv = h.to_vec::<f32>();
        for (p, &c) in [2usize, 0, 1, 2].iter().enumerate() {
            for k in 0..3 {
                assert_eq!(hv[p * 3 + k], if k == c { 1.0 } else { 0.0 });
            }
        }
        assert_eq!(ids_u32(&[1], 1).one_hot(2).to_vec::<f32>(), vec![0.0, 1.0]);
        assert_eq!(
            Tensor::zeros_dtype([0], DType::I64).one_hot(4).dims(),
            &[0, 4]
        );
    }

    #[test]
    #[should_panic(
        expected = "gather: index 4 out of range for dim 1 of shape [2, 4] (valid: 0..4)"
    )]
    fn gather_out_of_range_names_index_and_bound() {
        let _ = Tensor::zeros([2, 4]).gather(1, &ids(&[0, 4], [1, 2]));
    }

    #[test]
    #[should_panic(
        expected = "index_select: index -1 out of range for dim 0 of shape [3] (valid: 0..3)"
    )]
    fn negative_index_panics() {
        let _ = Tensor::zeros([3]).index_select(0, &ids(&[0, -1], 2));
    }

    #[test]
    #[should_panic(
        expected = "embedding: index 10 out of range for dim 0 of shape [10, 4] (valid: 0..10)"
    )]
    fn embedding_out_of_range_panics() {
        let _ = Tensor::zeros([10, 4]).embedding(&ids_u32(&[3, 10], 2));
    }

    #[test]
    #[should_panic(expected = "one_hot: index 3 out of range for 3 classes (valid: 0..3)")]
    fn one_hot_out_of_range_panics() {
        let _ = ids(&[0, 3], 2).one_hot(3);
    }

    #[test]
    #[should_panic(
        expected = "index_select: indices must be i64 or u32, got f32 (index shape [2])"
    )]
    fn float_indices_panic() {
        let _ = Tensor::zeros([3]).index_select(0, &Tensor::zeros([2]));
    }

    #[test]
    #[should_panic(
        expected = "index_select: indices must be 1-D, got shape [1, 2] (self shape [3])"
    )]
    fn index_select_needs_1d_indices() {
        let _ = Tensor::zeros([3]).index_select(0, &ids(&[0, 1], [1, 2]));
    }

    #[test]
    #[should_panic(expected = "gather: index shape [2, 3] exceeds self shape [4, 2] outside dim 0")]
    fn gather_index_shape_must_fit() {
        let _ = Tensor::zeros([4, 2]).gather(0, &ids(&[0; 6], [2, 3]));
    }

    #[test]
    #[should_panic(expected = "gather: index shape [6] must have the rank of self shape [4, 2]")]
    fn gather_index_rank_must_match() {
        let _ = Tensor::zeros([4, 2]).gather(0, &ids(&[0; 6], 6));
    }

    #[test]
    #[should_panic(expected = "scatter_add: index shape [2, 3] exceeds src shape [2, 2]")]
    fn scatter_src_must_cover_index() {
        let _ = Tensor::zeros([4, 3]).scatter_add(0, &ids(&[0; 6], [2, 3]), &Tensor::zeros([2, 2]));
    }

    #[test]
    #[should_panic(
        expected = "embedding: weight must be 2-D [vocab, dim], got shape [10] (ids shape [2])"
    )]
    fn embedding_needs_a_matrix() {
        let _ = Tensor::zeros([10]).embedding(&ids(&[0, 1], 2));
    }

    #[test]
    fn gradcheck_index_ops() {
        let x = randn_f64(&[4, 6], 10).requires_grad();
        let s = randn_f64(&[5, 3], 11).requires_grad();
        let xs = [x, s];
        // Repeated indices exercise accumulation in every backward.
        let sel = ids(&[3, 0, 3, 2, 3], 5);
        gradcheck(|x| x[0].index_select(0, &sel), &xs).unwrap();
        gradcheck(|x| x[0].t().index_select(0, &sel), &xs).unwrap();
        gradcheck(|x| x[0].narrow(1, 1, 4).index_select(1, &sel), &xs).unwrap();
        // gather from a narrowed tensor and from a transposed one
        let gi = ids(&[0, 3, 3, 1, 2, 2, 0, 0, 1, 3, 1, 1], [4, 3]);
        gradcheck(|x| x[0].narrow(1, 2, 4).gather(1, &gi), &xs).unwrap();
        gradcheck(|x| x[0].t().gather(0, &gi.narrow(0, 0, 3)), &xs).unwrap();
        // scatter_add w.r.t. self and src, src larger than index, non-contiguous operands
        let si = ids(&[1, 1, 0, 3, 3, 3], [2, 3]);
        gradcheck(|x| x[0].narrow(1, 0, 3).scatter_add(0, &si, &x[1]), &xs).unwrap();
        gradcheck(|x| x[0].t().scatter_add(1, &si, &x[1].t()), &xs).unwrap();
        // embedding of a transposed weight with 2-D ids
        let e = ids_u32(&[5, 0, 5, 1, 2, 5], [3, 2]);
        gradcheck(|x| x[0].t().embedding(&e), &xs).unwrap();
        gradcheck(|x| x[1].embedding(&ids(&[4, 4, 0], 3)), &xs).unwrap();
    }
}
