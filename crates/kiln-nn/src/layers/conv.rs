//! `Conv1d` and `Conv2d`: parameters named, shaped and initialised like `torch.nn.Conv1d` /
//! `torch.nn.Conv2d`, with stride, zero padding (explicit or `"same"`), dilation and groups.
//! The convolution itself is [`Tensor::conv2d`] / [`Tensor::conv1d`] in kiln-core.

use crate::init;
use crate::{Forward, Module, NnError, Param};
use kiln_core::{Conv1dOptions, Conv2dOptions, IntoPair, Rng, Tensor};
use std::str::FromStr;

/// Zero padding of a [`Conv2d`]: explicit `(height, width)` sizes, or `Same` (output as large as
/// the input; stride 1 only; an odd total padding puts the extra zero after the input, as
/// PyTorch's `padding='same'` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding2d {
    /// Zeros on both sides of each dim: `(height, width)`.
    Explicit(usize, usize),
    /// PyTorch's `padding='same'`.
    Same,
}

impl From<usize> for Padding2d {
    fn from(p: usize) -> Self {
        Padding2d::Explicit(p, p)
    }
}

impl From<(usize, usize)> for Padding2d {
    fn from((h, w): (usize, usize)) -> Self {
        Padding2d::Explicit(h, w)
    }
}

/// Zero padding of a [`Conv1d`]: an explicit size, or `Same` (as for [`Padding2d::Same`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding1d {
    /// Zeros on both sides.
    Explicit(usize),
    /// PyTorch's `padding='same'`.
    Same,
}

impl From<usize> for Padding1d {
    fn from(p: usize) -> Self {
        Padding1d::Explicit(p)
    }
}

/// Parses torch's spellings: `"same"`, `"valid"` (0) or a size.
fn parse_padding(s: &str) -> Result<Option<Vec<usize>>, NnError> {
    match s.trim() {
        "same" => Ok(None),
        "valid" => Ok(Some(vec![0])),
        other => other
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|_| {
                NnError::Config(format!(
                    "padding `{s}`: expected \"same\", \"valid\" or non-negative sizes like \"1\" or \"1,2\""
                ))
            }),
    }
}

impl FromStr for Padding2d {
    type Err = NnError;
    /// `"same"`, `"valid"`, `"1"` or `"1,2"` (height, width).
    fn from_str(s: &str) -> Result<Self, NnError> {
        match parse_padding(s)?.as_deref() {
            None => Ok(Padding2d::Same),
            Some([p]) => Ok(Padding2d::Explicit(*p, *p)),
            Some([h, w]) => Ok(Padding2d::Explicit(*h, *w)),
            Some(v) => Err(NnError::Config(format!(
                "padding `{s}`: a 2-D convolution takes 1 or 2 sizes, got {}",
                v.len()
            ))),
        }
    }
}

impl FromStr for Padding1d {
    type Err = NnError;
    /// `"same"`, `"valid"` or `"1"`.
    fn from_str(s: &str) -> Result<Self, NnError> {
        match parse_padding(s)?.as_deref() {
            None => Ok(Padding1d::Same),
            Some([p]) => Ok(Padding1d::Explicit(*p)),
            Some(v) => Err(NnError::Config(format!(
                "padding `{s}`: a 1-D convolution takes 1 size, got {}",
                v.len()
            ))),
        }
    }
}

/// Options of [`Conv2d::with_config`]. Default: stride 1, padding 0, dilation 1, groups 1, bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// `(height, width)` step between output positions.
    pub stride: (usize, usize),
    /// Zero padding.
    pub padding: Padding2d,
    /// `(height, width)` spacing between kernel taps.
    pub dilation: (usize, usize),
    /// Channel groups (`groups == in == out` is a depthwise convolution).
    pub groups: usize,
    /// Whether to learn an additive bias.
    pub bias: bool,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Conv2dConfig {
            stride: (1, 1),
            padding: Padding2d::Explicit(0, 0),
            dilation: (1, 1),
            groups: 1,
            bias: true,
        }
    }
}

impl Conv2dConfig {
    /// Sets the stride (`2` or `(2, 1)`).
    pub fn stride(mut self, s: impl IntoPair) -> Self {
        self.stride = s.into_pair();
        self
    }

