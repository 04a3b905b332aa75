//! Differentiable elementwise unary ops: abs, exp, log, sqrt, rsqrt, sin, cos, tanh, sigmoid,
//! relu, gelu (erf and tanh forms), silu, softplus, square, recip, clamp and powf.
//!
//! f32 transcendental ops (exp, log, sin, cos, tanh, sigmoid, the GELUs, silu, softplus) run
//! the vectorised slice kernels of [`crate::vmath`] over contiguous data (non-contiguous inputs
//! are made contiguous first), split across threads above `PARALLEL_THRESHOLD`; the other f32
//! ops and all f64 ops map scalar std math over the input in any layout. Backward rules that can be written in terms of the output (exp, tanh, sigmoid,
//! sqrt, rsqrt, recip, relu) read the saved output instead of recomputing; each backward is one
//! fused elementwise pass. Derivatives at kinks follow PyTorch: `relu'(0) = 0`, `abs'(0) = 0`,
//! clamp passes the gradient where `min <= x <= max`.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dtype::{DType, Float};
use crate::ops::kernels::{map, map_slices, zip_map};
use crate::parallel::for_each_chunk;
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::vmath::{self, erfc_f64};
use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// Which unary op a node computed (with its scalar parameters).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Sin,
    Cos,
    Tanh,
    Sigmoid,
    Relu,
    Gelu,
    GeluTanh,
    Silu,
    Softplus,
    Square,
    Recip,
    Clamp(f64, f64),
    Powf(f64),
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Abs => "abs",
            Op::Exp => "exp",
            Op::Log => "log",
            Op::Sqrt => "sqrt",
            Op::Rsqrt => "rsqrt",
            Op::Sin => "sin",
            Op::Cos => "cos",
            Op::Tanh => "tanh",
            Op::Sigmoid => "sigmoid",
            Op::Relu => "relu",
            Op::Gelu => "gelu",
            Op::GeluTanh => "gelu_tanh",
            Op::Silu => "silu",
            Op::Softplus => "softplus",
            Op::Square => "square",
            Op::Recip => "recip",
            Op::Clamp(..) => "clamp",
            Op::Powf(_) => "powf",
        }
    }
}

/// Above this input, softplus is the identity (PyTorch's default `threshold = 20`).
const SOFTPLUS_THRESHOLD: f64 = 20.0;

fn unary(t: &Tensor, op: Op) -> Tensor {
    let name = op.name();
    let recording = crate::autograd::is_grad_enabled() && t.tracks_grad();
    if op == Op::Gelu && t.dtype() == DType::F32 && recording {
        return gelu_keeping_derivative(t);
    }
    let storage = match t.dtype() {
        DType::F32 => Storage::F32(forward_f32(t, op)),
        DType::F64 => Storage::F64(forward_f64(t, op)),
        other => panic!("{name}: expected a float tensor (f32 or f64), got {other}"),
    };
    Tensor::op_result(storage, t.shape().clone(), &[t], || {
        Box::new(UnaryBackward(op))
    })
}

fn forward_f32(t: &Tensor, op: Op) -> Buffer<f32> {
    let name = op.name();
    let slices = |f: fn(&[f32], &mut [f32])| map_slices::<f32, f32>(t, name, f);
    match op {
        Op::Exp => slices(vmath::exp),
        Op::Log => slices(vmath::ln),
        Op::Sin => slices(vmath::sin),
        Op::Cos => slices(vmath::cos),
        Op::Tanh => slices(vmath::tanh),
        Op::Sigmoid => slices(vmath::sigmoid),
        Op::Gelu => slices(vmath::gelu_erf),
        Op::GeluTanh => slices(vmath::gelu_tanh),
        Op::Silu => slices(vmath::silu),
        Op::Softplus => slices(vmath::softplus),
        _ => forward_generic::<f32>(t, op),
    }
}

fn forward_f64(t: &Tensor, op: Op) -> Buffer<f64> {
    let name = op.name();
    match op {
        Op::Exp => map(t, name, f64::exp),
        Op::Log => map(t, name, f64::ln),
        Op::Tanh => map(t, name, f64::tanh),
        Op::Sigmoid => map(t, name, sigmoid64),
        Op::Gelu => map(t, name, gelu64),
        Op::GeluTanh => map(t, name, gelu_tanh64),
        Op::Silu => map(t, name, silu64),
        Op::Softplus => map(t, name, softplus64),
        _ => forward_generic::<f64>(t, op),
    }
}

