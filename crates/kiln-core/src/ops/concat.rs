//! Joining and splitting along a dim: `cat`, `stack` (copies into one output buffer) and
//! `split`, `split_sizes`, `chunk` (zero-copy `narrow` views), with their backward rules.
//!
//! Also home of the strided-copy helpers (`Odometer`, `StridedSource`) that the indexing
//! kernels share: they copy runs of a view's elements in row-major order, as one `memcpy` per
//! contiguous run.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_dtype;
use crate::dtype::Element;
use crate::layout::Layout;
use crate::parallel::for_each_chunk;
use crate::shape::{Dim, DimVec, Shape};
use crate::tensor::Tensor;
use std::borrow::Borrow;

// ---------------------------------------------------------------------- strided-copy helpers

/// Row-major walk over a strided index space: `offset` is the storage offset of the current
/// position; `step` moves to the next position (wrapping to the start after the last one).
pub(crate) struct Odometer {
    dims: DimVec,
    strides: DimVec,
    index: DimVec,
    /// Storage offset of the current position.
    pub(crate) offset: usize,
}

impl Odometer {
    /// Starts at row-major position `start` of `dims` walked with `strides` from `base`.
    pub(crate) fn new(dims: &[usize], strides: &[usize], base: usize, start: usize) -> Self {
        let mut index = DimVec::from_elem(0, dims.len());
        let mut rem = start;
        let mut offset = base;
        for d in (0..dims.len()).rev() {
            if dims[d] == 0 {
                continue;
            }
            index[d] = rem % dims[d];
            rem /= dims[d];
            offset += index[d] * strides[d];
        }
        Odometer {
            dims: DimVec::from_slice(dims),
            strides: DimVec::from_slice(strides),
            index,
            offset,
        }
    }

    /// Advances to the next row-major position.
    #[inline]
    pub(crate) fn step(&mut self) {
        for d in (0..self.dims.len()).rev() {
            self.index[d] += 1;
            self.offset += self.strides[d];
            if self.index[d] < self.dims[d] {
                return;
            }
            self.offset -= self.strides[d] * self.dims[d];
            self.index[d] = 0;
        }
    }
}

/// Copies `dst.len()` elements read from `src` at `start`, `start + stride`, ...
#[inline]
pub(crate) fn copy_1d<T: Copy>(src: &[T], start: usize, stride: usize, dst: &mut [T]) {
    if stride == 1 {
        dst.copy_from_slice(&src[start..start + dst.len()]);
    } else {
        for (k, d) in dst.iter_mut().enumerate() {
            *d = src[start + k * stride];
        }
    }
}

/// A view's walk over its storage with dims merged (see [`Layout::merged`]): copies any range
/// of its elements (in row-major order) with one `copy_1d` per inner run.
pub(crate) struct StridedSource {
    dims: DimVec,
    strides: DimVec,
    offset: usize,
}

impl StridedSource {
    /// The walk over `layout`.
    pub(crate) fn new(layout: &Layout) -> Self {
        let (dims, strides) = layout.merged();
        StridedSource {
            dims,
            strides,
            offset: layout.offset(),
        }
    }

    /// The walk over a block with `dims` and `strides` relative to offset 0.
    pub(crate) fn block(dims: &[usize], strides: &[usize]) -> Self {
        let layout = Layout::new(Shape::from(dims), DimVec::from_slice(strides), 0);
        Self::new(&layout)
    }

    /// True when the elements lie back to back in storage.
    pub(crate) fn is_dense(&self) -> bool {
        self.dims.len() <= 1 && self.strides.first().is_none_or(|&s| s == 1)
    }

    /// Copies elements `j..j + dst.len()` (row-major) of the view, shifted by `base` in storage.
    pub(crate) fn copy_logical<T: Copy>(&self, src: &[T], base: usize, j: usize, dst: &mut [T]) {
        let base = base + self.offset;
        let r = self.dims.len();
        if r == 0 {
            // A single element (all dims of size 1).
            if let Some(d) = dst.first_mut() {
                *d = src[base];
            }
            return;
        }
        if r == 1 {
            return copy_1d(src, base + j * self.strides[0], self.strides[0], dst);
        }
        let (n, s) = (self.dims[r - 1], self.strides[r - 1]);
        let mut rows = Odometer::new(&self.dims[..r - 1], &self.strides[..r - 1], base, j / n);
        let mut k = j % n;
        let mut written = 0;
        while written < dst.len() {
            let m = (n - k).min(dst.len() - written);
            copy_1d(src, rows.offset + k * s, s, &mut dst[written..written + m]);
            written += m;
            k = 0;
            rows.step();
        }
    }
}

