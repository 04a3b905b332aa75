//! kiln: a deep-learning framework in Rust.
//!
//! `use kiln::prelude::*;` brings in everything a model script needs.

pub use kiln_core as core;

/// The names most programs need.
pub mod prelude {
    pub use kiln_core::{
        enable_grad, gradcheck, no_grad, with_no_grad, CustomOp, DType, Device, GradFn, Infer, Rng,
        Shape, Tensor,
    };
}
