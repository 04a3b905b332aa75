//! Property tests of NumPy broadcasting for the binary ops: for random broadcast-compatible
//! shape pairs (rank 0–4, dims 1–4, random size-1 dims and missing leading dims) and random
//! values, `add/sub/mul/div/maximum/pow/lt` give the NumPy result shape and the values of a
//! naive reference that indexes both operands by the broadcasting rules; the backward of
//! `add`/`mul` gives each operand the naive sum over its broadcast dims; incompatible shapes
//! panic naming the op and both shapes. Operands are randomly contiguous, transposed views or
//! narrowed views of bigger tensors.

use kiln_core::{DType, Tensor};
use proptest::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Most elements an operand can have: 4 dims of at most 4.
const MAX_ELEMS: usize = 256;

/// How an operand is presented to the op.
#[derive(Debug, Clone)]
enum View {
    /// A fresh contiguous tensor.
    Contiguous,
    /// `.t()` of a contiguous tensor with the last two dims swapped (rank >= 2).
    Transposed,
    /// `.narrow(dim, start, len)` of a tensor that is `extra` longer along `dim` (rank >= 1).
    Narrowed {
        dim_seed: usize,
        extra: usize,
        start_seed: usize,
    },
}

#[derive(Debug, Clone)]
struct Operand {
    shape: Vec<usize>,
    view: View,
    /// Row-major values of the operand as the op sees it (the first `elem_count`).
    values: Vec<f64>,
}

fn elem_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Every multi-index of `shape` in row-major order.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    (0..elem_count(shape))
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

fn flat(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i)
}

/// NumPy's broadcast shape, or `None` when the shapes are incompatible.
fn numpy_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r {
                a[i + a.len() - r]
            } else {
                1
            };
            let db = if i + b.len() >= r {
                b[i + b.len() - r]
            } else {
                1
            };
            match (da, db) {
                _ if da == db => Some(da),
                (1, _) => Some(db),
                (_, 1) => Some(da),
                _ => None,
            }
        })
        .collect()
}

/// Row-major index into an operand of `shape` of the output element at `idx` of `out`.
fn source(idx: &[usize], out: &[usize], shape: &[usize]) -> usize {
    let lead = out.len() - shape.len();
    let mut f = 0;
    for (i, &d) in shape.iter().enumerate() {
        f = f * d + if d == 1 { 0 } else { idx[lead + i] };
    }
    f
}

impl Operand {
    fn len(&self) -> usize {
        elem_count(&self.shape)
    }

    fn vals(&self) -> &[f64] {
        &self.values[..self.len()]
    }

    /// The view actually used (transposes need rank 2, narrows rank 1).
    fn effective_view(&self) -> View {
        match self.view {
            View::Transposed if self.shape.len() < 2 => View::Contiguous,
            View::Narrowed { .. } if self.shape.is_empty() => View::Contiguous,
            ref v => v.clone(),
        }
    }

    /// Shape of the leaf tensor behind the view, and where each logical element lives in it.
    fn leaf_layout(&self) -> (Vec<usize>, Vec<usize>) {
        let r = self.shape.len();
        let logical = indices(&self.shape);
        match self.effective_view() {
            View::Contiguous => (self.shape.clone(), (0..self.len()).collect()),
            View::Transposed => {
                let mut leaf = self.shape.clone();
                leaf.swap(r - 2, r - 1);
                let pos = logical
                    .iter()
                    .map(|idx| {
                        let mut i = idx.clone();
                        i.swap(r - 2, r - 1);
                        flat(&i, &leaf)
                    })
                    .collect();
                (leaf, pos)
            }
            View::Narrowed {
                dim_seed,
                extra,
                start_seed,
            } => {
                let (dim, start) = (dim_seed % r, start_seed % (extra + 1));
                let mut leaf = self.shape.clone();
                leaf[dim] += extra;
                let pos = logical
                    .iter()
                    .map(|idx| {
                        let mut i = idx.clone();
                        i[dim] += start;
                        flat(&i, &leaf)
                    })
                    .collect();
                (leaf, pos)
            }
        }
    }

    /// `logical` (row-major over `shape`) scattered into the leaf's layout, `filler` elsewhere.
    fn scatter(&self, logical: &[f64], filler: f64) -> Vec<f64> {
        let (leaf, pos) = self.leaf_layout();
        let mut data = vec![filler; elem_count(&leaf)];
        for (&p, &v) in pos.iter().zip(logical) {
            data[p] = v;
        }
        data
    }