// ---------------------------------------------------------------------- cat

fn cat_impl(tensors: &[&Tensor], dim: usize) -> Tensor {
    let first = tensors[0];
    let rank = first.rank();
    for t in &tensors[1..] {
        assert!(
            t.dtype() == first.dtype(),
            "cat: dtype mismatch, {} vs {} (shapes {} and {})",
            first.dtype(),
            t.dtype(),
            first.shape(),
            t.shape()
        );
        assert!(
            t.rank() == rank,
            "cat: shapes {} and {} differ in rank",
            first.shape(),
            t.shape()
        );
        let same_outside = (0..rank).all(|d| d == dim || t.dims()[d] == first.dims()[d]);
        assert!(
            same_outside,
            "cat: shapes {} and {} differ outside dim {dim}",
            first.shape(),
            t.shape()
        );
    }
    let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[dim]).collect();
    let total: usize = sizes.iter().sum();
    let mut out_dims = DimVec::from_slice(first.dims());
    out_dims[dim] = total;
    let out_shape = Shape::from(out_dims);
    let inner: usize = first.dims()[dim + 1..].iter().product();

    let storage = dispatch_dtype!(first.dtype(), |T| {
        let buf = cat_kernel::<T>(tensors, &sizes, inner, out_shape.elem_count());
        <T as Element>::into_storage(buf)
    });
    let grad_sizes = sizes;
    Tensor::op_result(storage, out_shape, tensors, move || {
        Box::new(CatBackward {
            dim,
            sizes: grad_sizes,
        })
    })
}

/// The output viewed as `[outer, total * inner]`: each row holds, for every input in turn,
/// its `size_i * inner` elements of that outer position. Any range of the output is filled
/// segment by segment, each segment one strided copy from one input.
fn cat_kernel<T: Element>(
    tensors: &[&Tensor],
    sizes: &[usize],
    inner: usize,
    n: usize,
) -> Buffer<T> {
    let mut out = Buffer::<T>::uninit(n);
    if n == 0 {
        return out;
    }
    let guards: Vec<_> = tensors.iter().map(|t| t.storage()).collect();
    let srcs: Vec<&[T]> = guards
        .iter()
        .map(|g| crate::typed_slice!(g, T, "cat"))
        .collect();
    let walks: Vec<StridedSource> = tensors
        .iter()
        .map(|t| StridedSource::new(t.layout()))
        .collect();
    // Segment of each input within an output row: start and length in elements.
    let seg_len: Vec<usize> = sizes.iter().map(|&s| s * inner).collect();
    let mut seg_start = Vec::with_capacity(sizes.len());
    let mut acc = 0;
    for &l in &seg_len {
        seg_start.push(acc);
        acc += l;
    }
    let row = acc;
    for_each_chunk(&mut out, |start, chunk| {
        let end = start + chunk.len();
        let mut p = start;
        while p < end {
            let (o, r) = (p / row, p % row);
            let i = seg_start.partition_point(|&s| s <= r) - 1;
            let m = (end - p).min(seg_start[i] + seg_len[i] - r);
            let j = o * seg_len[i] + (r - seg_start[i]);
            let dst = &mut chunk[p - start..p - start + m];
            walks[i].copy_logical(srcs[i], 0, j, dst);
            p += m;
        }
    });
    out
}

struct CatBackward {
    dim: usize,
    sizes: Vec<usize>,
}

impl GradFn for CatBackward {
    fn name(&self) -> &'static str {
        "cat"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let mut start = 0;
        inputs
            .iter()
            .zip(&self.sizes)
            .map(|(x, &len)| {
                let grad = x.tracks_grad().then(|| g.narrow(self.dim, start, len));
                start += len;
                grad
            })
            .collect()
    }
}