    /// Sets the padding (`1`, `(1, 0)` or `Padding2d::Same`).
    pub fn padding(mut self, p: impl Into<Padding2d>) -> Self {
        self.padding = p.into();
        self
    }

    /// Sets `padding='same'`.
    pub fn padding_same(self) -> Self {
        self.padding(Padding2d::Same)
    }

    /// Sets the dilation (`2` or `(2, 1)`).
    pub fn dilation(mut self, d: impl IntoPair) -> Self {
        self.dilation = d.into_pair();
        self
    }

    /// Sets the number of groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }

    /// Sets whether the layer has a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

/// Options of [`Conv1d::with_config`]. Default: stride 1, padding 0, dilation 1, groups 1, bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv1dConfig {
    /// Step between output positions.
    pub stride: usize,
    /// Zero padding.
    pub padding: Padding1d,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
    /// Whether to learn an additive bias.
    pub bias: bool,
}

impl Default for Conv1dConfig {
    fn default() -> Self {
        Conv1dConfig {
            stride: 1,
            padding: Padding1d::Explicit(0),
            dilation: 1,
            groups: 1,
            bias: true,
        }
    }
}

impl Conv1dConfig {
    /// Sets the stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }

    /// Sets the padding (`1` or `Padding1d::Same`).
    pub fn padding(mut self, p: impl Into<Padding1d>) -> Self {
        self.padding = p.into();
        self
    }

    /// Sets `padding='same'`.
    pub fn padding_same(self) -> Self {
        self.padding(Padding1d::Same)
    }

    /// Sets the dilation.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = d;
        self
    }

    /// Sets the number of groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }

    /// Sets whether the layer has a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

/// Checks the channel/group/stride settings a layer is built with.
fn check_layer(layer: &str, cin: usize, cout: usize, groups: usize, same: bool, strided: bool) {
    assert!(
        groups >= 1 && cin.is_multiple_of(groups) && cout.is_multiple_of(groups),
        "{layer}: in_channels {cin} and out_channels {cout} must be multiples of groups {groups}"
    );
    assert!(
        !(same && strided),
        "{layer}: padding='same' is not supported for strided convolutions"
    );
}

/// `(before, extra after)` zero padding of one dim for `padding='same'`: a total of
/// `dilation·(k − 1)`, the odd one (if any) after the input.
fn same_padding(k: usize, dilation: usize) -> (usize, usize) {
    let total = dilation * (k - 1);
    let left = total / 2;
    (left, total - 2 * left)
}

/// `x` with `extra` zeros appended along `dim` (differentiable: a concatenation).
fn pad_after(x: &Tensor, dim: usize, extra: usize) -> Tensor {
    if extra == 0 {
        return x.clone();
    }
    let mut dims = x.dims().to_vec();
    dims[dim] = extra;
    Tensor::cat(&[x.clone(), Tensor::zeros_dtype(dims, x.dtype())], dim)
}

/// A 2-D convolution layer: `weight` `[out, in/groups, kH, kW]`, optional `bias` `[out]`,
/// input `[N, in, H, W]` or `[in, H, W]`.
#[derive(Module, Debug, Clone)]
pub struct Conv2d {
    /// `[out_channels, in_channels/groups, kH, kW]`.
    pub weight: Param,
    /// `[out_channels]`, if the layer has a bias.
    pub bias: Option<Param>,
    /// `(height, width)` stride.
    #[module(skip)]
    pub stride: (usize, usize),
    /// Zero padding.
    #[module(skip)]
    pub padding: Padding2d,
    /// `(height, width)` dilation.
    #[module(skip)]
    pub dilation: (usize, usize),
    /// Channel groups.
    #[module(skip)]
    pub groups: usize,
}

