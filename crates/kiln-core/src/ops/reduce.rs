//! Reductions over any set of dims, with keepdim: the shared driver `reduce_map`, and `sum`,
//! `mean`, `sum_to` (the un-broadcast used by backward rules).

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_dtype;
use crate::dtype::Element;
use crate::layout::Layout;
use crate::parallel::{num_threads, PARALLEL_THRESHOLD};
use crate::shape::{DimVec, Dims, Shape};
use crate::tensor::Tensor;

/// How the elements of a tensor split into kept and reduced positions.
pub struct ReducePlan {
    /// Shape of the result with the reduced dims kept as size 1.
    pub keepdim_shape: Shape,
    /// Shape of the result with the reduced dims removed.
    pub squeezed_shape: Shape,
    /// Layout over the kept dims (one position per output element, row-major).
    pub kept: Layout,
    /// Layout over the reduced dims, relative to a kept position.
    pub reduced: Layout,
    /// The reduced dims, sorted.
    pub dims: DimVec,
}

impl ReducePlan {
    /// The plan for reducing `dims` of `layout`.
    pub fn new(layout: &Layout, dims: &[usize]) -> Self {
        let (mut kd, mut ks, mut rd, mut rs) =
            (DimVec::new(), DimVec::new(), DimVec::new(), DimVec::new());
        let mut keep = DimVec::new();
        let mut squeezed = DimVec::new();
        for (i, (&d, &s)) in layout.dims().iter().zip(layout.strides()).enumerate() {
            if dims.contains(&i) {
                rd.push(d);
                rs.push(s);
                keep.push(1);
            } else {
                kd.push(d);
                ks.push(s);
                keep.push(d);
                squeezed.push(d);
            }
        }
        ReducePlan {
            keepdim_shape: Shape::from(keep),
            squeezed_shape: Shape::from(squeezed),
            kept: Layout::new(Shape::from(kd), ks, layout.offset()),
            reduced: Layout::new(Shape::from(rd), rs, 0),
            dims: DimVec::from_slice(dims),
        }
    }

    /// Number of elements folded into each output.
    pub fn reduced_count(&self) -> usize {
        self.reduced.elem_count()
    }

    /// The output shape for `keepdim`.
    pub fn out_shape(&self, keepdim: bool) -> Shape {
        if keepdim {
            self.keepdim_shape.clone()
        } else {
            self.squeezed_shape.clone()
        }
    }
}

/// Reduces `dims` of `t`: `f(values)` is called once per output element with the reduced
/// elements gathered into a contiguous slice (in row-major order of the reduced dims).
/// Returns the outputs in row-major order of the kept dims, and the plan.
pub fn reduce_map<T: Element, U: Element>(
    t: &Tensor,
    dims: &[usize],
    op: &str,
    f: impl Fn(&[T]) -> U + Sync,
) -> (Buffer<U>, ReducePlan) {
    let plan = ReducePlan::new(t.layout(), dims);
    let storage = t.storage();
    let src = crate::typed_slice!(storage, T, op);
    let n_out = plan.kept.elem_count();
    let n_red = plan.reduced_count();
    let mut out = Buffer::<U>::uninit(n_out);
    let (rdims, rstrides) = plan.reduced.merged();
    let contiguous_inner = rdims.len() <= 1 && rstrides.first().is_none_or(|&s| s == 1);
    let rel: Vec<usize> = if contiguous_inner {
        Vec::new()
    } else {
        plan.reduced.offsets().collect()
    };

    let run = |kept_offsets: &mut dyn Iterator<Item = usize>, out: &mut [U]| {
        let mut scratch: Vec<T> = if contiguous_inner {
            Vec::new()
        } else {
            Vec::with_capacity(n_red)
        };
        for (o, base) in out.iter_mut().zip(kept_offsets) {
            *o = if contiguous_inner {
                f(&src[base..base + n_red])
            } else {
                scratch.clear();
                scratch.extend(rel.iter().map(|&r| src[base + r]));
                f(&scratch)
            };
        }
    };

    if n_out * n_red >= PARALLEL_THRESHOLD && n_out > 1 && num_threads() > 1 {
        let per_task = n_out.div_ceil(num_threads() * 4);
        let kept_offsets: Vec<usize> = plan.kept.offsets().collect();
        crate::parallel::for_chunks(&mut out, per_task, true, |t, o| {
            let k = &kept_offsets[t * per_task..t * per_task + o.len()];
            run(&mut k.iter().copied(), o);
        });
    } else {
        run(&mut plan.kept.offsets(), &mut out);
    }
    (out, plan)
}

