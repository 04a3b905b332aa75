//! Element types: the `DType` tag and the `Element` / `Float` traits kernels are generic over.

use crate::alloc::Buffer;
use crate::storage::Storage;
use std::fmt::Debug;

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float: the compute type.
    F32,
    /// 64-bit float: for exact gradient checks.
    F64,
    /// 64-bit signed integer: indices, labels.
    I64,
    /// 32-bit unsigned integer: token ids, indices.
    U32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// True for F32 and F64.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    /// Lower-case name as used in error messages (`f32`, `i64`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::U32 => "u32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plain-old-data element type that a tensor can store.
pub trait Element:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Default
    + num_traits::Num
    + num_traits::NumAssign
    + 'static
{
    /// The matching dtype tag.
    const DTYPE: DType;
    /// Lossy conversion to f64.
    fn to_f64(self) -> f64;
    /// Lossy conversion from f64 (truncating for integers).
    fn from_f64(v: f64) -> Self;
    /// Wrap a buffer of this type as storage.
    fn into_storage(buf: Buffer<Self>) -> Storage;
    /// Borrow the storage's elements if it holds this type.
    fn slice(storage: &Storage) -> Option<&[Self]>;
    /// Mutably borrow the storage's elements if it holds this type.
    fn slice_mut(storage: &mut Storage) -> Option<&mut [Self]>;
}

/// A floating-point element type (f32 or f64): what differentiable kernels compute in.
pub trait Float: Element + num_traits::Float + num_traits::FloatConst + std::iter::Sum {}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn into_storage(buf: Buffer<Self>) -> Storage {
                Storage::$variant(buf)
            }
            fn slice(storage: &Storage) -> Option<&[Self]> {
                match storage {
                    Storage::$variant(b) => Some(b),
                    _ => None,
                }
            }
            fn slice_mut(storage: &mut Storage) -> Option<&mut [Self]> {
                match storage {
                    Storage::$variant(b) => Some(b),
                    _ => None,
                }
            }
        }
    };
}

element!(f32, F32);
element!(f64, F64);
element!(i64, I64);
element!(u32, U32);

impl Float for f32 {}
impl Float for f64 {}

/// Runs `$body` with the type alias `$T` set to the Rust type of `$dtype` (any dtype).
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_dtype {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::U32 => {
                type $T = u32;
                $body
            }
        }
    };
}

/// Runs `$body` with `$T` = f32 or f64 following `$dtype`; panics naming `$op` for other dtypes.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_float {
    ($dtype:expr, $op:expr, |$T:ident| $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            other => panic!(
                "{}: expected a float tensor (f32 or f64), got {}",
                $op, other
            ),
        }
    };
}
