//! Parameter initialisation following `torch.nn.init`: the same formulas for gains, fans and
//! bounds, drawn from a seeded [`Rng`] (so the numbers differ from PyTorch's, the
//! distributions do not).
//!
//! The `*_` functions fill an existing (leaf) tensor in place, whatever its float dtype.

use kiln_core::{Rng, Shape, Tensor};

/// Which fan [`kaiming_uniform_`] and [`kaiming_normal_`] scale by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanMode {
    /// Preserve the variance of activations in the forward pass (PyTorch's default).
    FanIn,
    /// Preserve the variance of gradients in the backward pass.
    FanOut,
}

/// A non-linearity for [`calculate_gain`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Nonlinearity {
    /// Identity / linear / convolution: gain 1.
    Linear,
    /// Sigmoid: gain 1.
    Sigmoid,
    /// Tanh: gain 5/3.
    Tanh,
    /// ReLU: gain √2.
    Relu,
    /// Leaky ReLU with the given negative slope: gain `√(2 / (1 + slope²))`.
    LeakyRelu(f64),
    /// SELU: gain 3/4.
    Selu,
}

/// The recommended gain for a non-linearity (`torch.nn.init.calculate_gain`).
pub fn calculate_gain(nonlinearity: Nonlinearity) -> f64 {
    match nonlinearity {
        Nonlinearity::Linear | Nonlinearity::Sigmoid => 1.0,
        Nonlinearity::Tanh => 5.0 / 3.0,
        Nonlinearity::Relu => 2f64.sqrt(),
        Nonlinearity::LeakyRelu(a) => (2.0 / (1.0 + a * a)).sqrt(),
        Nonlinearity::Selu => 0.75,
    }
}

/// `(fan_in, fan_out)` of a weight shape as PyTorch computes them: `dims[1] * receptive` and
/// `dims[0] * receptive`, with `receptive` the product of dims 2 and up. Panics below rank 2.
pub fn fan_in_and_fan_out(shape: &Shape) -> (usize, usize) {
    let d = shape.dims();
    assert!(
        d.len() >= 2,
        "fan in and fan out can not be computed for a tensor with fewer than 2 dimensions (shape {shape})"
    );
    let receptive: usize = d[2..].iter().product();
    (d[1] * receptive, d[0] * receptive)
}

fn fan(shape: &Shape, mode: FanMode) -> usize {
    let (fan_in, fan_out) = fan_in_and_fan_out(shape);
    match mode {
        FanMode::FanIn => fan_in,
        FanMode::FanOut => fan_out,
    }
}

/// Writes `f64` samples from `draw` into `t` (converted to its dtype).
fn fill_with(t: &Tensor, mut draw: impl FnMut() -> f64) {
    let vals: Vec<f64> = (0..t.elem_count()).map(|_| draw()).collect();
    t.assign(&Tensor::from_vec(vals, t.shape().clone()).to_dtype(t.dtype()));
}

/// Fills `t` with samples uniform in `[low, high)`.
pub fn uniform_(t: &Tensor, low: f64, high: f64, rng: &mut Rng) {
    assert!(low <= high, "uniform_: low {low} > high {high}");
    fill_with(t, || low + (high - low) * rng.next_f64());
}

/// Fills `t` with samples from `N(mean, std²)`.
pub fn normal_(t: &Tensor, mean: f64, std: f64, rng: &mut Rng) {
    assert!(std >= 0.0, "normal_: std must be non-negative, got {std}");
    fill_with(t, || mean + std * rng.next_normal());
}

/// Fills `t` with samples from `N(mean, std²)` truncated to `[a, b]` (absolute bounds, as in
/// PyTorch; defaults there are `a = -2, b = 2`). Drawn by rejection, so `[a, b]` must hold a
/// reasonable share of the mass (it does for any interval that contains `mean`).
pub fn trunc_normal_(t: &Tensor, mean: f64, std: f64, a: f64, b: f64, rng: &mut Rng) {
    assert!(a < b, "trunc_normal_: a {a} must be below b {b}");
    assert!(std > 0.0, "trunc_normal_: std must be positive, got {std}");
    fill_with(t, || {
        for _ in 0..1_000_000 {
            let v = mean + std * rng.next_normal();
            if (a..=b).contains(&v) {
                return v;
            }
        }
        panic!("trunc_normal_: [{a}, {b}] holds almost none of N({mean}, {std}²)")
    });
}

/// Fills `t` with zeros.
pub fn zeros_(t: &Tensor) {
    t.fill_(0.0);
}

/// Fills `t` with ones.
pub fn ones_(t: &Tensor) {
    t.fill_(1.0);
}

/// Fills `t` with a constant.
pub fn constant_(t: &Tensor, value: f64) {
    t.fill_(value);
}

/// He/Kaiming uniform: `U(-bound, bound)` with `bound = gain · √(3 / fan)` and
/// `gain = calculate_gain(nonlinearity)`. PyTorch's default for `Linear`/`Conv` weights is
/// `a = √5` with leaky ReLU, fan in: see [`kaiming_uniform_default_`].
pub fn kaiming_uniform_(t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity, rng: &mut Rng) {
    let std = calculate_gain(nonlinearity) / (fan(t.shape(), mode) as f64).sqrt();
    let bound = 3f64.sqrt() * std;
    uniform_(t, -bound, bound, rng);
}

