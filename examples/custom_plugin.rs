//! A user layer (`Swish`) and a user optimizer (`Lion`), registered once and then used by name
//! from `custom_plugin.toml` next to built-in layers, a built-in loss and a built-in scheduler.
//! Trains the model on a small synthetic regression problem and prints the loss falling.
//!
//! Run: `cargo run --release --example custom_plugin`

use kiln::core::Float;
use kiln::nn::optim::{fused_update, Algorithm, GroupConfig, ParamSlots};
use kiln::nn::NnError;
use kiln::prelude::*;
use serde::{Deserialize, Serialize};

/// Swish: `x · sigmoid(β x)`. Deserializes from its TOML table (`beta = 1.5`).
#[derive(Module, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Swish {
    /// Slope inside the sigmoid.
    #[module(skip)]
    pub beta: f64,
}

impl Forward for Swish {
    fn forward(&self, x: &Tensor) -> Tensor {
        x * &(x * self.beta).sigmoid()
    }
}

/// Hyper-parameters of Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct LionConfig {
    /// Learning rate.
    pub lr: f64,
    /// Interpolation factors of the update direction and of the momentum.
    pub betas: (f64, f64),
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            lr: 1e-4,
            betas: (0.9, 0.99),
            weight_decay: 0.0,
        }
    }
}

impl GroupConfig for LionConfig {
    fn validate(&self) -> Result<(), NnError> {
        let (b1, b2) = self.betas;
        if !(self.lr.is_finite()
            && self.lr >= 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0)
        {
            return Err(NnError::Config(
                "lion: lr and weight_decay must be >= 0".into(),
            ));
        }
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(NnError::Config(format!(
                "lion: betas must be in [0, 1), got ({b1}, {b2})"
            )));
        }
        Ok(())
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn momentum(&self) -> Option<f64> {
        Some(self.betas.0)
    }
    fn set_momentum(&mut self, m: f64) {
        self.betas.0 = m;
    }
}

/// The Lion update: `c = β1·m + (1−β1)·g; p = p·(1 − lr·wd) − lr·sign(c);
/// m = β2·m + (1−β2)·g`.
pub struct LionRule;

fn lion_update<T: Float>(c: &LionConfig, param: &Tensor, grad: &Tensor, m: &Tensor) {
    let (b1, b2) = (T::from_f64(c.betas.0), T::from_f64(c.betas.1));
    let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
    let lr = T::from_f64(c.lr);
    let decay = T::from_f64(1.0 - c.lr * c.weight_decay);
    fused_update::<T, 1>(param, grad, [m], |p, g, [m]| {
        for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
            let dir = b1 * *m + (one - b1) * g;
            let s = if dir > zero {
                one
            } else if dir < zero {
                -one
            } else {
                zero
            };
            *p = *p * decay - lr * s;
            *m = b2 * *m + (one - b2) * g;
        }
    });
}

impl Algorithm for LionRule {
    type Config = LionConfig;
    const KIND: &'static str = "lion";
    const SLOTS: &'static [&'static str] = &["exp_avg"];

    fn update(c: &LionConfig, param: &Tensor, grad: &Tensor, state: &mut ParamSlots) {
        state.step += 1;
        let (m, _) = state.get_or_fill(0, param, 0.0);
        match param.dtype() {
            DType::F64 => lion_update::<f64>(c, param, grad, &m),
            _ => lion_update::<f32>(c, param, grad, &m),
        }
    }
}

/// Registers the plugins in the global registry (once per process).
pub fn register_plugins() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        registry().layer::<Swish>("swish").expect("swish is free");
        registry()
            .optimizer::<LionRule>("lion")
            .expect("lion is free");
    });
}

/// The spec shipped next to this example.
pub const SPEC: &str = include_str!("custom_plugin.toml");

/// Builds everything from `spec`, trains full-batch for `steps` steps on y = sin(2 x₀) + x₀·x₁
/// (256 points) and returns the loss of every step.
pub fn run(spec: &str, steps: usize, verbose: bool) -> Result<Vec<f64>, NnError> {
    register_plugins();
    let Training {
        model,
        loss,
        mut optimizer,
        mut scheduler,
    } = TrainSpec::from_toml(spec)?.build()?;
    if verbose {
        println!("{}", model.summary());
    }
    let x = Tensor::uniform([256, 2], -1.5, 1.5, 1);
    let x0 = x.narrow(1, 0, 1);
    let x1 = x.narrow(1, 1, 1);
    let y = (&x0 * 2.0).sin() + &x0 * &x1;
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let l = loss.forward(&model.forward(&x), &y);
        l.backward();
        optimizer.step();
        optimizer.zero_grad();
        if let Some(s) = scheduler.as_mut() {
            s.step();
        }
        losses.push(l.item());
        if verbose && (step % 50 == 0 || step + 1 == steps) {
            println!(
                "step {:>4}  loss {:.5}  lr {:.2e}",
                step + 1,
                l.item(),
                optimizer.lr(0)
            );
        }
    }
    Ok(losses)
}

fn main() {
    match run(SPEC, 300, true) {
        Ok(losses) => {
            let (first, last) = (losses[0], losses[losses.len() - 1]);
            println!("loss {first:.5} -> {last:.5}");
            if last.is_nan() || last >= 0.1 * first {
                eprintln!("FAILED: the loss did not fall below a tenth of its start");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