impl Conv2d {
    /// A layer with stride 1, no padding and a bias, initialised like PyTorch: weight by
    /// `kaiming_uniform_(a=√5)`, bias `U(-1/√fan_in, 1/√fan_in)` with
    /// `fan_in = in/groups · kH · kW`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl IntoPair,
        rng: &mut Rng,
    ) -> Self {
        Self::with_config(
            in_channels,
            out_channels,
            kernel_size,
            Conv2dConfig::default(),
            rng,
        )
    }

    /// A layer with the given options (e.g. `Conv2dConfig::default().padding(1).stride(2)`).
    pub fn with_config(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl IntoPair,
        config: Conv2dConfig,
        rng: &mut Rng,
    ) -> Self {
        let (kh, kw) = kernel_size.into_pair();
        check_layer(
            "Conv2d",
            in_channels,
            out_channels,
            config.groups,
            config.padding == Padding2d::Same,
            config.stride != (1, 1),
        );
        let weight = Tensor::zeros([out_channels, in_channels / config.groups, kh, kw]);
        init::kaiming_uniform_default_(&weight, rng);
        let bias = config.bias.then(|| {
            let b = Tensor::zeros([out_channels]);
            init::bias_uniform_(&b, weight.shape(), rng);
            Param::new(b)
        });
        Conv2d {
            weight: Param::new(weight),
            bias,
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
            groups: config.groups,
        }
    }

    /// A layer over given tensors (`weight` `[out, in/groups, kH, kW]`, `bias` `[out]`), e.g.
    /// for loading; `config.bias` is ignored (the layer has a bias iff `bias` is given).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        assert_eq!(
            weight.rank(),
            4,
            "Conv2d: weight must be [out, in/groups, kH, kW], got {}",
            weight.shape()
        );
        let cout = weight.dims()[0];
        if let Some(b) = &bias {
            assert_eq!(
                b.dims(),
                &[cout],
                "Conv2d: bias shape {} does not match weight {}",
                b.shape(),
                weight.shape()
            );
        }
        check_layer(
            "Conv2d",
            weight.dims()[1] * config.groups,
            cout,
            config.groups,
            config.padding == Padding2d::Same,
            config.stride != (1, 1),
        );
        Conv2d {
            weight: Param::new(weight),
            bias: bias.map(Param::new),
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
            groups: config.groups,
        }
    }

    /// Number of input channels.
    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    /// Number of output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `(kH, kW)`.
    pub fn kernel_size(&self) -> (usize, usize) {
        (self.weight.dims()[2], self.weight.dims()[3])
    }
}

impl Forward for Conv2d {
    /// Convolves `x` (`[N, C, H, W]` or `[C, H, W]`); `"same"` padding pads an odd extra zero
    /// after the input explicitly.
    fn forward(&self, x: &Tensor) -> Tensor {
        let (x, padding) = match self.padding {
            Padding2d::Explicit(h, w) => (x.clone(), (h, w)),
            Padding2d::Same => {
                let (kh, kw) = self.kernel_size();
                let (ph, eh) = same_padding(kh, self.dilation.0);
                let (pw, ew) = same_padding(kw, self.dilation.1);
                let r = x.rank();
                assert!(
                    r >= 2,
                    "Conv2d: input must be [N, C, H, W] or [C, H, W], got shape {}",
                    x.shape()
                );
                (pad_after(&pad_after(x, r - 2, eh), r - 1, ew), (ph, pw))
            }
        };
        let opts = Conv2dOptions {
            stride: self.stride,
            padding,
            dilation: self.dilation,
            groups: self.groups,
        };
        x.conv2d(&self.weight, self.bias.as_deref(), opts)
    }
}

/// A 1-D convolution layer: `weight` `[out, in/groups, k]`, optional `bias` `[out]`, input
/// `[N, in, L]` or `[in, L]`.
#[derive(Module, Debug, Clone)]
pub struct Conv1d {
    /// `[out_channels, in_channels/groups, kernel_size]`.
    pub weight: Param,
    /// `[out_channels]`, if the layer has a bias.
    pub bias: Option<Param>,
    /// Stride.
    #[module(skip)]
    pub stride: usize,
    /// Zero padding.
    #[module(skip)]
    pub padding: Padding1d,
    /// Dilation.
    #[module(skip)]
    pub dilation: usize,
    /// Channel groups.
    #[module(skip)]
    pub groups: usize,
}

