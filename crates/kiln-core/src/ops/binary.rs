//! Elementwise arithmetic with NumPy broadcasting: add, sub, mul, div (tensor and scalar
//! operands), with their backward rules and the `+ - * /` operators.

use crate::autograd::GradFn;
use crate::dispatch_dtype;
use crate::ops::kernels::{map, zip_map};
use crate::tensor::Tensor;

/// Which arithmetic op a binary node computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

impl Arith {
    fn name(self) -> &'static str {
        match self {
            Arith::Add => "add",
            Arith::Sub => "sub",
            Arith::Mul => "mul",
            Arith::Div => "div",
        }
    }
}

fn arith(a: &Tensor, b: &Tensor, op: Arith) -> Tensor {
    let name = op.name();
    let (storage, shape) = dispatch_dtype!(a.dtype(), |T| {
        let (buf, shape) = match op {
            Arith::Add => zip_map::<T, T>(a, b, name, |x, y| x + y),
            Arith::Sub => zip_map::<T, T>(a, b, name, |x, y| x - y),
            Arith::Mul => zip_map::<T, T>(a, b, name, |x, y| x * y),
            Arith::Div => zip_map::<T, T>(a, b, name, |x, y| x / y),
        };
        (<T as crate::Element>::into_storage(buf), shape)
    });
    Tensor::op_result(storage, shape, &[a, b], || ArithBackward(op))
}

struct ArithBackward(Arith);

impl GradFn for ArithBackward {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    /// Sums and differences pass the gradient on: they need only the operands' shapes.
    fn reads_input(&self, _index: usize) -> bool {
        matches!(self.0, Arith::Mul | Arith::Div)
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        let (ga, gb) = match self.0 {
            Arith::Add => (
                a.tracks_grad().then(|| g.clone()),
                b.tracks_grad().then(|| g.clone()),
            ),
            Arith::Sub => (
                a.tracks_grad().then(|| g.clone()),
                b.tracks_grad().then(|| g.neg()),
            ),
            Arith::Mul => (
                a.tracks_grad().then(|| g.mul(b)),
                b.tracks_grad().then(|| g.mul(a)),
            ),
            Arith::Div => (
                a.tracks_grad().then(|| g.div(b)),
                // d(a/b)/db = -a / b²
                b.tracks_grad().then(|| g.mul(a).div(&b.mul(b)).neg()),
            ),
        };
        vec![
            ga.map(|g| g.sum_to(a.shape())),
            gb.map(|g| g.sum_to(b.shape())),
        ]
    }
}

/// Which op with a scalar operand a node computed.
#[derive(Clone, Copy, Debug)]
enum ScalarOp {
    Add,
    Mul,
    /// scalar - x
    RSub,
    /// scalar / x
    RDiv,
}

fn scalar_op(t: &Tensor, s: f64, op: ScalarOp, name: &'static str) -> Tensor {
    let storage = dispatch_dtype!(t.dtype(), |T| {
        let c = <T as crate::Element>::from_f64(s);
        let buf = match op {
            ScalarOp::Add => map::<T, T>(t, name, |x| x + c),
            ScalarOp::Mul => map::<T, T>(t, name, |x| x * c),
            ScalarOp::RSub => map::<T, T>(t, name, |x| c - x),
            ScalarOp::RDiv => map::<T, T>(t, name, |x| c / x),
        };
        <T as crate::Element>::into_storage(buf)
    });
    Tensor::op_result(storage, t.shape().clone(), &[t], || ScalarBackward {
        op,
        s,
        name,
    })
}

struct ScalarBackward {
    op: ScalarOp,
    s: f64,
    name: &'static str,
}

impl GradFn for ScalarBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn reads_input(&self, _index: usize) -> bool {
        matches!(self.op, ScalarOp::RDiv)
    }

    fn reads_output(&self) -> bool {
        matches!(self.op, ScalarOp::RDiv)
    }

    fn backward(&self, _inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let grad = match self.op {
            ScalarOp::Add => g.clone(),
            ScalarOp::Mul => g.mul_scalar(self.s),
            ScalarOp::RSub => g.neg(),
            // d(s/x)/dx = -s/x² = -out²/s ... written via the output: -(out * out) / s would
            // divide by zero for s = 0, so use -out / x = -(s/x)/x.
            ScalarOp::RDiv => {
                let x = &_inputs[0];
                g.mul(output).div(x).neg()
            }
        };
        vec![Some(grad)]
    }
}

impl Tensor {
    /// `self + other`, broadcasting.
    pub fn add(&self, other: &Tensor) -> Tensor {
        arith(self, other, Arith::Add)
    }

