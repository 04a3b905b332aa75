//! Zero-copy views: reshape, permute/transpose, narrow, broadcast_as/expand, squeeze/unsqueeze,
//! flatten — each shares storage with its source and has a backward rule.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_dtype;
use crate::dtype::Element;
use crate::layout::Layout;
use crate::shape::{Dim, DimVec, Shape};
use crate::tensor::Tensor;

/// A reshape target: a shape where one dim may be `-1` (inferred).
pub trait ReshapeTarget {
    /// The concrete shape for a tensor of `count` elements.
    fn resolve(&self, count: usize, from: &Shape) -> Shape;
}

impl<S: Clone + Into<Shape>> ReshapeTarget for S {
    fn resolve(&self, count: usize, from: &Shape) -> Shape {
        let shape: Shape = self.clone().into();
        assert_eq!(
            shape.elem_count(),
            count,
            "reshape: cannot view shape {from} ({count} elements) as {shape}"
        );
        shape
    }
}

/// A shape with `-1` for one inferred dim, for `reshape`: `t.reshape(Infer([-1, 4]))`.
#[derive(Clone, Copy, Debug)]
pub struct Infer<const N: usize>(pub [i64; N]);

impl<const N: usize> ReshapeTarget for Infer<N> {
    fn resolve(&self, count: usize, from: &Shape) -> Shape {
        let known: i64 = self.0.iter().filter(|&&d| d != -1).product();
        let unknown = self.0.iter().filter(|&&d| d == -1).count();
        let valid = unknown <= 1 && self.0.iter().all(|&d| d == -1 || d >= 0);
        assert!(
            valid,
            "reshape: {:?} may hold at most one -1 and no other negative dim",
            self.0
        );
        let dims: DimVec = self
            .0
            .iter()
            .map(|&d| {
                if d == -1 {
                    if known == 0 {
                        0
                    } else {
                        count / known as usize
                    }
                } else {
                    d as usize
                }
            })
            .collect();
        let shape = Shape::from(dims);
        assert_eq!(
            shape.elem_count(),
            count,
            "reshape: cannot view shape {from} ({count} elements) as {:?}",
            self.0
        );
        shape
    }
}

struct ReshapeBackward;
impl GradFn for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn reads_input(&self, _index: usize) -> bool {
        false
    }
    fn reads_output(&self) -> bool {
        false
    }
    fn backward(&self, inputs: &[Tensor], _o: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(g.reshape(inputs[0].shape()))]
    }
}

struct PermuteBackward(DimVec);
impl GradFn for PermuteBackward {
    fn name(&self) -> &'static str {
        "permute"
    }
    fn reads_input(&self, _index: usize) -> bool {
        false
    }
    fn reads_output(&self) -> bool {
        false
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let mut inverse = DimVec::from_elem(0, self.0.len());
        for (i, &p) in self.0.iter().enumerate() {
            inverse[p] = i;
        }
        vec![Some(g.permute(&inverse))]
    }
}

struct NarrowBackward {
    dim: usize,
    start: usize,
}
impl GradFn for NarrowBackward {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn reads_input(&self, _index: usize) -> bool {
        false
    }
    fn reads_output(&self) -> bool {
        false
    }
    fn backward(&self, inputs: &[Tensor], _o: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        vec![Some(g.pad_into(x.shape(), self.dim, self.start))]
    }
}

struct ExpandBackward;
impl GradFn for ExpandBackward {
    fn name(&self) -> &'static str {
        "broadcast_as"
    }
    fn reads_input(&self, _index: usize) -> bool {
        false
    }
    fn reads_output(&self) -> bool {
        false
    }
    fn backward(&self, inputs: &[Tensor], _o: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(g.sum_to(inputs[0].shape()))]
    }
}

impl Tensor {
    /// The same elements with another shape: a view when the strides allow it, else a copy.
    /// Accepts a shape (`[2, 3]`, `vec![..]`) or [`Infer`] with one `-1`.
    pub fn reshape(&self, shape: impl ReshapeTarget) -> Tensor {
        let shape = shape.resolve(self.elem_count(), self.shape());
        if &shape == self.shape() {
            return self.clone();
        }
        match self.layout().reshape(&shape) {
            Some(layout) => self.view_result(layout, || ReshapeBackward),
            None => self.contiguous().reshape(shape),
        }
    }

    /// Dims reordered by `perm` (a view).
    pub fn permute(&self, perm: &[usize]) -> Tensor {
        let layout = self.layout().permute(perm);
        let perm = DimVec::from_slice(perm);
        self.view_result(layout, move || PermuteBackward(perm))
    }

    /// Dims `a` and `b` swapped (a view).
    pub fn transpose(&self, a: impl Dim, b: impl Dim) -> Tensor {
        let r = self.rank();
        let (a, b) = (a.resolve(r, "transpose"), b.resolve(r, "transpose"));
        let mut perm: DimVec = (0..r).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// The last two dims swapped (the matrix transpose; a view).
    pub fn t(&self) -> Tensor {
        assert!(
            self.rank() >= 2,
            "t: needs a tensor of rank >= 2, got shape {}",
            self.shape()
        );
        self.transpose(-2i32, -1i32)
    }

    /// `len` elements of `dim` from `start` (a view).
    pub fn narrow(&self, dim: impl Dim, start: usize, len: usize) -> Tensor {
        let dim = dim.resolve(self.rank(), "narrow");
        if start == 0 && len == self.dims()[dim] {
            return self.clone();
        }
        let layout = self.layout().narrow(dim, start, len);
        self.view_result(layout, move || NarrowBackward { dim, start })
    }

    /// This tensor broadcast to `shape` (NumPy rules; a view with stride 0 along new dims).
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        if &shape == self.shape() {
            return self.clone();
        }
        let layout = self.layout().broadcast_as(&shape, "broadcast_as");
        self.view_result(layout, || ExpandBackward)
    }