impl Tensor {
    /// Concatenation along `dim` of tensors (`&[Tensor]` or `&[&Tensor]`) equal outside `dim`.
    pub fn cat<T: Borrow<Tensor>>(tensors: &[T], dim: impl Dim) -> Tensor {
        assert!(
            !tensors.is_empty(),
            "cat: expected at least one tensor, got an empty list"
        );
        let refs: Vec<&Tensor> = tensors.iter().map(|t| t.borrow()).collect();
        let dim = dim.resolve(refs[0].rank(), "cat");
        if refs.len() == 1 {
            return refs[0].clone();
        }
        cat_impl(&refs, dim)
    }

    /// Tensors of one shape joined along a new dim inserted at `dim`.
    pub fn stack<T: Borrow<Tensor>>(tensors: &[T], dim: impl Dim) -> Tensor {
        assert!(
            !tensors.is_empty(),
            "stack: expected at least one tensor, got an empty list"
        );
        let first = tensors[0].borrow();
        for t in tensors[1..].iter().map(|t| t.borrow()) {
            assert!(
                t.shape() == first.shape(),
                "stack: shapes {} and {} differ",
                first.shape(),
                t.shape()
            );
        }
        let dim = dim.resolve(first.rank() + 1, "stack");
        let views: Vec<Tensor> = tensors.iter().map(|t| t.borrow().unsqueeze(dim)).collect();
        if views.len() == 1 {
            return views.into_iter().next().unwrap();
        }
        let refs: Vec<&Tensor> = views.iter().collect();
        cat_impl(&refs, dim)
    }

    /// Views of `size` elements along `dim` each (the last may be smaller).
    pub fn split(&self, size: usize, dim: impl Dim) -> Vec<Tensor> {
        let dim = dim.resolve(self.rank(), "split");
        let d = self.dims()[dim];
        assert!(
            size > 0 || d == 0,
            "split: size must be positive, got 0 for dim {dim} of shape {}",
            self.shape()
        );
        if d == 0 {
            return vec![self.clone()];
        }
        (0..d)
            .step_by(size)
            .map(|start| self.narrow(dim, start, size.min(d - start)))
            .collect()
    }