impl Conv1d {
    /// A layer with stride 1, no padding and a bias, initialised like PyTorch (see
    /// [`Conv2d::new`]).
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize, rng: &mut Rng) -> Self {
        Self::with_config(
            in_channels,
            out_channels,
            kernel_size,
            Conv1dConfig::default(),
            rng,
        )
    }

    /// A layer with the given options.
    pub fn with_config(
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        config: Conv1dConfig,
        rng: &mut Rng,
    ) -> Self {
        check_layer(
            "Conv1d",
            in_channels,
            out_channels,
            config.groups,
            config.padding == Padding1d::Same,
            config.stride != 1,
        );
        let weight = Tensor::zeros([out_channels, in_channels / config.groups, kernel_size]);
        init::kaiming_uniform_default_(&weight, rng);
        let bias = config.bias.then(|| {
            let b = Tensor::zeros([out_channels]);
            init::bias_uniform_(&b, weight.shape(), rng);
            Param::new(b)
        });
        Conv1d {
            weight: Param::new(weight),
            bias,
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
            groups: config.groups,
        }
    }

    /// A layer over given tensors (`weight` `[out, in/groups, k]`, `bias` `[out]`);
    /// `config.bias` is ignored.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, config: Conv1dConfig) -> Self {
        assert_eq!(
            weight.rank(),
            3,
            "Conv1d: weight must be [out, in/groups, k], got {}",
            weight.shape()
        );
        let cout = weight.dims()[0];
        if let Some(b) = &bias {
            assert_eq!(
                b.dims(),
                &[cout],
                "Conv1d: bias shape {} does not match weight {}",
                b.shape(),
                weight.shape()
            );
        }
        check_layer(
            "Conv1d",
            weight.dims()[1] * config.groups,
            cout,
            config.groups,
            config.padding == Padding1d::Same,
            config.stride != 1,
        );
        Conv1d {
            weight: Param::new(weight),
            bias: bias.map(Param::new),
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
            groups: config.groups,
        }
    }

    /// Number of input channels.
    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    /// Number of output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Kernel size.
    pub fn kernel_size(&self) -> usize {
        self.weight.dims()[2]
    }
}