    /// Alias of [`Tensor::broadcast_as`] (PyTorch's name).
    pub fn expand(&self, shape: impl Into<Shape>) -> Tensor {
        self.broadcast_as(shape)
    }

    /// A size-1 dim inserted at `dim` (`-1` appends at the end; a view).
    pub fn unsqueeze(&self, dim: impl Dim) -> Tensor {
        let dim = dim.resolve(self.rank() + 1, "unsqueeze");
        let layout = self.layout().unsqueeze(dim);
        self.view_result(layout, || ReshapeBackward)
    }

    /// The size-1 dim `dim` removed (a view); panics if it is not size 1.
    pub fn squeeze(&self, dim: impl Dim) -> Tensor {
        let dim = dim.resolve(self.rank(), "squeeze");
        let layout = self.layout().squeeze(dim);
        self.view_result(layout, || ReshapeBackward)
    }

    /// Every size-1 dim removed.
    pub fn squeeze_all(&self) -> Tensor {
        let dims: DimVec = self.dims().iter().copied().filter(|&d| d != 1).collect();
        self.reshape(Shape::from(dims))
    }

    /// Dims `start..=end` merged into one.
    pub fn flatten(&self, start: impl Dim, end: impl Dim) -> Tensor {
        let r = self.rank().max(1);
        let (s, e) = (start.resolve(r, "flatten"), end.resolve(r, "flatten"));
        assert!(s <= e, "flatten: start dim {s} is after end dim {e}");
        if self.rank() == 0 {
            return self.reshape([1]);
        }
        let mut dims = DimVec::from_slice(&self.dims()[..s]);
        dims.push(self.dims()[s..=e].iter().product());
        dims.extend_from_slice(&self.dims()[e + 1..]);
        self.reshape(Shape::from(dims))
    }

    /// Zeros of `shape` with this tensor written at `start..` along `dim` (the adjoint of
    /// `narrow`). Not differentiable itself: used by backward rules.
    pub(crate) fn pad_into(&self, shape: &Shape, dim: usize, start: usize) -> Tensor {
        let len = self.dims()[dim];
        let region = Layout::contiguous(shape.clone()).narrow(dim, start, len);
        let src = self.contiguous();
        let storage = dispatch_dtype!(self.dtype(), |T| {
            let mut out = Buffer::<T>::filled(shape.elem_count(), <T as num_traits::Zero>::zero());
            let guard = src.storage();
            let values = crate::typed_slice!(guard, T, "narrow_backward");
            let values = &values[src.layout().contiguous_range().unwrap()];
            let mut i = 0;
            region.for_each_run(|s, n, stride| {
                for k in 0..n {
                    out[s + k * stride] = values[i + k];
                }
                i += n;
            });
            <T as Element>::into_storage(out)
        });
        Tensor::from_storage(storage, Layout::contiguous(shape.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::Infer;
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::Tensor;

    #[test]
    fn views_share_storage_and_reorder() {
        let x = Tensor::from_slice(&[0f32, 1., 2., 3., 4., 5.], [2, 3]);
        let t = x.t();
        assert!(t.same_storage(&x));
        assert_eq!(t.to_vec::<f32>(), vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(x.narrow(1, 1, 2).to_vec::<f32>(), vec![1., 2., 4., 5.]);
        assert_eq!(x.reshape(Infer([3, -1])).dims(), &[3, 2]);
        assert_eq!(x.unsqueeze(0).dims(), &[1, 2, 3]);
        assert_eq!(x.unsqueeze(-1).dims(), &[2, 3, 1]);
        assert_eq!(x.unsqueeze(1).squeeze(1).dims(), &[2, 3]);
        assert_eq!(
            x.narrow(0, 1, 1).broadcast_as([3, 3]).to_vec::<f32>(),
            vec![3., 4., 5., 3., 4., 5., 3., 4., 5.]
        );
        assert_eq!(t.reshape([6]).to_vec::<f32>(), vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(Tensor::zeros([2, 3, 4]).flatten(1, 2).dims(), &[2, 12]);
    }

    #[test]
    #[should_panic(expected = "reshape: cannot view shape [2, 3] (6 elements) as [4]")]
    fn bad_reshape_names_both_shapes() {
        let _ = Tensor::zeros([2, 3]).reshape([4]);
    }

    #[test]
    fn gradcheck_views() {
        let x = randn_f64(&[2, 3, 4], 21).requires_grad();
        let xs = std::slice::from_ref(&x);
        gradcheck(|x| x[0].reshape([6, 4]).mul(&x[0].reshape([6, 4])), xs).unwrap();
        gradcheck(|x| x[0].permute(&[2, 0, 1]).contiguous(), xs).unwrap();
        gradcheck(|x| x[0].transpose(0, 2).reshape([24]), xs).unwrap();
        gradcheck(|x| x[0].narrow(2, 1, 2), xs).unwrap();
        gradcheck(|x| x[0].narrow(1, 1, 1).broadcast_as([2, 3, 4]), xs).unwrap();
        gradcheck(|x| x[0].unsqueeze(1).squeeze(1).flatten(0, 1), xs).unwrap();
    }
}
