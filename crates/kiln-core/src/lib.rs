//! kiln-core: tensors, CPU kernels and the define-by-run autograd engine.
//!
//! Knows nothing of layers, files or training: those live in the crates above it.

pub mod alloc;
pub mod autograd;
pub mod device;
pub mod dtype;
pub mod gradcheck;
pub mod layout;
pub mod ops;
pub mod parallel;
pub mod rng;
pub mod shape;
pub mod storage;
mod team;
pub mod tensor;
pub mod vmath;

pub use autograd::{enable_grad, is_grad_enabled, no_grad, with_no_grad, CustomOp, GradFn};
pub use device::Device;
pub use dtype::{DType, Element, Float};
pub use gradcheck::{gradcheck, gradcheck_with, GradcheckOptions};
pub use layout::Layout;
pub use ops::conv::{Conv1dOptions, Conv2dOptions, IntoPair};
pub use ops::pool::{AvgPool1dOptions, AvgPool2dOptions, MaxPool1dOptions, MaxPool2dOptions};
pub use ops::qmatmul::{QMatrix, QType};
pub use ops::view::Infer;
pub use rng::Rng;
pub use shape::{Dim, Dims, Shape};
pub use storage::Storage;
pub use tensor::{Tensor, TensorId};
