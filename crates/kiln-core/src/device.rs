//! Devices. Every op dispatches on the tensor's device; only the CPU exists today, so adding an
//! accelerator backend means adding a variant and its kernels, not redesigning the API.

/// Where a tensor's storage lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, CPU kernels.
    #[default]
    Cpu,
}
