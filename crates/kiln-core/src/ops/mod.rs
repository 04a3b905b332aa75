//! Differentiable ops, one family per file: forward kernel, backward rule and tests together.

pub mod attention;
pub mod binary;
pub mod compare;
pub mod concat;
pub mod conv;
pub mod decode_attention;
pub mod dropout;
pub mod index;
pub mod inplace;
pub mod kernels;
pub mod linear;
pub mod low_rank;
pub mod matmul;
pub mod pool;
pub mod pow;
pub mod qmatmul;
#[cfg(target_arch = "x86_64")]
mod qpanels;
pub mod reduce;
pub mod reduce_extrema;
pub mod rnn_cell;
pub mod softmax;
pub mod stats;
pub mod unary;
pub mod view;