    /// Views with the given sizes along `dim` (they must add up to its size).
    pub fn split_sizes(&self, sizes: &[usize], dim: impl Dim) -> Vec<Tensor> {
        let dim = dim.resolve(self.rank(), "split_sizes");
        let total: usize = sizes.iter().sum();
        assert!(
            total == self.dims()[dim],
            "split_sizes: sizes {sizes:?} add up to {total}, but dim {dim} of shape {} has size {}",
            self.shape(),
            self.dims()[dim]
        );
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let piece = self.narrow(dim, start, len);
                start += len;
                piece
            })
            .collect()
    }

    /// At most `n` views along `dim` of `ceil(size / n)` elements each (PyTorch's `chunk`).
    pub fn chunk(&self, n: usize, dim: impl Dim) -> Vec<Tensor> {
        assert!(n > 0, "chunk: number of chunks must be positive, got 0");
        let dim = dim.resolve(self.rank(), "chunk");
        let d = self.dims()[dim];
        if d == 0 {
            return vec![self.clone(); n];
        }
        self.split(d.div_ceil(n), dim)
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::Tensor;

    /// Row-major multi-index of linear position `i` in `dims`.
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

    /// Reference concatenation by index arithmetic on row-major data.
    fn cat_reference(parts: &[(Vec<f64>, Vec<usize>)], dim: usize) -> (Vec<f64>, Vec<usize>) {
        let mut out_dims = parts[0].1.clone();
        out_dims[dim] = parts.iter().map(|p| p.1[dim]).sum();
        let n: usize = out_dims.iter().product();
        let out = (0..n)
            .map(|i| {
                let mut idx = unravel(i, &out_dims);
                let mut k = 0;
                while idx[dim] >= parts[k].1[dim] {
                    idx[dim] -= parts[k].1[dim];
                    k += 1;
                }
                parts[k].0[ravel(&idx, &parts[k].1)]
            })
            .collect();
        (out, out_dims)
    }

    #[test]
    fn cat_matches_index_reference_for_every_dim_and_layout() {
        for dim in 0..3 {
            let mut dims_a = vec![2, 3, 4];
            let mut dims_b = vec![2, 3, 4];
            dims_a[dim] = 1;
            dims_b[dim] = 3;
            let a = randn_f64(&dims_a, 1);
            // b is stored transposed in its last two dims.
            let mut stored = dims_b.clone();
            stored.swap(1, 2);
            let b = randn_f64(&stored, 2).transpose(1, 2);
            let c = randn_f64(&dims_a, 3).narrow(0, 0, dims_a[0]);
            let (want, want_dims) = cat_reference(
                &[
                    (a.to_vec(), dims_a.clone()),
                    (b.to_vec(), dims_b.clone()),
                    (c.to_vec(), dims_a.clone()),
                ],
                dim,
            );
            let got = Tensor::cat(&[&a, &b, &c], dim);
            assert_eq!(got.dims(), &want_dims[..]);
            assert_eq!(got.to_vec::<f64>(), want);
            // Negative dims and owned slices.
            let got = Tensor::cat(&[a.clone(), b.clone(), c.clone()], dim as i32 - 3);
            assert_eq!(got.to_vec::<f64>(), want);
        }
    }

    #[test]
    fn cat_of_large_inputs_uses_chunks_correctly() {
        // Above the threading threshold, with a non-contiguous input.
        let a = Tensor::randn_f64([300, 257], 4);
        let b = Tensor::randn_f64([123, 300], 5).t();
        let got = Tensor::cat(&[&a, &b], 1);
        let (want, dims) = cat_reference(
            &[(a.to_vec(), vec![300, 257]), (b.to_vec(), vec![300, 123])],
            1,
        );
        assert_eq!(got.dims(), &dims[..]);
        assert_eq!(got.to_vec::<f64>(), want);
    }

    #[test]
    fn cat_handles_empty_pieces_and_int_dtypes() {
        let a = Tensor::arange_i64(0, 6, 1).reshape([2, 3]);
        let e = Tensor::zeros_dtype([2, 0], crate::DType::I64);
        let b = Tensor::arange_i64(6, 8, 1).reshape([2, 1]);
        let got = Tensor::cat(&[&e, &a, &e, &b, &e], 1);
        assert_eq!(got.to_vec::<i64>(), vec![0, 1, 2, 6, 3, 4, 5, 7]);
        assert_eq!(Tensor::cat(&[&e, &e], 1).dims(), &[2, 0]);
    }

    #[test]
    fn stack_inserts_a_new_dim() {
        let a = randn_f64(&[2, 3], 6);
        let b = randn_f64(&[3, 2], 7).t();
        for dim in 0..3 {
            let s = Tensor::stack(&[&a, &b], dim);
            let mut dims = vec![2, 3];
            dims.insert(dim, 2);
            assert_eq!(s.dims(), &dims[..]);
            let (va, vb) = (a.to_vec::<f64>(), b.to_vec::<f64>());
            for (i, v) in s.to_vec::<f64>().into_iter().enumerate() {
                let mut idx = unravel(i, &dims);
                let which = idx.remove(dim);
                let src = if which == 0 { &va } else { &vb };
                assert_eq!(v, src[ravel(&idx, &[2, 3])]);
            }
        }
        assert_eq!(Tensor::stack(&[&a], -1).dims(), &[2, 3, 1]);
    }

    #[test]
    fn split_and_chunk_follow_torch() {
        let x = Tensor::from_vec((0..10).map(|v| v as f32).collect(), [10]);
        let sizes = |v: Vec<Tensor>| v.iter().map(|t| t.dims()[0]).collect::<Vec<_>>();
        assert_eq!(sizes(x.split(3, 0)), vec![3, 3, 3, 1]);
        assert_eq!(sizes(x.split(10, 0)), vec![10]);
        assert_eq!(sizes(x.split(20, 0)), vec![10]);
        assert_eq!(sizes(x.chunk(3, 0)), vec![4, 4, 2]);
        assert_eq!(sizes(x.chunk(4, 0)), vec![3, 3, 3, 1]);
        // torch.arange(10).chunk(6) has 5 pieces of 2.
        assert_eq!(sizes(x.chunk(6, 0)), vec![2, 2, 2, 2, 2]);
        assert_eq!(sizes(x.chunk(20, 0)), vec![1; 10]);
        assert_eq!(sizes(x.split_sizes(&[1, 0, 9], 0)), vec![1, 0, 9]);
        let pieces = x.split(3, 0);
        assert!(pieces.iter().all(|p| p.same_storage(&x)));
        assert_eq!(pieces[1].to_vec::<f32>(), vec![3.0, 4.0, 5.0]);
        assert_eq!(pieces[3].to_vec::<f32>(), vec![9.0]);
        let empty = Tensor::zeros([2, 0]);
        assert_eq!(empty.chunk(3, 1).len(), 3);
        assert_eq!(empty.split(2, 1).len(), 1);
    }

    #[test]
    fn split_then_cat_round_trips_on_a_view() {
        let x = randn_f64(&[5, 7], 8).t(); // [7, 5], non-contiguous
        for dim in 0..2 {
            for size in 1..8 {
                let parts = x.split(size, dim);
                assert_eq!(Tensor::cat(&parts, dim).to_vec::<f64>(), x.to_vec::<f64>());
            }
        }
    }

    #[test]
    #[should_panic(expected = "cat: shapes [2, 3] and [2, 4] differ outside dim 0")]
    fn cat_mismatch_names_shapes() {
        let _ = Tensor::cat(&[Tensor::zeros([2, 3]), Tensor::zeros([2, 4])], 0);
    }

    #[test]
    #[should_panic(expected = "cat: shapes [2, 3] and [6] differ in rank")]
    fn cat_rank_mismatch_panics() {
        let _ = Tensor::cat(&[Tensor::zeros([2, 3]), Tensor::zeros([6])], 0);
    }

    #[test]
    #[should_panic(expected = "cat: dtype mismatch, f32 vs f64")]
    fn cat_dtype_mismatch_panics() {
        let _ = Tensor::cat(&[Tensor::zeros([2]), randn_f64(&[2], 1)], 0);
    }

    #[test]
    #[should_panic(expected = "cat: expected at least one tensor, got an empty list")]
    fn cat_of_nothing_panics() {
        let _ = Tensor::cat::<Tensor>(&[], 0);
    }

    #[test]
    #[should_panic(expected = "stack: shapes [2, 3] and [3, 2] differ")]
    fn stack_mismatch_panics() {
        let _ = Tensor::stack(&[Tensor::zeros([2, 3]), Tensor::zeros([3, 2])], 0);
    }

    #[test]
    #[should_panic(
        expected = "split_sizes: sizes [2, 2] add up to 4, but dim 1 of shape [3, 5] has size 5"
    )]
    fn split_sizes_must_cover_the_dim() {
        let _ = Tensor::zeros([3, 5]).split_sizes(&[2, 2], 1);
    }

    #[test]
    #[should_panic(expected = "split: size must be positive, got 0 for dim 0 of shape [3]")]
    fn split_by_zero_panics() {
        let _ = Tensor::zeros([3]).split(0, 0);
    }

    #[test]
    fn gradcheck_cat_stack_split() {
        let a = randn_f64(&[3, 2], 10).requires_grad(); // used transposed: [2, 3]
        let b = randn_f64(&[2, 5], 11).requires_grad(); // narrowed: [2, 4]
        let c = randn_f64(&[2, 1], 12).requires_grad();
        let xs = [a, b, c];
        gradcheck(
            |x| Tensor::cat(&[x[0].t(), x[1].narrow(1, 1, 4), x[2].clone()], 1),
            &xs,
        )
        .unwrap();
        // The same input twice, and along dim 0.
        gradcheck(
            |x| Tensor::cat(&[&x[0].t(), &x[1].narrow(1, 0, 3), &x[0].t()], 0),
            &xs,
        )
        .unwrap();
        gradcheck(|x| Tensor::stack(&[x[0].t(), x[1].narrow(1, 2, 3)], 1), &xs).unwrap();
        // Pieces of a split used unevenly (one dropped, one scaled).
        gradcheck(
            |x| {
                let p = x[1].t().split(2, 0);
                p[0].mul_scalar(3.0).add(&p[2].narrow(0, 0, 1))
            },
            &xs,
        )
        .unwrap();
        gradcheck(
            |x| {
                let p = x[1].chunk(2, 1);
                Tensor::cat(&[&p[1], &p[0]], 1)
            },
            &xs,
        )
        .unwrap();
        gradcheck(
            |x| x[1].split_sizes(&[1, 4], 1)[1].mul(&x[1].split_sizes(&[4, 1], 1)[0]),
            &xs,
        )
        .unwrap();
    }
}
