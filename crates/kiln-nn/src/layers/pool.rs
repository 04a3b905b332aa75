//! Pooling layers (no parameters): `MaxPool2d`, `AvgPool2d`, `AdaptiveAvgPool2d`, `MaxPool1d`,
//! `AvgPool1d`, each holding the options of the matching `kiln_core` op.

use crate::{Forward, Module};
use kiln_core::ops::pool::IntoPair;
use kiln_core::{AvgPool1dOptions, AvgPool2dOptions, MaxPool1dOptions, MaxPool2dOptions, Tensor};

/// `torch.nn.MaxPool2d` over `[N, C, H, W]` or `[C, H, W]`.
#[derive(Module, Debug, Clone, Default)]
pub struct MaxPool2d {
    /// Kernel, stride, padding, dilation, ceil mode.
    #[module(skip)]
    pub options: MaxPool2dOptions,
}

impl MaxPool2d {
    /// Windows of `kernel` with stride = kernel (refine with [`MaxPool2d::with_options`]).
    pub fn new(kernel: impl IntoPair) -> Self {
        Self::with_options(MaxPool2dOptions::new(kernel))
    }

    /// A layer with the given options, e.g. `MaxPool2dOptions::new(3).stride(2).padding(1)`.
    pub fn with_options(options: MaxPool2dOptions) -> Self {
        MaxPool2d { options }
    }
}

impl Forward for MaxPool2d {
    /// `x.max_pool2d(options)`.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.max_pool2d(self.options)
    }
}

/// `torch.nn.AvgPool2d` over `[N, C, H, W]` or `[C, H, W]`.
#[derive(Module, Debug, Clone, Default)]
pub struct AvgPool2d {
    /// Kernel, stride, padding, ceil mode, `count_include_pad`, divisor override.
    #[module(skip)]
    pub options: AvgPool2dOptions,
}

impl AvgPool2d {
    /// Windows of `kernel` with stride = kernel (refine with [`AvgPool2d::with_options`]).
    pub fn new(kernel: impl IntoPair) -> Self {
        Self::with_options(AvgPool2dOptions::new(kernel))
    }

    /// A layer with the given options.
    pub fn with_options(options: AvgPool2dOptions) -> Self {
        AvgPool2d { options }
    }
}

impl Forward for AvgPool2d {
    /// `x.avg_pool2d(options)`.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.avg_pool2d(self.options)
    }
}

/// `torch.nn.AdaptiveAvgPool2d`: average pooling to a fixed output size.
#[derive(Module, Debug, Clone)]
pub struct AdaptiveAvgPool2d {
    /// Output (height, width).
    #[module(skip)]
    pub output_size: (usize, usize),
}

impl AdaptiveAvgPool2d {
    /// Pools to `output_size` (`7`, `(3, 2)`).
    pub fn new(output_size: impl IntoPair) -> Self {
        AdaptiveAvgPool2d {
            output_size: output_size.into_pair(),
        }
    }
}

impl Default for AdaptiveAvgPool2d {
    /// Global average pooling (output 1×1).
    fn default() -> Self {
        Self::new(1)
    }
}

impl Forward for AdaptiveAvgPool2d {
    /// `x.adaptive_avg_pool2d(output_size)`.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.adaptive_avg_pool2d(self.output_size)
    }
}

/// `torch.nn.MaxPool1d` over `[N, C, L]` or `[C, L]`.
#[derive(Module, Debug, Clone, Default)]
pub struct MaxPool1d {
    /// Kernel, stride, padding, dilation, ceil mode.
    #[module(skip)]
    pub options: MaxPool1dOptions,
}

impl MaxPool1d {
    /// Windows of `kernel` with stride = kernel.
    pub fn new(kernel: usize) -> Self {
        Self::with_options(MaxPool1dOptions::new(kernel))
    }

    /// A layer with the given options.
    pub fn with_options(options: MaxPool1dOptions) -> Self {
        MaxPool1d { options }
    }
}

impl Forward for MaxPool1d {
    /// `x.max_pool1d(options)`.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.max_pool1d(self.options)
    }
}

/// `torch.nn.AvgPool1d` over `[N, C, L]` or `[C, L]`.
#[derive(Module, Debug, Clone, Default)]
pub struct AvgPool1d {
    /// Kernel, stride, padding, ceil mode, `count_include_pad`.
    #[module(skip)]
    pub options: AvgPool1dOptions,
}

impl AvgPool1d {
    /// Windows of `kernel` with stride = kernel.
    pub fn new(kernel: usize) -> Self {
        Self::with_options(AvgPool1dOptions::new(kernel))
    }

    /// A layer with the given options.
    pub fn with_options(options: AvgPool1dOptions) -> Self {
        AvgPool1d { options }
    }
}

impl Forward for AvgPool1d {
    /// `x.avg_pool1d(options)`.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.avg_pool1d(self.options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::{seq, ModuleExt};
    use kiln_core::gradcheck::randn_f64;

    #[test]
    fn layers_apply_their_ops_and_have_no_state() {
        let x = randn_f64(&[2, 3, 7, 6], 1);
        let o = MaxPool2dOptions::new(3)
            .stride(2)
            .padding(1)
            .ceil_mode(true);
        let m = MaxPool2d::with_options(o);
        assert_eq!(
            m.forward(&x).to_vec::<f64>(),
            x.max_pool2d(o).to_vec::<f64>()
        );
        assert_eq!(m.forward(&x).dims(), &[2, 3, 4, 4]);
        assert_eq!(MaxPool2d::new(2).options, MaxPool2dOptions::default());
        let a = AvgPool2dOptions::new((3, 2))
            .count_include_pad(false)
            .padding(1);
        assert_eq!(
            AvgPool2d::with_options(a).forward(&x).to_vec::<f64>(),
            x.avg_pool2d(a).to_vec::<f64>()
        );
        assert_eq!(
            AdaptiveAvgPool2d::default().forward(&x).dims(),
            &[2, 3, 1, 1]
        );
        assert_eq!(
            AdaptiveAvgPool2d::new((3, 5)).forward(&x).dims(),
            &[2, 3, 3, 5]
        );
        let x1 = randn_f64(&[2, 3, 9], 2);
        assert_eq!(MaxPool1d::new(3).forward(&x1).dims(), &[2, 3, 3]);
        assert_eq!(AvgPool1d::default().forward(&x1).dims(), &[2, 3, 4]);
        let net = seq![
            MaxPool2d::new(2),
            AvgPool2d::new(1),
            AdaptiveAvgPool2d::new(1)
        ];
        assert_eq!(net.num_parameters(), 0);
        assert!(net.state_dict().is_empty());
    }

    #[test]
    fn gradcheck_pool_layers() {
        let x = randn_f64(&[2, 2, 5, 6], 3).requires_grad();
        gradcheck_module(
            &MaxPool2d::with_options(MaxPool2dOptions::new(3).stride(1).padding(1)),
            &x,
        )
        .unwrap();
        gradcheck_module(
            &AvgPool2d::with_options(AvgPool2dOptions::new(2).ceil_mode(true).stride(1)),
            &x,
        )
        .unwrap();
        gradcheck_module(&AdaptiveAvgPool2d::new((4, 4)), &x).unwrap();
        let x1 = randn_f64(&[2, 3, 8], 4).requires_grad();
        gradcheck_module(
            &MaxPool1d::with_options(MaxPool1dOptions::new(3).stride(2).ceil_mode(true)),
            &x1,
        )
        .unwrap();
        gradcheck_module(
            &AvgPool1d::with_options(AvgPool1dOptions::new(3).padding(1)),
            &x1,
        )
        .unwrap();
    }
}