    /// The leaf (gradients accumulate here) and the view of it the op receives, holding
    /// `values` (row-major over `shape`).
    fn build(&self, values: &[f64], requires_grad: bool) -> (Tensor, Tensor) {
        let (leaf_shape, _) = self.leaf_layout();
        // Elements outside the view hold a value no test input has, so reading them shows.
        let leaf = Tensor::from_vec(self.scatter(values, 1e9), leaf_shape);
        let leaf = if requires_grad {
            leaf.requires_grad()
        } else {
            leaf
        };
        let view = match self.effective_view() {
            View::Contiguous => leaf.clone(),
            View::Transposed => leaf.t(),
            View::Narrowed {
                dim_seed,
                extra,
                start_seed,
            } => {
                let dim = dim_seed % self.shape.len();
                leaf.narrow(dim, start_seed % (extra + 1), self.shape[dim])
            }
        };
        assert_eq!(view.dims(), &self.shape[..]);
        (leaf, view)
    }
}

fn view_strategy() -> impl Strategy<Value = View> {
    prop_oneof![
        Just(View::Contiguous),
        Just(View::Transposed),
        (0usize..4, 1usize..=3, 0usize..4).prop_map(|(dim_seed, extra, start_seed)| {
            View::Narrowed {
                dim_seed,
                extra,
                start_seed,
            }
        }),
    ]
}

/// Multiples of 0.5 in [-3, 3]: exact arithmetic, and frequent ties for `lt` / `maximum`.
fn values_strategy() -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec((-6i32..=6).prop_map(|k| k as f64 * 0.5), MAX_ELEMS)
}

/// An operand broadcastable to `out`: some leading dims dropped, some dims set to 1.
fn operand_for(out: Vec<usize>) -> impl Strategy<Value = Operand> {
    let r = out.len();
    (
        0..=r,
        proptest::collection::vec(any::<bool>(), r),
        view_strategy(),
        values_strategy(),
    )
        .prop_map(move |(drop, ones, view, values)| Operand {
            shape: (drop..r)
                .map(|i| if ones[i] { 1 } else { out[i] })
                .collect(),
            view,
            values,
        })
}

fn compatible_pair() -> impl Strategy<Value = (Operand, Operand)> {
    proptest::collection::vec(1usize..=4, 0..=4)
        .prop_flat_map(|out| (operand_for(out.clone()), operand_for(out)))
}

/// Two operands whose shapes clash at one aligned position (both sizes > 1 and different).
fn incompatible_pair() -> impl Strategy<Value = (Operand, Operand)> {
    (
        proptest::collection::vec(1usize..=4, 1..=4),
        0usize..4,
        0usize..4,
        2usize..=4,
        1usize..=2,
        any::<bool>(),
        (view_strategy(), view_strategy()),
        (values_strategy(), values_strategy()),
    )
        .prop_map(
            |(dims, drop_seed, pos_seed, d1, delta, swap, (va, vb), (xa, xb))| {
                let r = dims.len();
                let a_shape = dims.clone();
                let mut b_shape = dims[drop_seed % r..].to_vec();
                let pos = pos_seed % b_shape.len();
                let mut a_shape = a_shape;
                a_shape[r - b_shape.len() + pos] = d1;
                b_shape[pos] = 2 + (d1 - 2 + delta) % 3;
                let (sa, sb) = if swap {
                    (b_shape, a_shape)
                } else {
                    (a_shape, b_shape)
                };
                (
                    Operand {
                        shape: sa,
                        view: va,
                        values: xa,
                    },
                    Operand {
                        shape: sb,
                        view: vb,
                        values: xb,
                    },
                )
            },
        )
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Pow,
    Lt,
}

