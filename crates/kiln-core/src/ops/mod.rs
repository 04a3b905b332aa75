//! Differentiable ops, one family per file: forward kernel, backward rule and tests together.

pub mod binary;
pub mod kernels;
pub mod reduce;
pub mod view;