/// The ops whose kernels are the same scalar code for f32 and f64.
fn forward_generic<T: Float>(t: &Tensor, op: Op) -> Buffer<T> {
    let name = op.name();
    let zero = T::zero();
    match op {
        Op::Abs => map(t, name, |x: T| x.abs()),
        Op::Sqrt => map(t, name, |x: T| x.sqrt()),
        Op::Rsqrt => map(t, name, |x: T| T::one() / x.sqrt()),
        Op::Sin => map(t, name, |x: T| x.sin()),
        Op::Cos => map(t, name, |x: T| x.cos()),
        // `x < 0` is false for NaN, which passes through as in PyTorch.
        Op::Relu => map(t, name, move |x: T| if x < zero { zero } else { x }),
        Op::Square => map(t, name, |x: T| x * x),
        Op::Recip => map(t, name, |x: T| T::one() / x),
        Op::Clamp(lo, hi) => {
            let (lo, hi) = (T::from_f64(lo), T::from_f64(hi));
            map(t, name, move |x: T| {
                let y = if x < lo { lo } else { x };
                if y > hi {
                    hi
                } else {
                    y
                }
            })
        }
        Op::Powf(e) => powf_forward(t, e),
        Op::Exp
        | Op::Log
        | Op::Tanh
        | Op::Sigmoid
        | Op::Gelu
        | Op::GeluTanh
        | Op::Silu
        | Op::Softplus => unreachable!("{name} has a dtype-specific kernel"),
    }
}

/// `x^e`, with PyTorch's exact special cases for common exponents.
fn powf_forward<T: Float>(t: &Tensor, e: f64) -> Buffer<T> {
    let name = "powf";
    let one = T::one();
    if e == 0.0 {
        map(t, name, move |_: T| one)
    } else if e == 1.0 {
        map(t, name, |x: T| x)
    } else if e == 2.0 {
        map(t, name, |x: T| x * x)
    } else if e == 3.0 {
        map(t, name, |x: T| x * x * x)
    } else if e == 0.5 {
        map(t, name, |x: T| x.sqrt())
    } else if e == -0.5 {
        map(t, name, move |x: T| one / x.sqrt())
    } else if e == -1.0 {
        map(t, name, move |x: T| one / x)
    } else if e == -2.0 {
        map(t, name, move |x: T| one / (x * x))
    } else {
        let e = T::from_f64(e);
        map(t, name, move |x: T| x.powf(e))
    }
}

// ---------------------------------------------------------------------- f64 scalar math

fn sigmoid64(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `x·Φ(x)` with `Φ(x) = ½erfc(−x/√2)`, accurate in the lower tail; `gelu(−inf) = −0`.
fn gelu64(x: f64) -> f64 {
    if x == f64::NEG_INFINITY {
        return -0.0;
    }
    x * 0.5 * erfc_f64(-x * FRAC_1_SQRT_2)
}

/// `Φ(x) + x·φ(x)`.
fn gelu_grad64(x: f64) -> f64 {
    if x.is_infinite() {
        return if x > 0.0 { 1.0 } else { 0.0 };
    }
    0.5 * erfc_f64(-x * FRAC_1_SQRT_2) + x * (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
}

/// `2u` for the tanh-form GELU, `u = √(2/π)(x + 0.044715x³)`.
fn gelu_tanh_u2(x: f64) -> f64 {
    2.0 * (2.0 / PI).sqrt() * (x + 0.044715 * x * x * x)
}

/// `½x(1 + tanh u) = x·sigmoid(2u)`.
fn gelu_tanh64(x: f64) -> f64 {
    if x == f64::NEG_INFINITY {
        return -0.0;
    }
    x * sigmoid64(gelu_tanh_u2(x))
}

fn gelu_tanh_grad64(x: f64) -> f64 {
    // Beyond ±1000 the derivative is exactly 1 or 0 in f64 (and x³ would overflow).
    let x = x.clamp(-1e3, 1e3);
    let u2 = gelu_tanh_u2(x);
    let (s, c) = (sigmoid64(u2), sigmoid64(-u2));
    s + x * s * c * 2.0 * (2.0 / PI).sqrt() * (1.0 + 3.0 * 0.044715 * x * x)
}

fn silu64(x: f64) -> f64 {
    if x == f64::NEG_INFINITY {
        return -0.0;
    }
    x * sigmoid64(x)
}

fn silu_grad64(x: f64) -> f64 {
    let (s, c) = (sigmoid64(x), sigmoid64(-x));
    s * (1.0 + x.clamp(-1e3, 1e3) * c)
}

fn softplus64(x: f64) -> f64 {
    if x.is_nan() || x > SOFTPLUS_THRESHOLD {
        x
    } else {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }
}

fn softplus_grad64(x: f64) -> f64 {
    if x > SOFTPLUS_THRESHOLD {
        1.0
    } else {
        sigmoid64(x)
    }
}

/// GELU (erf form, f32) for a graph: the forward writes the derivative next to the values
/// (one evaluation of the CDF serves both), and the backward is `g · derivative`. It keeps
/// neither input nor output, so a GELU between two frozen layers costs one saved tensor, not
/// two, and no second CDF.
fn gelu_keeping_derivative(t: &Tensor) -> Tensor {
    let x = t.contiguous();
    let xs = x.storage();
    let src = &crate::typed_slice!(xs, f32, "gelu")[x.layout().contiguous_range().unwrap()];
    let n = src.len();
    let (mut y, mut d) = (Buffer::<f32>::uninit(n), Buffer::<f32>::uninit(n));
    crate::parallel::for_each_chunk_pair(&mut y, &mut d, |start, y, d| {
        vmath::gelu_erf_with_grad(&src[start..start + y.len()], y, d);
    });
    drop(xs);
    let deriv = Tensor::from_buffer(d, t.shape().clone());
    Tensor::op_result(Storage::F32(y), t.shape().clone(), &[t], || {
        SavedDerivative {
            name: Op::Gelu.name(),
            deriv,
        }
    })
}

// ---------------------------------------------------------------------- backward

/// Backward of an elementwise op whose forward saved its derivative: `g · derivative`.
struct SavedDerivative {
    name: &'static str,
    deriv: Tensor,
}

impl GradFn for SavedDerivative {
    fn name(&self) -> &'static str {
        self.name
    }

    fn reads_input(&self, _index: usize) -> bool {
        false
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, _inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(g.mul(&self.deriv))]
    }
}