const OPS: [Op; 7] = [
    Op::Add,
    Op::Sub,
    Op::Mul,
    Op::Div,
    Op::Maximum,
    Op::Pow,
    Op::Lt,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Maximum => "maximum",
            Op::Pow => "pow",
            Op::Lt => "lt",
        }
    }

    fn apply(self, a: &Tensor, b: &Tensor) -> Tensor {
        match self {
            Op::Add => a.add(b),
            Op::Sub => a.sub(b),
            Op::Mul => a.mul(b),
            Op::Div => a.div(b),
            Op::Maximum => a.maximum(b),
            Op::Pow => a.pow(b),
            Op::Lt => a.lt(b),
        }
    }

    /// Inputs adjusted to the op's domain: non-zero divisors, positive bases.
    fn prepare(self, a: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>) {
        match self {
            Op::Div => (
                a.to_vec(),
                b.iter().map(|&y| if y == 0.0 { 1.0 } else { y }).collect(),
            ),
            Op::Pow => (a.iter().map(|x| x.abs() + 0.25).collect(), b.to_vec()),
            _ => (a.to_vec(), b.to_vec()),
        }
    }

    fn reference(self, x: f64, y: f64) -> f64 {
        match self {
            Op::Add => x + y,
            Op::Sub => x - y,
            Op::Mul => x * y,
            Op::Div => x / y,
            Op::Maximum => x.max(y),
            Op::Pow => x.powf(y),
            Op::Lt => (x < y) as u32 as f64,
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else {
        String::from("<non-string panic payload>")
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn ops_match_naive_broadcast_reference((a, b) in compatible_pair()) {
        let out = numpy_shape(&a.shape, &b.shape).expect("strategy yields compatible shapes");
        let out_idx = indices(&out);
        for op in OPS {
            let (va, vb) = op.prepare(a.vals(), b.vals());
            let (_, ta) = a.build(&va, false);
            let (_, tb) = b.build(&vb, false);
            let got = op.apply(&ta, &tb);
            prop_assert_eq!(got.dims(), &out[..], "{} result shape", op.name());
            let got = match op {
                Op::Lt => {
                    prop_assert_eq!(got.dtype(), DType::U32);
                    got.to_vec::<u32>().iter().map(|&m| m as f64).collect::<Vec<_>>()
                }
                _ => {
                    prop_assert_eq!(got.dtype(), DType::F64);
                    got.to_vec::<f64>()
                }
            };
            for (i, idx) in out_idx.iter().enumerate() {
                let x = va[source(idx, &out, &a.shape)];
                let y = vb[source(idx, &out, &b.shape)];
                let want = op.reference(x, y);
                prop_assert!(
                    got[i] == want || (got[i] - want).abs() <= 1e-14 * want.abs(),
                    "{}({}, {}) at {:?}: got {}, want {}", op.name(), x, y, idx, got[i], want
                );
            }
        }
    }

    #[test]
    fn add_mul_grads_are_naive_sums_over_broadcast_dims(
        (a, b) in compatible_pair(),
        upstream in values_strategy(),
    ) {
        let out = numpy_shape(&a.shape, &b.shape).expect("strategy yields compatible shapes");
        let g = &upstream[..elem_count(&out)];
        for op in [Op::Add, Op::Mul] {
            let (la, ta) = a.build(a.vals(), true);
            let (lb, tb) = b.build(b.vals(), true);
            op.apply(&ta, &tb).backward_with_grad(&Tensor::from_vec(g.to_vec(), out.clone()));
            let (mut ga, mut gb) = (vec![0.0; a.len()], vec![0.0; b.len()]);
            for (i, idx) in indices(&out).iter().enumerate() {
                let (ia, ib) = (source(idx, &out, &a.shape), source(idx, &out, &b.shape));
                match op {
                    Op::Add => {
                        ga[ia] += g[i];
                        gb[ib] += g[i];
                    }
                    _ => {
                        ga[ia] += g[i] * b.vals()[ib];
                        gb[ib] += g[i] * a.vals()[ia];
                    }
                }
            }
            for (operand, leaf, want) in [(&a, &la, &ga), (&b, &lb, &gb)] {
                let grad = leaf.grad().expect("leaf gets a gradient");
                prop_assert_eq!(grad.dims(), leaf.dims(), "{} grad shape", op.name());
                // Positions of the leaf outside the view get no gradient.
                let want = operand.scatter(want, 0.0);
                let got = grad.to_vec::<f64>();
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    prop_assert!(
                        (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                        "{} grad of {:?} at leaf element {}: got {}, want {}",
                        op.name(), operand.shape, k, g, w
                    );
                }
            }
        }
    }
}

proptest! {
    // Each case panics once per op: fewer cases keep the suite fast.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn incompatible_shapes_panic_naming_op_and_shapes((a, b) in incompatible_pair()) {
        prop_assert!(numpy_shape(&a.shape, &b.shape).is_none());
        let (va, vb) = Op::Pow.prepare(a.vals(), b.vals());
        let (_, ta) = a.build(&va, false);
        let (_, tb) = b.build(&vb, false);
        for op in OPS {
            let result = catch_unwind(AssertUnwindSafe(|| op.apply(&ta, &tb)));
            let msg = match result {
                Ok(t) => {
                    return Err(TestCaseError::fail(format!(
                        "{} of {:?} and {:?} returned shape {:?} instead of panicking",
                        op.name(), a.shape, b.shape, t.dims()
                    )))
                }
                Err(payload) => panic_message(payload),
            };
            let (sa, sb) = (format!("{:?}", a.shape), format!("{:?}", b.shape));
            prop_assert!(
                msg.starts_with(&format!("{}:", op.name())) && msg.contains(&sa) && msg.contains(&sb),
                "{} of {} and {}: panic message {:?}", op.name(), sa, sb, msg
            );
        }
    }
}