    /// `self - other`, broadcasting.
    pub fn sub(&self, other: &Tensor) -> Tensor {
        arith(self, other, Arith::Sub)
    }

    /// `self * other` elementwise, broadcasting.
    pub fn mul(&self, other: &Tensor) -> Tensor {
        arith(self, other, Arith::Mul)
    }

    /// `self / other` elementwise, broadcasting.
    pub fn div(&self, other: &Tensor) -> Tensor {
        arith(self, other, Arith::Div)
    }

    /// `self + s`.
    pub fn add_scalar(&self, s: f64) -> Tensor {
        scalar_op(self, s, ScalarOp::Add, "add_scalar")
    }

    /// `self - s`.
    pub fn sub_scalar(&self, s: f64) -> Tensor {
        scalar_op(self, -s, ScalarOp::Add, "sub_scalar")
    }

    /// `self * s`.
    pub fn mul_scalar(&self, s: f64) -> Tensor {
        scalar_op(self, s, ScalarOp::Mul, "mul_scalar")
    }

    /// `self / s`.
    pub fn div_scalar(&self, s: f64) -> Tensor {
        scalar_op(self, 1.0 / s, ScalarOp::Mul, "div_scalar")
    }

    /// `s - self`.
    pub fn rsub_scalar(&self, s: f64) -> Tensor {
        scalar_op(self, s, ScalarOp::RSub, "rsub_scalar")
    }

    /// `s / self`.
    pub fn rdiv_scalar(&self, s: f64) -> Tensor {
        scalar_op(self, s, ScalarOp::RDiv, "rdiv_scalar")
    }

    /// `-self`.
    pub fn neg(&self) -> Tensor {
        scalar_op(self, -1.0, ScalarOp::Mul, "neg")
    }
}

/// Float-generic helper used by tests: `a op b` computed elementwise in f64.
#[cfg(test)]
fn reference<T: crate::dtype::Float>(a: T, b: T, op: Arith) -> T {
    match op {
        Arith::Add => a + b,
        Arith::Sub => a - b,
        Arith::Mul => a * b,
        Arith::Div => a / b,
    }
}

// ---------------------------------------------------------------------- operators

macro_rules! tensor_operator {
    ($trait:ident, $method:ident, $op:ident, $scalar:ident) => {
        impl std::ops::$trait<&Tensor> for &Tensor {
            type Output = Tensor;
            fn $method(self, rhs: &Tensor) -> Tensor {
                Tensor::$op(self, rhs)
            }
        }
        impl std::ops::$trait<Tensor> for &Tensor {
            type Output = Tensor;
            fn $method(self, rhs: Tensor) -> Tensor {
                Tensor::$op(self, &rhs)
            }
        }
        impl std::ops::$trait<&Tensor> for Tensor {
            type Output = Tensor;
            fn $method(self, rhs: &Tensor) -> Tensor {
                Tensor::$op(&self, rhs)
            }
        }
        impl std::ops::$trait<Tensor> for Tensor {
            type Output = Tensor;
            fn $method(self, rhs: Tensor) -> Tensor {
                Tensor::$op(&self, &rhs)
            }
        }
        impl std::ops::$trait<f64> for &Tensor {
            type Output = Tensor;
            fn $method(self, rhs: f64) -> Tensor {
                Tensor::$scalar(self, rhs)
            }
        }
        impl std::ops::$trait<f64> for Tensor {
            type Output = Tensor;
            fn $method(self, rhs: f64) -> Tensor {
                Tensor::$scalar(&self, rhs)
            }
        }
    };
}

tensor_operator!(Add, add, add, add_scalar);
tensor_operator!(Sub, sub, sub, sub_scalar);
tensor_operator!(Mul, mul, mul, mul_scalar);
tensor_operator!(Div, div, div, div_scalar);