struct UnaryBackward(Op);

impl GradFn for UnaryBackward {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    /// The rules that are written in the output (`y`) do not read `x`.
    fn reads_input(&self, _index: usize) -> bool {
        !self.reads_output()
    }

    fn reads_output(&self) -> bool {
        matches!(
            self.0,
            Op::Exp | Op::Sqrt | Op::Rsqrt | Op::Tanh | Op::Sigmoid | Op::Relu | Op::Recip
        )
    }

    fn backward(&self, inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (op, x) = (self.0, &inputs[0]);
        let name = op.name();
        let grad = match x.dtype() {
            DType::F32 => match op {
                Op::Sin => grad_by_slices(g, x, name, vmath::cos, 1.0),
                Op::Cos => grad_by_slices(g, x, name, vmath::sin, -1.0),
                Op::Gelu => grad_by_slices(g, x, name, vmath::gelu_erf_grad, 1.0),
                Op::GeluTanh => grad_by_slices(g, x, name, vmath::gelu_tanh_grad, 1.0),
                Op::Silu => grad_by_slices(g, x, name, vmath::silu_grad, 1.0),
                // sigmoid(x) rounds to exactly 1 in f32 above the threshold (x > 17.4).
                Op::Softplus => grad_by_slices(g, x, name, vmath::sigmoid, 1.0),
                _ => grad_generic::<f32>(op, x, output, g),
            },
            DType::F64 => match op {
                Op::Gelu => zip(g, x, name, |g, x: f64| g * gelu_grad64(x)),
                Op::GeluTanh => zip(g, x, name, |g, x: f64| g * gelu_tanh_grad64(x)),
                Op::Silu => zip(g, x, name, |g, x: f64| g * silu_grad64(x)),
                Op::Softplus => zip(g, x, name, |g, x: f64| g * softplus_grad64(x)),
                _ => grad_generic::<f64>(op, x, output, g),
            },
            other => unreachable!("{name}: backward on {other}"),
        };
        vec![Some(grad)]
    }
}

/// `f(g, a)` elementwise over the upstream gradient and a saved tensor of the same shape.
fn zip<T: Float>(g: &Tensor, a: &Tensor, name: &str, f: impl Fn(T, T) -> T + Sync) -> Tensor {
    let (buf, shape) = zip_map::<T, T>(g, a, name, f);
    Tensor::from_buffer(buf, shape)
}

/// Elements per block of [`grad_by_slices`]: the derivative block is still in L1 when it is
/// multiplied by the gradient.
const GRAD_BLOCK: usize = 2048;

/// `scale · g · deriv(x)` for f32, with `deriv` a vectorised slice kernel, in one blocked pass.
fn grad_by_slices(
    g: &Tensor,
    x: &Tensor,
    name: &str,
    deriv: fn(&[f32], &mut [f32]),
    scale: f32,
) -> Tensor {
    let (x, g) = (x.contiguous(), g.contiguous());
    let (xs, gs) = (x.storage(), g.storage());
    let xv = &crate::typed_slice!(xs, f32, name)[x.layout().contiguous_range().unwrap()];
    let gv = &crate::typed_slice!(gs, f32, name)[g.layout().contiguous_range().unwrap()];
    let mut out = Buffer::<f32>::uninit(xv.len());
    for_each_chunk(&mut out, |start, chunk| {
        for (k, block) in chunk.chunks_mut(GRAD_BLOCK).enumerate() {
            let s = start + k * GRAD_BLOCK;
            let e = s + block.len();
            deriv(&xv[s..e], block);
            for (o, &gi) in block.iter_mut().zip(&gv[s..e]) {
                *o *= gi * scale;
            }
        }
    });
    Tensor::from_buffer(out, x.shape().clone())
}

