//! The seed example: fit f(x) = w·x + b with loss ½(y − ŷ)² by plain SGD, written against
//! kiln's public API. At the first step it prints the gradients from autograd next to their
//! closed forms ∂L/∂w = mean((ŷ − y)·x), ∂L/∂b = mean(ŷ − y); at the end the recovered w and b.
//!
//! Run: `cargo run --release --example linear_regression`

use kiln::prelude::*;

/// What a run found.
pub struct Report {
    /// Autograd's ∂L/∂w and ∂L/∂b at step 1.
    pub autograd_grads: (f64, f64),
    /// The closed-form values at step 1.
    pub closed_form_grads: (f64, f64),
    /// Learned w and b.
    pub learned: (f64, f64),
    /// The w and b the data was generated with.
    pub truth: (f64, f64),
    /// Loss after the last step.
    pub final_loss: f64,
}

/// Generates y = 3x + 0.5 for 256 points and fits w and b.
pub fn run(steps: usize, lr: f64, verbose: bool) -> Report {
    let (true_w, true_b) = (3.0, 0.5);
    let x = Tensor::randn([256, 1], 0);
    let y = &x * true_w + true_b;

    let w = Tensor::zeros([1, 1]).requires_grad();
    let b = Tensor::zeros([1]).requires_grad();
    let mut report = Report {
        autograd_grads: (0.0, 0.0),
        closed_form_grads: (0.0, 0.0),
        learned: (0.0, 0.0),
        truth: (true_w, true_b),
        final_loss: f64::NAN,
    };
    for step in 0..steps {
        let y_hat = x.matmul(&w) + &b;
        let loss = (&y - &y_hat).square().mean_all() * 0.5;
        loss.backward();
        if step == 0 {
            // Closed form, from the raw numbers: dL/dw = mean((ŷ − y)·x), dL/db = mean(ŷ − y).
            let (xs, ys, yh) = (x.to_vec::<f32>(), y.to_vec::<f32>(), y_hat.to_vec::<f32>());
            let n = xs.len() as f64;
            let dw = xs
                .iter()
                .zip(&ys)
                .zip(&yh)
                .map(|((&x, &y), &p)| (p - y) as f64 * x as f64)
                .sum::<f64>()
                / n;
            let db = ys
                .iter()
                .zip(&yh)
                .map(|(&y, &p)| (p - y) as f64)
                .sum::<f64>()
                / n;
            report.autograd_grads = (w.grad().unwrap().item(), b.grad().unwrap().item());
            report.closed_form_grads = (dw, db);
            if verbose {
                println!("step 1 gradients     autograd        closed form");
                println!(
                    "  dL/dw          {:>12.6}   {:>12.6}",
                    report.autograd_grads.0, dw
                );
                println!(
                    "  dL/db          {:>12.6}   {:>12.6}",
                    report.autograd_grads.1, db
                );
            }
        }
        w.sgd_step(lr);
        b.sgd_step(lr);
        w.zero_grad();
        b.zero_grad();
        report.final_loss = loss.item();
        if verbose && (step + 1) % 100 == 0 {
            println!(
                "step {:>4}  loss {:.3e}  w {:.6}  b {:.6}",
                step + 1,
                report.final_loss,
                w.item(),
                b.item()
            );
        }
    }
    report.learned = (w.item(), b.item());
    report
}

fn main() {
    let r = run(500, 0.1, true);
    println!(
        "learned w = {:.6} (true {}), b = {:.6} (true {})",
        r.learned.0, r.truth.0, r.learned.1, r.truth.1
    );
    let grads_ok = (r.autograd_grads.0 - r.closed_form_grads.0).abs() < 1e-5
        && (r.autograd_grads.1 - r.closed_form_grads.1).abs() < 1e-5;
    let fit_ok = (r.learned.0 - r.truth.0).abs() < 1e-3 && (r.learned.1 - r.truth.1).abs() < 1e-3;
    if !(grads_ok && fit_ok) {
        eprintln!("FAILED: gradients match: {grads_ok}, w and b within 1e-3: {fit_ok}");
        std::process::exit(1);
    }
    println!("ok: autograd matches the closed form and w, b are recovered to within 1e-3");
}
