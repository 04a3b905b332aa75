//! In-place updates of a tensor's storage (parameter updates, buffers). They bypass autograd,
//! so they are only allowed on tensors that are not the result of a recorded op.

use crate::dispatch_dtype;
use crate::dtype::Element;
use crate::tensor::Tensor;

impl Tensor {
    fn check_writable(&self, op: &str) {
        assert!(
            self.is_leaf(),
            "{op}: cannot write into the result of `{}` in place (it is part of the autograd graph)",
            self.grad_fn_name().unwrap_or("")
        );
    }

    /// Overwrites this tensor's elements with `src` (broadcast to this shape, same dtype).
    /// Every view of the same storage sees the change. Not recorded by autograd.
    pub fn assign(&self, src: &Tensor) {
        self.check_writable("assign");
        assert_eq!(
            src.dtype(),
            self.dtype(),
            "assign: dtype {} into a tensor of dtype {}",
            src.dtype(),
            self.dtype()
        );
        let src = if src.shape() == self.shape() {
            src.clone()
        } else {
            src.broadcast_as(self.shape().clone())
        };
        // Read the source first: it may share storage with `self`.
        let src = if src.same_storage(self) {
            src.detach().contiguous_copy()
        } else {
            src
        };
        let src_guard = src.storage();
        let mut dst_guard = self.storage_mut();
        dispatch_dtype!(self.dtype(), |T| {
            let from = <T as Element>::slice(&src_guard).expect("dtype checked");
            let to = <T as Element>::slice_mut(&mut dst_guard).expect("dtype checked");
            if let (Some(rs), Some(rd)) = (
                src.layout().contiguous_range(),
                self.layout().contiguous_range(),
            ) {
                to[rd].copy_from_slice(&from[rs]);
            } else {
                let mut src_offsets = src.layout().offsets();
                self.layout().for_each_run(|start, n, stride| {
                    for k in 0..n {
                        to[start + k * stride] =
                            from[src_offsets.next().expect("same element count")];
                    }
                });
            }
        });
    }

    /// Sets every element to `value`. Not recorded by autograd.
    pub fn fill_(&self, value: f64) {
        self.assign(&Tensor::full((), value).to_dtype(self.dtype()));
    }

    /// Plain SGD on a leaf: `self -= lr * self.grad()` (nothing happens without a gradient).
    pub fn sgd_step(&self, lr: f64) {
        if let Some(g) = self.grad() {
            let _guard = crate::no_grad();
            self.assign(&self.detach().sub(&g.mul_scalar(lr)));
        }
    }

    /// A contiguous copy that never shares storage with `self`.
    pub fn contiguous_copy(&self) -> Tensor {
        if self.is_contiguous() {
            let r = self.layout().contiguous_range().unwrap();
            let storage = self.storage();
            let copied = crate::with_storage!(&*storage, |b: T| <T as Element>::into_storage(
                crate::alloc::Buffer::from_slice(&b[r.clone()])
            ));
            drop(storage);
            Tensor::from_storage(copied, crate::Layout::contiguous(self.shape().clone()))
        } else {
            self.detach().contiguous()
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    #[test]
    fn assign_writes_through_views() {
        let x = Tensor::zeros([2, 3]);
        x.narrow(1, 1, 2)
            .assign(&Tensor::from_slice(&[1f32, 2.0], [2]));
        assert_eq!(x.to_vec::<f32>(), vec![0., 1., 2., 0., 1., 2.]);
        x.t().assign(&Tensor::arange(0.0, 6.0, 1.0).reshape([3, 2]));
        assert_eq!(x.to_vec::<f32>(), vec![0., 2., 4., 1., 3., 5.]);
        x.fill_(7.0);
        assert_eq!(x.to_vec::<f32>(), vec![7.0; 6]);
        // Contiguous into a contiguous view at an offset (the plain copy path).
        x.reshape([3, 2])
            .narrow(0, 1, 1)
            .assign(&Tensor::from_slice(&[8f32, 9.0], [1, 2]));
        assert_eq!(x.to_vec::<f32>(), vec![7., 7., 8., 9., 7., 7.]);
    }

    #[test]
    fn assign_from_an_overlapping_view_reads_before_writing() {
        let x = Tensor::arange(0.0, 4.0, 1.0);
        x.narrow(0, 1, 3).assign(&x.narrow(0, 0, 3));
        assert_eq!(x.to_vec::<f32>(), vec![0., 0., 1., 2.]);
    }

    #[test]
    fn sgd_step_moves_against_the_gradient() {
        let w = Tensor::from_slice(&[1f32, 2.0], [2]).requires_grad();
        w.mul(&w).sum_all().backward(); // grad = 2w
        w.sgd_step(0.25);
        assert_eq!(w.to_vec::<f32>(), vec![0.5, 1.0]);
    }

    #[test]
    #[should_panic(expected = "assign: cannot write into the result of `mul_scalar` in place")]
    fn assign_into_graph_result_panics() {
        let w = Tensor::ones([2]).requires_grad();
        (&w * 2.0).assign(&Tensor::zeros([2]));
    }
}