/// Backward rules written once for both float types (`y` is the op's output).
fn grad_generic<T: Float>(op: Op, x: &Tensor, y: &Tensor, g: &Tensor) -> Tensor {
    let name = op.name();
    let (zero, one) = (T::zero(), T::one());
    let two = one + one;
    let half = one / two;
    match op {
        Op::Abs => zip(g, x, name, move |g, x: T| {
            if x > zero {
                g
            } else if x < zero {
                -g
            } else {
                zero * x // 0 at 0, NaN stays NaN
            }
        }),
        Op::Exp => zip(g, y, name, |g, y: T| g * y),
        Op::Log => zip(g, x, name, |g, x: T| g / x),
        Op::Sqrt => zip(g, y, name, move |g, y: T| g * half / y),
        // d/dx x^(-1/2) = -½ x^(-3/2) = -½ y³
        Op::Rsqrt => zip(g, y, name, move |g, y: T| -(g * half) * y * y * y),
        Op::Sin => zip(g, x, name, |g, x: T| g * x.cos()),
        Op::Cos => zip(g, x, name, |g, x: T| -(g * x.sin())),
        Op::Tanh => zip(g, y, name, move |g, y: T| g * (one - y * y)),
        Op::Sigmoid => zip(g, y, name, move |g, y: T| g * y * (one - y)),
        Op::Relu => zip(g, y, name, move |g, y: T| if y > zero { g } else { zero }),
        Op::Square => zip(g, x, name, move |g, x: T| g * two * x),
        Op::Recip => zip(g, y, name, |g, y: T| -(g * y * y)),
        Op::Clamp(lo, hi) => {
            let (lo, hi) = (T::from_f64(lo), T::from_f64(hi));
            zip(
                g,
                x,
                name,
                move |g, x: T| {
                    if x >= lo && x <= hi {
                        g
                    } else {
                        zero
                    }
                },
            )
        }
        Op::Powf(e) => {
            if e == 0.0 {
                zip(g, x, name, move |_, _: T| zero)
            } else if e == 1.0 {
                zip(g, x, name, |g, _: T| g)
            } else if e == 2.0 {
                zip(g, x, name, move |g, x: T| g * two * x)
            } else {
                let (et, em1) = (T::from_f64(e), T::from_f64(e - 1.0));
                zip(g, x, name, move |g, x: T| g * et * x.powf(em1))
            }
        }
        Op::Gelu | Op::GeluTanh | Op::Silu | Op::Softplus => {
            unreachable!("{name} has a dtype-specific backward")
        }
    }
}

// ---------------------------------------------------------------------- public API

impl Tensor {
    /// `|x|` elementwise (gradient 0 at 0).
    pub fn abs(&self) -> Tensor {
        unary(self, Op::Abs)
    }

    /// `e^x` elementwise.
    pub fn exp(&self) -> Tensor {
        unary(self, Op::Exp)
    }

    /// Natural logarithm elementwise (`-inf` at 0, NaN below).
    pub fn log(&self) -> Tensor {
        unary(self, Op::Log)
    }

    /// `√x` elementwise.
    pub fn sqrt(&self) -> Tensor {
        unary(self, Op::Sqrt)
    }

    /// `1/√x` elementwise.
    pub fn rsqrt(&self) -> Tensor {
        unary(self, Op::Rsqrt)
    }

    /// `sin x` elementwise.
    pub fn sin(&self) -> Tensor {
        unary(self, Op::Sin)
    }

    /// `cos x` elementwise.
    pub fn cos(&self) -> Tensor {
        unary(self, Op::Cos)
    }

    /// `tanh x` elementwise.
    pub fn tanh(&self) -> Tensor {
        unary(self, Op::Tanh)
    }

    /// `1 / (1 + e^-x)` elementwise.
    pub fn sigmoid(&self) -> Tensor {
        unary(self, Op::Sigmoid)
    }

    /// `max(x, 0)` elementwise (gradient 0 at 0).
    pub fn relu(&self) -> Tensor {
        unary(self, Op::Relu)
    }

    /// GELU, exact form: `x·½(1 + erf(x/√2))`.
    pub fn gelu(&self) -> Tensor {
        unary(self, Op::Gelu)
    }