/// Sum of a slice with eight independent accumulators (vectorisable, and more accurate than
/// one running sum).
pub fn sum_slice<T: Element>(xs: &[T]) -> T {
    let mut acc = [<T as num_traits::Zero>::zero(); 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = <T as num_traits::Zero>::zero();
    for &r in rest {
        s += r;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// Sum over leading dims of a contiguous tensor: `[outer, inner] -> [inner]`, adding whole rows.
fn sum_leading_rows<T: Element>(src: &[T], outer: usize, inner: usize) -> Buffer<T> {
    let mut out = Buffer::<T>::from_slice(&src[..inner]);
    for row in src[inner..outer * inner].chunks_exact(inner) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x;
        }
    }
    out
}

fn sum_impl(t: &Tensor, dims: &[usize], keepdim: bool) -> Tensor {
    let plan_shape;
    let storage = dispatch_dtype!(t.dtype(), |T| {
        // Fast path: contiguous input reduced over its leading dims (bias gradients).
        let lead = dims.iter().enumerate().all(|(i, &d)| i == d);
        let buf = match t.layout().contiguous_range() {
            Some(r) if lead && !dims.is_empty() && dims.len() < t.rank() => {
                let outer: usize = t.dims()[..dims.len()].iter().product();
                let inner = t.elem_count() / outer.max(1);
                let storage = t.storage();
                let src = crate::typed_slice!(storage, T, "sum");
                plan_shape = ReducePlan::new(t.layout(), dims);
                if outer == 0 {
                    Buffer::<T>::filled(inner, <T as num_traits::Zero>::zero())
                } else {
                    sum_leading_rows(&src[r], outer, inner)
                }
            }
            _ => {
                let (buf, plan) = reduce_map::<T, T>(t, dims, "sum", sum_slice);
                plan_shape = plan;
                buf
            }
        };
        <T as Element>::into_storage(buf)
    });
    let out_shape = plan_shape.out_shape(keepdim);
    let keep_shape = plan_shape.keepdim_shape.clone();
    Tensor::op_result(storage, out_shape, &[t], move || SumBackward { keep_shape })
}

struct SumBackward {
    keep_shape: Shape,
}

impl GradFn for SumBackward {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        vec![Some(
            g.reshape(&self.keep_shape)
                .broadcast_as(x.shape())
                .contiguous(),
        )]
    }
}

impl Tensor {
    /// Sum over `dims` (a dim, a list of dims, or `()` for all), keeping them as size 1 when
    /// `keepdim`.
    pub fn sum(&self, dims: impl Dims, keepdim: bool) -> Tensor {
        let dims = dims.resolve_all(self.rank(), "sum");
        sum_impl(self, &dims, keepdim)
    }

    /// Sum of all elements, as a rank-0 tensor.
    pub fn sum_all(&self) -> Tensor {
        self.sum((), false)
    }

    /// Mean over `dims`, keeping them as size 1 when `keepdim`.
    pub fn mean(&self, dims: impl Dims, keepdim: bool) -> Tensor {
        let dims = dims.resolve_all(self.rank(), "mean");
        let count: usize = dims.iter().map(|&d| self.dims()[d]).product();
        sum_impl(self, &dims, keepdim).div_scalar(count as f64)
    }

    /// Mean of all elements, as a rank-0 tensor.
    pub fn mean_all(&self) -> Tensor {
        self.mean((), false)
    }

    /// Sums this tensor down to `shape`, undoing a NumPy broadcast from `shape` to this
    /// tensor's shape (what the backward of a broadcasting op needs).
    pub fn sum_to(&self, shape: &Shape) -> Tensor {
        if self.shape() == shape {
            return self.clone();
        }
        let (r, rt) = (self.rank(), shape.rank());
        assert!(
            rt <= r,
            "sum_to: cannot reduce shape {} to {}",
            self.shape(),
            shape
        );
        let lead = r - rt;
        let dims: DimVec = (0..r)
            .filter(|&i| i < lead || (shape.dims()[i - lead] == 1 && self.dims()[i] != 1))
            .collect();
        for i in lead..r {
            let (d, t) = (self.dims()[i], shape.dims()[i - lead]);
            assert!(
                d == t || t == 1,
                "sum_to: cannot reduce shape {} to {}",
                self.shape(),
                shape
            );
        }
        let summed = if dims.is_empty() {
            self.clone()
        } else {
            sum_impl(self, &dims, true)
        };
        summed.reshape(shape)
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::Tensor;

    #[test]
    fn sums_over_any_dims() {
        let x = Tensor::from_slice(&(0..24).map(|v| v as f32).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(
            x.sum(0, false).to_vec::<f32>()[..4],
            [12.0, 14.0, 16.0, 18.0]
        );
        assert_eq!(x.sum(-1, true).dims(), &[2, 3, 1]);
        assert_eq!(
            x.sum(-1, false).to_vec::<f32>(),
            vec![6.0, 22.0, 38.0, 54.0, 70.0, 86.0]
        );
        assert_eq!(
            x.sum([0, 2], false).to_vec::<f32>(),
            vec![60.0, 92.0, 124.0]
        );
        assert_eq!(x.sum_all().item(), 276.0);
        assert_eq!(x.transpose(0, 2).sum(0, false).dims(), &[3, 2]);
        assert_eq!(x.mean(1, false).to_vec::<f32>()[0], 4.0);
    }

    #[test]
    fn sum_to_undoes_broadcasting() {
        let g = Tensor::ones([2, 3, 4]);
        assert_eq!(g.sum_to(&[3, 1].into()).to_vec::<f32>(), vec![8.0; 3]);
        assert_eq!(g.sum_to(&[4].into()).to_vec::<f32>(), vec![6.0; 4]);
    }

    #[test]
    fn gradcheck_sum_and_mean() {
        let x = randn_f64(&[3, 4, 2], 11).requires_grad();
        gradcheck(|x| x[0].sum(1, false), std::slice::from_ref(&x)).unwrap();
        gradcheck(|x| x[0].sum([0, 2], true), std::slice::from_ref(&x)).unwrap();
        gradcheck(|x| x[0].mean(-1, false), std::slice::from_ref(&x)).unwrap();
        gradcheck(
            |x| x[0].transpose(0, 2).sum(0, false),
            std::slice::from_ref(&x),
        )
        .unwrap();
        gradcheck(|x| x[0].mean_all(), std::slice::from_ref(&x)).unwrap();
    }
}