macro_rules! scalar_lhs_operator {
    ($t:ty) => {
        impl std::ops::Add<&Tensor> for $t {
            type Output = Tensor;
            fn add(self, rhs: &Tensor) -> Tensor {
                rhs.add_scalar(self as f64)
            }
        }
        impl std::ops::Add<Tensor> for $t {
            type Output = Tensor;
            fn add(self, rhs: Tensor) -> Tensor {
                rhs.add_scalar(self as f64)
            }
        }
        impl std::ops::Sub<&Tensor> for $t {
            type Output = Tensor;
            fn sub(self, rhs: &Tensor) -> Tensor {
                rhs.rsub_scalar(self as f64)
            }
        }
        impl std::ops::Sub<Tensor> for $t {
            type Output = Tensor;
            fn sub(self, rhs: Tensor) -> Tensor {
                rhs.rsub_scalar(self as f64)
            }
        }
        impl std::ops::Mul<&Tensor> for $t {
            type Output = Tensor;
            fn mul(self, rhs: &Tensor) -> Tensor {
                rhs.mul_scalar(self as f64)
            }
        }
        impl std::ops::Mul<Tensor> for $t {
            type Output = Tensor;
            fn mul(self, rhs: Tensor) -> Tensor {
                rhs.mul_scalar(self as f64)
            }
        }
        impl std::ops::Div<&Tensor> for $t {
            type Output = Tensor;
            fn div(self, rhs: &Tensor) -> Tensor {
                rhs.rdiv_scalar(self as f64)
            }
        }
        impl std::ops::Div<Tensor> for $t {
            type Output = Tensor;
            fn div(self, rhs: Tensor) -> Tensor {
                rhs.rdiv_scalar(self as f64)
            }
        }
    };
}

scalar_lhs_operator!(f64);

impl std::ops::Neg for &Tensor {
    type Output = Tensor;
    fn neg(self) -> Tensor {
        Tensor::neg(self)
    }
}

impl std::ops::Neg for Tensor {
    type Output = Tensor;
    fn neg(self) -> Tensor {
        Tensor::neg(&self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};

    #[test]
    fn values_match_elementwise_reference_with_broadcasting() {
        let a = randn_f64(&[2, 3, 4], 1);
        let b = randn_f64(&[3, 1], 2).add_scalar(3.0); // away from 0 for div
        for op in [Arith::Add, Arith::Sub, Arith::Mul, Arith::Div] {
            let got = arith(&a, &b, op).to_vec::<f64>();
            let (va, vb) = (a.to_vec::<f64>(), b.to_vec::<f64>());
            for (i, g) in got.iter().enumerate() {
                let want = reference(va[i], vb[(i / 4) % 3], op);
                assert!((g - want).abs() < 1e-12, "{op:?} at {i}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn operators_and_scalars() {
        let x = Tensor::from_slice(&[1f32, 2.0, 4.0], [3]);
        assert_eq!((&x * 2.0 + 1.0).to_vec::<f32>(), vec![3.0, 5.0, 9.0]);
        assert_eq!((1.0 - &x).to_vec::<f32>(), vec![0.0, -1.0, -3.0]);
        assert_eq!((8.0 / &x).to_vec::<f32>(), vec![8.0, 4.0, 2.0]);
        assert_eq!((-&x).to_vec::<f32>(), vec![-1.0, -2.0, -4.0]);
        assert_eq!((&x / 2.0).to_vec::<f32>(), vec![0.5, 1.0, 2.0]);
    }

    #[test]
    #[should_panic(expected = "add: shapes [2, 3] and [2] cannot be broadcast together")]
    fn mismatched_shapes_panic_with_op_and_shapes() {
        let _ = Tensor::zeros([2, 3]) + Tensor::zeros([2]);
    }

    #[test]
    fn gradcheck_arith_with_broadcast_and_non_contiguous_operands() {
        for op in [Arith::Add, Arith::Sub, Arith::Mul, Arith::Div] {
            let a = randn_f64(&[3, 4], 3).requires_grad();
            let b = randn_f64(&[4], 4).add_scalar(4.0).requires_grad();
            gradcheck(|x| arith(&x[0], &x[1], op), &[a, b]).unwrap();
            // transposed lhs, sliced rhs
            let a = randn_f64(&[4, 3], 5).requires_grad();
            let b = randn_f64(&[3, 6], 6).add_scalar(4.0).requires_grad();
            gradcheck(|x| arith(&x[0].t(), &x[1].narrow(1, 2, 4), op), &[a, b]).unwrap();
        }
    }

    #[test]
    fn gradcheck_scalar_ops() {
        let a = randn_f64(&[2, 5], 7).add_scalar(3.0).requires_grad();
        gradcheck(|x| x[0].add_scalar(1.5), std::slice::from_ref(&a)).unwrap();
        gradcheck(|x| x[0].sub_scalar(1.5), std::slice::from_ref(&a)).unwrap();
        gradcheck(|x| x[0].mul_scalar(-2.5), std::slice::from_ref(&a)).unwrap();
        gradcheck(|x| x[0].div_scalar(4.0), std::slice::from_ref(&a)).unwrap();
        gradcheck(|x| x[0].rsub_scalar(2.0), std::slice::from_ref(&a)).unwrap();
        gradcheck(|x| x[0].rdiv_scalar(2.0), std::slice::from_ref(&a)).unwrap();
        gradcheck(|x| x[0].neg(), std::slice::from_ref(&a)).unwrap();
    }
}