    /// GELU, tanh approximation: `x·½(1 + tanh(√(2/π)(x + 0.044715x³)))`.
    pub fn gelu_tanh(&self) -> Tensor {
        unary(self, Op::GeluTanh)
    }

    /// SiLU (swish): `x·sigmoid(x)`.
    pub fn silu(&self) -> Tensor {
        unary(self, Op::Silu)
    }

    /// `ln(1 + e^x)`, and `x` itself above 20 (PyTorch's softplus with beta 1, threshold 20).
    pub fn softplus(&self) -> Tensor {
        unary(self, Op::Softplus)
    }

    /// `x²` elementwise.
    pub fn square(&self) -> Tensor {
        unary(self, Op::Square)
    }

    /// `1/x` elementwise.
    pub fn recip(&self) -> Tensor {
        unary(self, Op::Recip)
    }

    /// `min(max(x, min), max)` elementwise (either bound may be ±inf; NaN passes through).
    pub fn clamp(&self, min: f64, max: f64) -> Tensor {
        assert!(
            !min.is_nan() && !max.is_nan(),
            "clamp: bounds must not be NaN, got min {min} and max {max} for a tensor of shape {}",
            self.shape()
        );
        unary(self, Op::Clamp(min, max))
    }

    /// `x^exponent` elementwise (gradient `exponent·x^(exponent−1)`, zero for exponent 0).
    pub fn powf(&self, exponent: f64) -> Tensor {
        unary(self, Op::Powf(exponent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::vmath::erf_f64;

    /// Every op with an independent f64 reference and the domain to test it on.
    struct Case {
        op: Op,
        reference: fn(f64) -> f64,
        positive_only: bool,
    }

    fn cases() -> Vec<Case> {
        let c = |op, reference: fn(f64) -> f64| Case {
            op,
            reference,
            positive_only: false,
        };
        let pos = |op, reference: fn(f64) -> f64| Case {
            op,
            reference,
            positive_only: true,
        };
        vec![
            c(Op::Abs, f64::abs),
            c(Op::Exp, f64::exp),
            pos(Op::Log, f64::ln),
            pos(Op::Sqrt, f64::sqrt),
            pos(Op::Rsqrt, |x| 1.0 / x.sqrt()),
            c(Op::Sin, f64::sin),
            c(Op::Cos, f64::cos),
            c(Op::Tanh, |x| {
                let e = (2.0 * x).exp();
                if e.is_infinite() {
                    1.0
                } else {
                    (e - 1.0) / (e + 1.0)
                }
            }),
            c(Op::Sigmoid, |x| 1.0 / (1.0 + (-x).exp())),
            c(Op::Relu, |x| x.max(0.0)),
            c(Op::Gelu, |x| 0.5 * x * (1.0 + erf_f64(x / 2f64.sqrt()))),
            c(Op::GeluTanh, |x| {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh())
            }),
            c(Op::Silu, |x| x / (1.0 + (-x).exp())),
            c(Op::Softplus, |x| {
                if x > 20.0 {
                    x
                } else {
                    (1.0 + x.exp()).ln()
                }
            }),
            c(Op::Square, |x| x * x),
            pos(Op::Recip, |x| 1.0 / x),
            c(Op::Clamp(-0.5, 1.25), |x| x.clamp(-0.5, 1.25)),
            c(Op::Clamp(f64::NEG_INFINITY, 0.3), |x| x.min(0.3)),
            c(Op::Clamp(0.1, f64::INFINITY), |x| x.max(0.1)),
            pos(Op::Powf(2.5), |x| x.powf(2.5)),
            c(Op::Powf(3.0), |x| x * x * x),
            c(Op::Powf(2.0), |x| x * x),
            pos(Op::Powf(0.5), f64::sqrt),
            pos(Op::Powf(-1.5), |x| 1.0 / (x * x.sqrt())),
            c(Op::Powf(0.0), |_| 1.0),
        ]
    }

    /// Inputs over [-8, 8] (or (0, 16] for positive-only ops) with exact f64 counterparts.
    fn inputs(positive_only: bool, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = (i as f32 + 0.5) / n as f32; // (0, 1)
                if positive_only {
                    16.0 * u
                } else {
                    16.0 * u - 8.0
                }
            })
            .collect()
    }

    fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
        (got - want).abs() <= (rel * want.abs()).max(abs)
    }

    #[test]
    fn f32_forward_matches_f64_math_for_every_op() {
        // 200 003 elements: above the threading threshold, and not a multiple of any width.
        for case in cases() {
            let xs = inputs(case.positive_only, 200_003);
            let got = unary(&Tensor::from_slice(&xs, [xs.len()]), case.op).to_vec::<f32>();
            for (&x, &g) in xs.iter().zip(&got) {
                let want = (case.reference)(x as f64);
                assert!(
                    close(g as f64, want, 1e-6, 2e-7),
                    "{:?} at {x}: {g} vs {want}",
                    case.op
                );
            }
        }
    }

    #[test]
    fn f64_forward_matches_reference_for_every_op() {
        for case in cases() {
            let xs: Vec<f64> = inputs(case.positive_only, 5_001)
                .iter()
                .map(|&x| x as f64 + 1e-3)
                .collect();
            let got = unary(&Tensor::from_slice(&xs, [xs.len()]), case.op).to_vec::<f64>();
            for (&x, &g) in xs.iter().zip(&got) {
                let want = (case.reference)(x);
                assert!(
                    close(g, want, 1e-12, 1e-14),
                    "{:?} at {x}: {g} vs {want}",
                    case.op
                );
            }
        }
    }

    #[test]
    fn non_contiguous_inputs_give_the_same_values() {
        let x = Tensor::randn([37, 53], 11).mul_scalar(3.0);
        let xt = x.t();
        let xn = x.narrow(1, 5, 40);
        for case in cases().into_iter().filter(|c| !c.positive_only) {
            let want_t = unary(&xt.contiguous(), case.op).to_vec::<f32>();
            assert_eq!(unary(&xt, case.op).to_vec::<f32>(), want_t, "{:?}", case.op);
            let want_n = unary(&xn.contiguous(), case.op).to_vec::<f32>();
            assert_eq!(unary(&xn, case.op).to_vec::<f32>(), want_n, "{:?}", case.op);
        }
    }

    #[test]
    fn special_values_follow_pytorch() {
        let inf = f64::INFINITY;
        let x = Tensor::from_slice(&[-inf, -30.0, -0.0, 0.0, 25.0, inf, f64::NAN], [7]);
        for dt in [DType::F32, DType::F64] {
            let x = x.to_dtype(dt);
            let same = |t: Tensor, want: &[f64]| {
                let got = t.to_f64_vec();
                for (g, w) in got.iter().zip(want) {
                    let ok = (g.is_nan() && w.is_nan()) || g == w || close(*g, *w, 1e-6, 1e-30);
                    assert!(ok, "{dt}: {got:?} vs {want:?}");
                }
            };
            let nan = f64::NAN;
            let (ln2, sp30) = (2f64.ln(), (-30f64).exp().ln_1p());
            same(x.softplus(), &[0.0, sp30, ln2, ln2, 25.0, inf, nan]);
            same(x.relu(), &[0.0, 0.0, 0.0, 0.0, 25.0, inf, nan]);
            same(x.gelu(), &[0.0, 0.0, 0.0, 0.0, 25.0, inf, nan]);
            same(x.gelu_tanh(), &[0.0, 0.0, 0.0, 0.0, 25.0, inf, nan]);
            same(
                x.silu(),
                &[
                    0.0,
                    -30.0 * (-30f64).exp() / (1.0 + (-30f64).exp()),
                    0.0,
                    0.0,
                    25.0,
                    inf,
                    nan,
                ],
            );
            same(
                x.sigmoid(),
                &[
                    0.0,
                    (-30f64).exp() / (1.0 + (-30f64).exp()),
                    0.5,
                    0.5,
                    1.0,
                    1.0,
                    nan,
                ],
            );
            same(x.tanh(), &[-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, nan]);
            same(
                x.exp(),
                &[0.0, (-30f64).exp(), 1.0, 1.0, 25f64.exp(), inf, nan],
            );
            same(x.log(), &[nan, nan, -inf, -inf, 25f64.ln(), inf, nan]);
            same(x.clamp(-1.0, 1.0), &[-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, nan]);
            same(
                x.clamp(f64::NEG_INFINITY, inf),
                &[-inf, -30.0, 0.0, 0.0, 25.0, inf, nan],
            );
            same(x.powf(0.0), &[1.0; 7]);
        }
    }

    #[test]
    fn derivative_conventions_at_kinks() {
        for dt in [DType::F32, DType::F64] {
            let x = Tensor::from_slice(&[-1.0, 0.0, 0.5, 1.0, 2.0], [5])
                .to_dtype(dt)
                .requires_grad();
            let grad = |f: fn(&Tensor) -> Tensor| {
                x.zero_grad();
                f(&x).sum_all().backward();
                x.grad().unwrap().to_f64_vec()
            };
            assert_eq!(grad(|t| t.relu()), vec![0.0, 0.0, 1.0, 1.0, 1.0]);
            assert_eq!(grad(|t| t.abs()), vec![-1.0, 0.0, 1.0, 1.0, 1.0]);
            // min <= x <= max passes the gradient, bounds included
            assert_eq!(grad(|t| t.clamp(0.0, 1.0)), vec![0.0, 1.0, 1.0, 1.0, 0.0]);
            assert_eq!(
                grad(|t| t.clamp(f64::NEG_INFINITY, 0.5)),
                vec![1.0, 1.0, 1.0, 0.0, 0.0]
            );
            assert_eq!(grad(|t| t.powf(0.0)), vec![0.0; 5]);
            assert_eq!(grad(|t| t.powf(1.0)), vec![1.0; 5]);
        }
        // Softplus is linear above the threshold: gradient exactly 1.
        for dt in [DType::F32, DType::F64] {
            let x = Tensor::from_slice(&[20.5, 30.0, 100.0], [3])
                .to_dtype(dt)
                .requires_grad();
            x.softplus().sum_all().backward();
            assert_eq!(x.grad().unwrap().to_f64_vec(), vec![1.0; 3]);
        }
    }

    /// Derivatives checked against f64 formulas; `d` is the derivative of the op at x.
    fn derivative(op: Op, x: f64) -> f64 {
        let s = 1.0 / (1.0 + (-x).exp());
        match op {
            Op::Abs => {
                if x == 0.0 {
                    0.0
                } else {
                    x.signum()
                }
            }
            Op::Exp => x.exp(),
            Op::Log => 1.0 / x,
            Op::Sqrt => 0.5 / x.sqrt(),
            Op::Rsqrt => -0.5 / (x * x.sqrt()),
            Op::Sin => x.cos(),
            Op::Cos => -x.sin(),
            Op::Tanh => 1.0 - x.tanh().powi(2),
            Op::Sigmoid => s * (1.0 - s),
            Op::Relu => (x > 0.0) as u8 as f64,
            Op::Gelu => {
                0.5 * (1.0 + erf_f64(x / 2f64.sqrt()))
                    + x * (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
            Op::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let t = (k * (x + 0.044715 * x.powi(3))).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Op::Silu => s + x * s * (1.0 - s),
            Op::Softplus => s,
            Op::Square => 2.0 * x,
            Op::Recip => -1.0 / (x * x),
            Op::Clamp(lo, hi) => (lo <= x && x <= hi) as u8 as f64,
            Op::Powf(e) => {
                if e == 0.0 {
                    0.0
                } else {
                    e * x.powf(e - 1.0)
                }
            }
        }
    }

    #[test]
    fn f32_backward_matches_f64_derivatives() {
        // Large enough for the threaded and blocked paths; the upstream gradient of sum_all is
        // a broadcast (non-contiguous) view, and a second run uses a random contiguous one.
        for case in cases() {
            let xs = inputs(case.positive_only, 70_001);
            let xs: Vec<f32> = xs
                .iter()
                .map(|&v| if case.positive_only { v + 0.25 } else { v })
                .collect();
            let x = Tensor::from_slice(&xs, [xs.len()]).requires_grad();
            unary(&x, case.op).sum_all().backward();
            let got = x.grad().unwrap().to_vec::<f32>();
            let gup = Tensor::randn([xs.len()], 3);
            x.zero_grad();
            unary(&x, case.op).backward_with_grad(&gup);
            let got_g = x.grad().unwrap().to_vec::<f32>();
            let gv = gup.to_vec::<f32>();
            for (i, &xv) in xs.iter().enumerate() {
                let want = derivative(case.op, xv as f64);
                // The kink of abs/relu/clamp at a bound is measure-zero here; outputs are
                // rounded to f32 before differentiating (exp, tanh, ...), hence 2e-6.
                assert!(
                    close(got[i] as f64, want, 2e-6, 2e-6),
                    "{:?} at {xv}: {} vs {want}",
                    case.op,
                    got[i]
                );
                let want_g = want * gv[i] as f64;
                assert!(
                    close(got_g[i] as f64, want_g, 2e-6, 2e-6),
                    "{:?} at {xv}: {} vs {want_g}",
                    case.op,
                    got_g[i]
                );
            }
        }
    }

    #[test]
    fn gelu_in_a_graph_gives_the_plain_values_and_g_times_the_saved_derivative() {
        let x = Tensor::randn([3, 70_001], 5).mul_scalar(3.0);
        let plain = x.gelu().to_vec::<f32>();
        let leaf = x.detach().requires_grad();
        let y = leaf.gelu();
        assert_eq!(y.to_vec::<f32>(), plain, "values with and without a graph");
        assert_eq!(y.grad_fn_name(), Some("gelu"));
        let mut want = vec![0f32; plain.len()];
        vmath::gelu_erf_grad(&x.to_vec::<f32>(), &mut want);
        let g = Tensor::randn([3, 70_001], 6);
        y.backward_with_grad(&g);
        let got = leaf.grad().unwrap().to_vec::<f32>();
        for ((got, want), g) in got.iter().zip(&want).zip(g.to_vec::<f32>()) {
            assert_eq!(*got, want * g);
        }
        let empty = Tensor::zeros([0, 3]).requires_grad();
        empty.gelu().sum_all().backward();
        assert_eq!(empty.grad().unwrap().dims(), &[0, 3]);
    }

    /// A leaf of `shape` with standard-normal values moved at least `gap` away from 0.
    fn leaf_away_from_zero(shape: &[usize], seed: u64, gap: f64) -> Tensor {
        let v: Vec<f64> = randn_f64(shape, seed)
            .to_vec::<f64>()
            .iter()
            .map(|&x| x.signum() * (x.abs() + gap))
            .collect();
        Tensor::from_vec(v, shape.to_vec()).requires_grad()
    }

    fn positive_leaf(shape: &[usize], seed: u64) -> Tensor {
        let v: Vec<f64> = randn_f64(shape, seed)
            .to_vec::<f64>()
            .iter()
            .map(|&x| x.abs() + 0.5)
            .collect();
        Tensor::from_vec(v, shape.to_vec()).requires_grad()
    }

    #[test]
    fn gradcheck_every_op_with_contiguous_and_non_contiguous_inputs() {
        let mut checked = 0;
        for case in cases() {
            let op = case.op;
            let leaf = |seed| match op {
                _ if case.positive_only => positive_leaf(&[4, 6], seed),
                Op::Clamp(..) => {
                    // stay 0.05 away from every bound used
                    let v: Vec<f64> = randn_f64(&[4, 6], seed)
                        .to_vec::<f64>()
                        .iter()
                        .map(|&x| {
                            let mut x = x;
                            for b in [-0.5, 0.1, 0.3, 1.25] {
                                if (x - b).abs() < 0.05 {
                                    x = b + 0.05f64.copysign(x - b);
                                }
                            }
                            x
                        })
                        .collect();
                    Tensor::from_vec(v, [4, 6]).requires_grad()
                }
                _ => leaf_away_from_zero(&[4, 6], seed, 0.1),
            };
            let a = leaf(21);
            gradcheck(|x| unary(&x[0], op), &[a]).unwrap_or_else(|e| panic!("{op:?}: {e}"));
            let a = leaf(22);
            gradcheck(|x| unary(&x[0].t(), op), &[a])
                .unwrap_or_else(|e| panic!("{op:?} on .t(): {e}"));
            let a = leaf(23);
            gradcheck(|x| unary(&x[0].narrow(1, 1, 4), op), &[a])
                .unwrap_or_else(|e| panic!("{op:?} on narrow: {e}"));
            checked += 1;
        }
        // Both sides of the softplus threshold, and the GELU/SiLU tails.
        let a =
            Tensor::from_slice(&[-25.0f64, -6.0, 19.5, 20.5, 22.0, 35.0], [2, 3]).requires_grad();
        for op in [
            Op::Softplus,
            Op::Gelu,
            Op::GeluTanh,
            Op::Silu,
            Op::Sigmoid,
            Op::Tanh,
        ] {
            gradcheck(|x| unary(&x[0].t(), op), std::slice::from_ref(&a))
                .unwrap_or_else(|e| panic!("{op:?} tails: {e}"));
        }
        assert_eq!(checked, cases().len());
    }

    #[test]
    fn chained_ops_gradcheck() {
        let a = positive_leaf(&[3, 5], 31);
        gradcheck(
            |x| {
                x[0].t()
                    .log()
                    .gelu()
                    .mul(&x[0].t().sqrt().sigmoid())
                    .softplus()
            },
            &[a],
        )
        .unwrap();
    }

    #[test]
    fn ops_record_their_names() {
        let x = Tensor::randn([3], 1).requires_grad();
        assert_eq!(x.exp().grad_fn_name(), Some("exp"));
        assert_eq!(x.gelu_tanh().grad_fn_name(), Some("gelu_tanh"));
        assert_eq!(x.clamp(0.0, 1.0).grad_fn_name(), Some("clamp"));
        assert_eq!(Tensor::randn([3], 1).exp().grad_fn_name(), None);
    }

    #[test]
    #[should_panic(expected = "exp: expected a float tensor (f32 or f64), got i64")]
    fn integer_input_panics_with_op_name() {
        let _ = Tensor::arange_i64(0, 4, 1).exp();
    }

    #[test]
    #[should_panic(
        expected = "clamp: bounds must not be NaN, got min NaN and max 1 for a tensor of shape [2, 3]"
    )]
    fn nan_clamp_bound_panics() {
        let _ = Tensor::zeros([2, 3]).clamp(f64::NAN, 1.0);
    }
}