impl Forward for Conv1d {
    /// Convolves `x` (`[N, C, L]` or `[C, L]`).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (x, padding) = match self.padding {
            Padding1d::Explicit(p) => (x.clone(), p),
            Padding1d::Same => {
                let (p, extra) = same_padding(self.kernel_size(), self.dilation);
                assert!(
                    x.rank() >= 1,
                    "Conv1d: input must be [N, C, L] or [C, L], got shape {}",
                    x.shape()
                );
                (pad_after(x, x.rank() - 1, extra), p)
            }
        };
        let opts = Conv1dOptions {
            stride: self.stride,
            padding,
            dilation: self.dilation,
            groups: self.groups,
        };
        x.conv1d(&self.weight, self.bias.as_deref(), opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;

    #[test]
    fn names_shapes_and_torch_init_bounds() {
        let mut rng = Rng::new(0);
        let c = Conv2d::with_config(4, 6, (3, 2), Conv2dConfig::default().groups(2), &mut rng);
        let names: Vec<_> = c
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            [
                ("weight".to_string(), vec![6, 2, 3, 2]),
                ("bias".to_string(), vec![6])
            ]
        );
        assert_eq!((c.in_channels(), c.out_channels()), (4, 6));
        // fan_in = 2·3·2 = 12: weight and bias within ±1/√12, and not all tiny.
        let bound = 1.0 / 12f64.sqrt();
        for p in [&*c.weight, c.bias.as_deref().unwrap()] {
            let v = p.to_f64_vec();
            assert!(v.iter().all(|x| x.abs() <= bound), "{v:?}");
            assert!(v.iter().any(|x| x.abs() > bound / 4.0));
        }
        let nb = Conv1d::with_config(3, 5, 4, Conv1dConfig::default().bias(false), &mut rng);
        assert_eq!(nb.named_parameters().len(), 1);
        assert_eq!(nb.weight.dims(), &[5, 3, 4]);
        let y = Conv2d::new(3, 8, 3, &mut rng).forward(&Tensor::ones([2, 3, 10, 9]));
        assert_eq!(y.dims(), &[2, 8, 8, 7]);
    }

    #[test]
    fn same_padding_keeps_the_size_even_when_asymmetric() {
        let mut rng = Rng::new(1);
        for (k, d) in [(3, 1), (4, 1), (2, 3), (5, 2)] {
            let c = Conv2d::with_config(
                2,
                3,
                (k, 3),
                Conv2dConfig::default().padding_same().dilation((d, 1)),
                &mut rng,
            );
            assert_eq!(c.forward(&Tensor::ones([1, 2, 9, 7])).dims(), &[1, 3, 9, 7]);
            let c = Conv1d::with_config(
                2,
                3,
                k,
                Conv1dConfig::default().padding_same().dilation(d),
                &mut rng,
            );
            assert_eq!(c.forward(&Tensor::ones([2, 8])).dims(), &[3, 8]);
        }
    }

    #[test]
    fn gradcheck_layers_input_and_parameters() {
        let cfg = Conv2dConfig::default;
        for (cin, cout, k, config) in [
            (2, 3, (3, 3), cfg().padding(1)),
            (
                2,
                4,
                (3, 2),
                cfg().stride((2, 1)).dilation((1, 2)).bias(false),
            ),
            (4, 4, (2, 2), cfg().groups(2).padding((1, 0))),
            (3, 3, (3, 3), cfg().groups(3).padding(1)),
            (2, 3, (4, 2), cfg().padding_same()),
            (2, 2, (2, 3), cfg().padding_same().dilation((3, 1))),
        ] {
            let w = Tensor::randn_f64([cout, cin / config.groups, k.0, k.1], 1);
            let b = config.bias.then(|| Tensor::randn_f64([cout], 2));
            let layer = Conv2d::from_weights(w, b, config);
            let x = Tensor::randn_f64([2, cin, 5, 6], 3).requires_grad();
            gradcheck_module(&layer, &x).unwrap_or_else(|e| panic!("{config:?}: {e}"));
            let x = Tensor::randn_f64([cin, 4, 5], 4).requires_grad();
            gradcheck_module(&layer, &x).unwrap_or_else(|e| panic!("unbatched {config:?}: {e}"));
        }
        let cfg = Conv1dConfig::default;
        for (cin, cout, k, config) in [
            (3, 2, 3, cfg().padding(1).stride(2)),
            (4, 6, 2, cfg().groups(2).dilation(2)),
            (2, 3, 4, cfg().padding_same()),
        ] {
            let w = Tensor::randn_f64([cout, cin / config.groups, k], 5);
            let layer = Conv1d::from_weights(w, Some(Tensor::randn_f64([cout], 6)), config);
            let x = Tensor::randn_f64([2, cin, 9], 7).requires_grad();
            gradcheck_module(&layer, &x).unwrap_or_else(|e| panic!("{config:?}: {e}"));
        }
    }

    #[test]
    fn padding_parses_torch_spellings() {
        assert_eq!("same".parse::<Padding2d>().unwrap(), Padding2d::Same);
        assert_eq!(
            "valid".parse::<Padding2d>().unwrap(),
            Padding2d::Explicit(0, 0)
        );
        assert_eq!(
            "1, 2".parse::<Padding2d>().unwrap(),
            Padding2d::Explicit(1, 2)
        );
        assert_eq!("3".parse::<Padding1d>().unwrap(), Padding1d::Explicit(3));
        let err = "full".parse::<Padding2d>().unwrap_err().to_string();
        assert!(err.contains("padding `full`: expected \"same\""), "{err}");
        let err = "1,2".parse::<Padding1d>().unwrap_err().to_string();
        assert!(
            err.contains("a 1-D convolution takes 1 size, got 2"),
            "{err}"
        );
    }

    #[test]
    #[should_panic(expected = "Conv2d: padding='same' is not supported for strided convolutions")]
    fn same_with_stride_panics() {
        let _ = Conv2d::with_config(
            1,
            1,
            3,
            Conv2dConfig::default().padding_same().stride(2),
            &mut Rng::new(0),
        );
    }

    #[test]
    #[should_panic(
        expected = "Conv1d: in_channels 3 and out_channels 4 must be multiples of groups 2"
    )]
    fn channels_not_divisible_by_groups_panic() {
        let _ = Conv1d::with_config(3, 4, 3, Conv1dConfig::default().groups(2), &mut Rng::new(0));
    }
}
