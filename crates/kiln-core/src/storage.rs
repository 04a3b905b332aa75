//! Typed storage: one buffer of elements, shared by every view of it.

use crate::alloc::Buffer;
use crate::dtype::DType;

/// The elements behind a tensor, one variant per dtype.
#[derive(Debug, Clone)]
pub enum Storage {
    /// f32 elements.
    F32(Buffer<f32>),
    /// f64 elements.
    F64(Buffer<f64>),
    /// i64 elements.
    I64(Buffer<i64>),
    /// u32 elements.
    U32(Buffer<u32>),
}

impl Storage {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::I64(_) => DType::I64,
            Storage::U32(_) => DType::U32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(b) => b.len(),
            Storage::F64(b) => b.len(),
            Storage::I64(b) => b.len(),
            Storage::U32(b) => b.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A storage of `dtype` with no elements.
    pub fn empty(dtype: DType) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(Buffer::uninit(0)),
            DType::F64 => Storage::F64(Buffer::uninit(0)),
            DType::I64 => Storage::I64(Buffer::uninit(0)),
            DType::U32 => Storage::U32(Buffer::uninit(0)),
        }
    }
}

/// Runs `$body` with `$buf` bound to the typed buffer of `$storage` and the type alias `$T`
/// set to its element type.
#[macro_export]
#[doc(hidden)]
macro_rules! with_storage {
    ($storage:expr, |$buf:ident : $T:ident| $body:expr) => {
        match $storage {
            $crate::storage::Storage::F32($buf) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::storage::Storage::F64($buf) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            $crate::storage::Storage::I64($buf) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            $crate::storage::Storage::U32($buf) => {
                #[allow(dead_code)]
                type $T = u32;
                $body
            }
        }
    };
}

/// Like `with_storage!` but only for the float variants; panics with `$op` for the others.
#[macro_export]
#[doc(hidden)]
macro_rules! with_float_storage {
    ($storage:expr, $op:expr, |$buf:ident : $T:ident| $body:expr) => {
        match $storage {
            $crate::storage::Storage::F32($buf) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::storage::Storage::F64($buf) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            other => panic!(
                "{}: expected a float tensor (f32 or f64), got {}",
                $op,
                other.dtype()
            ),
        }
    };
}