/// He/Kaiming normal: `N(0, (gain / √fan)²)`.
pub fn kaiming_normal_(t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity, rng: &mut Rng) {
    let std = calculate_gain(nonlinearity) / (fan(t.shape(), mode) as f64).sqrt();
    normal_(t, 0.0, std, rng);
}

/// PyTorch's `Linear`/`Conv` weight init: `kaiming_uniform_(w, a=√5)`, i.e.
/// `U(-1/√fan_in, 1/√fan_in)`.
pub fn kaiming_uniform_default_(t: &Tensor, rng: &mut Rng) {
    kaiming_uniform_(t, FanMode::FanIn, Nonlinearity::LeakyRelu(5f64.sqrt()), rng);
}

/// PyTorch's `Linear`/`Conv` bias init: `U(-1/√fan_in, 1/√fan_in)` with `fan_in` from the
/// weight's shape (nothing is drawn when `fan_in` is 0, like PyTorch leaves it).
pub fn bias_uniform_(bias: &Tensor, weight_shape: &Shape, rng: &mut Rng) {
    let (fan_in, _) = fan_in_and_fan_out(weight_shape);
    let bound = if fan_in > 0 {
        1.0 / (fan_in as f64).sqrt()
    } else {
        0.0
    };
    uniform_(bias, -bound, bound, rng);
}

/// Glorot/Xavier uniform: `U(-a, a)` with `a = gain · √(6 / (fan_in + fan_out))`.
pub fn xavier_uniform_(t: &Tensor, gain: f64, rng: &mut Rng) {
    let (fan_in, fan_out) = fan_in_and_fan_out(t.shape());
    let std = gain * (2.0 / (fan_in + fan_out) as f64).sqrt();
    let a = 3f64.sqrt() * std;
    uniform_(t, -a, a, rng);
}

/// Glorot/Xavier normal: `N(0, std²)` with `std = gain · √(2 / (fan_in + fan_out))`.
pub fn xavier_normal_(t: &Tensor, gain: f64, rng: &mut Rng) {
    let (fan_in, fan_out) = fan_in_and_fan_out(t.shape());
    let std = gain * (2.0 / (fan_in + fan_out) as f64).sqrt();
    normal_(t, 0.0, std, rng);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(t: &Tensor) -> (f64, f64, f64, f64) {
        let v = t.to_f64_vec();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (mean, var.sqrt(), lo, hi)
    }

    #[test]
    fn fans_and_gains_match_torch() {
        assert_eq!(
            fan_in_and_fan_out(&Shape::from([8usize, 4].as_slice())),
            (4, 8)
        );
        assert_eq!(
            fan_in_and_fan_out(&Shape::from([16usize, 3, 5, 5].as_slice())),
            (75, 400)
        );
        assert!(
            (calculate_gain(Nonlinearity::LeakyRelu(5f64.sqrt())) - (1.0f64 / 3.0).sqrt()).abs()
                < 1e-15
        );
        assert_eq!(calculate_gain(Nonlinearity::Tanh), 5.0 / 3.0);
        assert_eq!(calculate_gain(Nonlinearity::Relu), 2f64.sqrt());
    }

    #[test]
    fn bounds_and_moments() {
        let mut rng = Rng::new(1);
        let w = Tensor::zeros([200, 400]);
        kaiming_uniform_default_(&w, &mut rng);
        let bound = 1.0 / 400f64.sqrt();
        let (m, s, lo, hi) = stats(&w);
        assert!(
            lo >= -bound && hi < bound && m.abs() < 2e-3,
            "{m} {lo} {hi}"
        );
        assert!((s - bound / 3f64.sqrt()).abs() < 1e-3, "{s}");

        kaiming_normal_(&w, FanMode::FanOut, Nonlinearity::Relu, &mut rng);
        let (_, s, _, _) = stats(&w);
        assert!((s - (2.0f64 / 200.0).sqrt()).abs() < 2e-3, "{s}");

        xavier_uniform_(&w, 1.0, &mut rng);
        let a = (6.0f64 / 600.0).sqrt();
        let (_, _, lo, hi) = stats(&w);
        assert!(lo >= -a && hi < a && hi > 0.99 * a);
        xavier_normal_(&w, 2.0, &mut rng);
        let (_, s, _, _) = stats(&w);
        assert!((s - 2.0 * (2.0f64 / 600.0).sqrt()).abs() < 2e-3, "{s}");

        let t = Tensor::zeros([100_000]).to_dtype(kiln_core::DType::F64);
        trunc_normal_(&t, 0.5, 1.0, -1.0, 1.5, &mut rng);
        let (_, _, lo, hi) = stats(&t);
        assert!(lo >= -1.0 && hi <= 1.5);
        normal_(&t, 3.0, 0.5, &mut rng);
        let (m, s, _, _) = stats(&t);
        assert!((m - 3.0).abs() < 0.01 && (s - 0.5).abs() < 0.01);

        let b = Tensor::zeros([1000]);
        bias_uniform_(&b, w.shape(), &mut rng);
        let (_, _, lo, hi) = stats(&b);
        assert!(lo >= -bound && hi < bound);
        ones_(&b);
        assert_eq!(stats(&b).0, 1.0);
        zeros_(&b);
        assert_eq!(stats(&b).0, 0.0);
        // Same seed, same numbers.
        let (x, y) = (Tensor::zeros([5, 5]), Tensor::zeros([5, 5]));
        kaiming_uniform_default_(&x, &mut Rng::new(9));
        kaiming_uniform_default_(&y, &mut Rng::new(9));
        assert_eq!(x.to_vec::<f32>(), y.to_vec::<f32>());
    }
}
