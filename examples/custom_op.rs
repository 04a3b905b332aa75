//! A user-defined differentiable op joins the autograd graph like a built-in one.
//!
//! `SoftClip` computes x / (1 + |x|) with a hand-written backward 1 / (1 + |x|)²; the
//! example checks it against finite differences with `gradcheck` and uses it in a tiny
//! optimisation.
//!
//! Run: `cargo run --release --example custom_op`

use kiln::prelude::*;

/// x / (1 + |x|): a smooth clip to (-1, 1).
struct SoftClip;

impl CustomOp for SoftClip {
    fn name(&self) -> &'static str {
        "soft_clip"
    }

    fn forward(&self, inputs: &[Tensor]) -> Tensor {
        let x = &inputs[0];
        x / &(x.abs() + 1.0)
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> Vec<Option<Tensor>> {
        let d = inputs[0].abs() + 1.0;
        vec![Some(grad_output / &(&d * &d))]
    }
}

fn soft_clip(x: &Tensor) -> Tensor {
    Tensor::apply_op(SoftClip, &[x])
}

fn main() {
    // 1. Its gradient agrees with finite differences (in f64), also on a transposed input.
    let x = Tensor::randn_f64([3, 4], 1).requires_grad();
    gradcheck(|x| soft_clip(&x[0].t()), &[x]).expect("gradcheck of the custom op");
    println!("gradcheck: soft_clip backward matches finite differences");

    // 2. It trains like any op: find x with soft_clip(x) = 0.5 (the answer is x = 1).
    let x = Tensor::zeros([1]).requires_grad();
    for _ in 0..200 {
        let loss = (soft_clip(&x) - 0.5).square().sum_all();
        loss.backward();
        x.sgd_step(2.0);
        x.zero_grad();
    }
    println!("soft_clip(x) = 0.5 at x = {:.4} (exact: 1)", x.item());
    assert!((x.item() - 1.0).abs() < 1e-3);
}
