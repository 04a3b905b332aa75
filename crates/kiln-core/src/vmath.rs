//! Vectorised transcendental functions over f32 slices (exp, ln, sin, cos, tanh, sigmoid, erf,
//! GELU, SiLU, softplus and the derivatives the backward rules need), chosen at run time among
//! an AVX-512F path, an AVX2+FMA path and a portable scalar path.
//!
//! Every function is written once, generically over a small `Simd` trait (16 lanes of
//! `__m512`, 8 lanes of `__m256`, or one plain `f32`), so the three paths run the same
//! algorithm: Cody–Waite range reduction and Cephes / minimax polynomials, branch-free (both
//! sides of a piecewise definition are computed and blended), with no libm calls (except for
//! sin/cos of |x| > 65536, recomputed in f64 outside the vector loop). The widest
//! path the CPU supports is detected once and cached; `KILN_VMATH_ISA=scalar|avx2|avx512`
//! forces a narrower one (for benchmarking), and a request the CPU cannot run is ignored.
//!
//! Accuracy, measured against f64 reference math over dense sweeps of the f32 line (see the
//! tests, which allow 5e-7 relative / 1.5e-7 absolute): max relative error 2.2e-7 (a few ulp)
//! for results in the normal range, and for the GELU/SiLU family an absolute error below 7e-8
//! where the function or its derivative is small (|result| < 0.3, e.g. near a zero crossing). IEEE
//! special values follow the limits: `exp(-inf) = 0`, `ln(0) = -inf`, `ln(x < 0) = NaN`,
//! `gelu(-inf) = silu(-inf) = -0`, NaN in, NaN out.
//!
//! The functions run on the calling thread; callers split large slices across threads.

use std::sync::atomic::{AtomicU8, Ordering};

// ---------------------------------------------------------------------------- dispatch

/// An instruction-set level the kernels of this module can run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable scalar code (any target).
    Scalar,
    /// x86-64 AVX2 with FMA: 8 lanes.
    Avx2,
    /// x86-64 AVX-512F: 16 lanes.
    Avx512,
}

impl Isa {
    /// Lower-case name, as accepted by `KILN_VMATH_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// True when this CPU can run the path.
    pub fn is_available(self) -> bool {
        self <= best_isa()
    }
}

/// The widest path this CPU supports (detected once).
fn best_isa() -> Isa {
    static BEST: AtomicU8 = AtomicU8::new(0);
    match BEST.load(Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        _ => {
            let best = detect();
            BEST.store(best as u8 + 1, Ordering::Relaxed);
            best
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if is_x86_feature_detected!("avx512f") {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Scalar
}

/// The path the slice functions use: the widest available, or the narrower one named by
/// `KILN_VMATH_ISA` (read once).
pub fn isa() -> Isa {
    static CHOSEN: AtomicU8 = AtomicU8::new(0);
    match CHOSEN.load(Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        _ => {
            let best = best_isa();
            let chosen = match std::env::var("KILN_VMATH_ISA").as_deref().map(str::trim) {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") => Isa::Avx2,
                Ok("avx512") => Isa::Avx512,
                _ => best,
            }
            .min(best);
            CHOSEN.store(chosen as u8 + 1, Ordering::Relaxed);
            chosen
        }
    }
}

/// Every path this CPU can run, narrowest first.
pub fn available_isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}

/// Plain loops (row sums, scaled updates) that the compiler vectorises itself: [`run_wide`]
/// compiles [`WideKernel::run`] for the widest path the CPU has. The generic build targets
/// baseline x86-64 (SSE2), where such loops run 4 f32 lanes wide or stay scalar.
pub trait WideKernel {
    /// The loops. Implementations mark it `#[inline(always)]` so that it is compiled into each
    /// wide wrapper rather than called from it.
    fn run(&mut self);
}

/// Runs `kernel` compiled for AVX-512F, else AVX2 + FMA, as [`isa`] chooses (portable code
/// otherwise).
pub fn run_wide<K: WideKernel>(kernel: &mut K) {
    run_wide_on(isa(), kernel)
}

/// [`run_wide`] on path `isa` (clamped to what the CPU supports).
fn run_wide_on<K: WideKernel>(isa: Isa, kernel: &mut K) {
    match isa.min(best_isa()) {
        // SAFETY: the CPU supports the features these functions are compiled for (checked by
        // `best_isa` just above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::run_wide_avx512(kernel) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::run_wide_avx2(kernel) },
        _ => kernel.run(),
    }
}

/// One elementwise function, generic over the vector type.
trait Kernel {
    fn eval<S: Simd>(x: S) -> S;
}

/// Runs kernel `K` over `src` into `dst` on path `isa` (clamped to what the CPU supports).
fn run<K: Kernel>(isa: Isa, name: &str, src: &[f32], dst: &mut [f32]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "vmath::{name}: src has {} elements, dst has {}",
        src.len(),
        dst.len()
    );
    match isa.min(best_isa()) {
        // SAFETY: the CPU supports the features these functions are compiled for (checked by
        // `best_isa` just above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::drive_avx512::<K>(src, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::drive_avx2::<K>(src, dst) },
        _ => drive::<f32, K>(src, dst),
    }
}

/// The loop every path shares: whole vectors, then the tail through a padded stack buffer.
#[inline(always)]
fn drive<S: Simd, K: Kernel>(src: &[f32], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 2 * S::LANES <= n {
        // SAFETY: i + 2 * LANES <= n, in bounds of both slices.
        unsafe {
            let a = S::load(sp.add(i));
            let b = S::load(sp.add(i + S::LANES));
            K::eval(a).store(dp.add(i));
            K::eval(b).store(dp.add(i + S::LANES));
        }
        i += 2 * S::LANES;
    }
    while i + S::LANES <= n {
        // SAFETY: i + LANES <= n.
        unsafe { K::eval(S::load(sp.add(i))).store(dp.add(i)) };
        i += S::LANES;
    }
    if i < n {
        let mut buf = [0f32; 16];
        buf[..n - i].copy_from_slice(&src[i..n]);
        // SAFETY: LANES <= 16, the buffer's length.
        unsafe { K::eval(S::load(buf.as_ptr())).store(buf.as_mut_ptr()) };
        dst[i..n].copy_from_slice(&buf[..n - i]);
    }
}

/// One elementwise function with two results per input, generic over the vector type.
trait Kernel2 {
    fn eval<S: Simd>(x: S) -> (S, S);
}

/// Runs kernel `K` over `src` into `dst0` and `dst1` on path `isa` (clamped to what the CPU
/// supports).
fn run2<K: Kernel2>(isa: Isa, name: &str, src: &[f32], dst0: &mut [f32], dst1: &mut [f32]) {
    assert!(
        src.len() == dst0.len() && src.len() == dst1.len(),
        "vmath::{name}: src has {} elements, the outputs {} and {}",
        src.len(),
        dst0.len(),
        dst1.len()
    );
    match isa.min(best_isa()) {
        // SAFETY: the CPU supports the features these functions are compiled for (checked by
        // `best_isa` just above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::drive2_avx512::<K>(src, dst0, dst1) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::drive2_avx2::<K>(src, dst0, dst1) },
        _ => drive2::<f32, K>(src, dst0, dst1),
    }
}

/// [`drive`] for a [`Kernel2`]: whole vectors, then the tail through padded stack buffers.
#[inline(always)]
fn drive2<S: Simd, K: Kernel2>(src: &[f32], dst0: &mut [f32], dst1: &mut [f32]) {
    let n = src.len().min(dst0.len()).min(dst1.len());
    let (sp, p0, p1) = (src.as_ptr(), dst0.as_mut_ptr(), dst1.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        // SAFETY: i + LANES <= n, in bounds of all three slices.
        unsafe {
            let (a, b) = K::eval(S::load(sp.add(i)));
            a.store(p0.add(i));
            b.store(p1.add(i));
        }
        i += S::LANES;
    }
    if i < n {
        let (mut buf, mut b0, mut b1) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        buf[..n - i].copy_from_slice(&src[i..n]);
        // SAFETY: LANES <= 16, the buffers' length.
        unsafe {
            let (a, b) = K::eval(S::load(buf.as_ptr()));
            a.store(b0.as_mut_ptr());
            b.store(b1.as_mut_ptr());
        }
        dst0[i..n].copy_from_slice(&b0[..n - i]);
        dst1[i..n].copy_from_slice(&b1[..n - i]);
    }
}

struct GeluErfWithGradK;
impl Kernel2 for GeluErfWithGradK {
    #[inline(always)]
    fn eval<S: Simd>(x: S) -> (S, S) {
        gelu_erf_with_grad_v(x)
    }
}

/// `y[i] = gelu_erf(src[i])` and `d[i] = gelu_erf_grad(src[i])` in one pass (they share the
/// normal CDF): what a GELU whose backward keeps its derivative computes. The values equal
/// those of [`gelu_erf`] and [`gelu_erf_grad`] bit for bit.
///
/// Panics if the slices differ in length.
pub fn gelu_erf_with_grad(src: &[f32], y: &mut [f32], d: &mut [f32]) {
    run2::<GeluErfWithGradK>(isa(), "gelu_erf_with_grad", src, y, d)
}

macro_rules! slice_fns {
    ($($(#[$doc:meta])* $name:ident => $kernel:ident($body:path);)*) => {
        $(
            struct $kernel;
            impl Kernel for $kernel {
                #[inline(always)]
                fn eval<S: Simd>(x: S) -> S {
                    $body(x)
                }
            }
            $(#[$doc])*
            ///
            /// Panics if the slices differ in length.
            pub fn $name(src: &[f32], dst: &mut [f32]) {
                run::<$kernel>(isa(), stringify!($name), src, dst)
            }
        )*
    };
}

slice_fns! {
    /// `dst[i] = exp(src[i])`.
    exp => ExpK(exp_v);
    /// `dst[i] = ln(src[i])` (natural logarithm).
    ln => LnK(ln_v);
    /// `dst[i] = tanh(src[i])`.
    tanh => TanhK(tanh_v);
    /// `dst[i] = 1 / (1 + exp(-src[i]))`.
    sigmoid => SigmoidK(sigmoid_v);
    /// `dst[i] = erf(src[i])`.
    erf => ErfK(erf_v);
    /// `dst[i] = x·½(1 + erf(x/√2))` with `x = src[i]` (GELU, exact form).
    gelu_erf => GeluErfK(gelu_erf_v);
    /// `dst[i]` = derivative of [`gelu_erf`] at `src[i]`: `Φ(x) + x·φ(x)`.
    gelu_erf_grad => GeluErfGradK(gelu_erf_grad_v);
    /// `dst[i] = x·½(1 + tanh(√(2/π)(x + 0.044715x³)))` (GELU, tanh approximation).
    gelu_tanh => GeluTanhK(gelu_tanh_v);
    /// `dst[i]` = derivative of [`gelu_tanh`] at `src[i]`.
    gelu_tanh_grad => GeluTanhGradK(gelu_tanh_grad_v);
    /// `dst[i] = x·sigmoid(x)` (SiLU / swish).
    silu => SiluK(silu_v);
    /// `dst[i]` = derivative of [`silu`] at `src[i]`: `s·(1 + x(1 − s))`, `s = sigmoid(x)`.
    silu_grad => SiluGradK(silu_grad_v);
    /// `dst[i] = ln(1 + exp(x))`, and `x` itself above 20 (PyTorch's softplus, beta = 1).
    softplus => SoftplusK(softplus_v);
}

// ---------------------------------------------------------------------------- the vector trait

/// The operations the kernels are written in. Comparison and min/max follow x86 semantics so
/// every path agrees on NaN: `a.min(b)` is `if a < b { a } else { b }` (so `c.min(x)` keeps a
/// NaN `x`), likewise `max`.
trait Simd: Copy {
    type Mask: Copy;
    const LANES: usize;
    /// Loads `LANES` floats from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores `LANES` floats to `p`.
    unsafe fn store(self, p: *mut f32);
    fn splat(x: f32) -> Self;
    fn add(self, b: Self) -> Self;
    fn sub(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    fn div(self, b: Self) -> Self;
    /// `self * b + c` (fused on the SIMD paths).
    fn fma(self, b: Self, c: Self) -> Self;
    fn min(self, b: Self) -> Self;
    fn max(self, b: Self) -> Self;
    fn abs(self) -> Self;
    fn neg(self) -> Self;
    /// The magnitude of `self` with the sign of `sign`.
    fn copysign(self, sign: Self) -> Self;
    fn lt(self, b: Self) -> Self::Mask;
    fn gt(self, b: Self) -> Self::Mask;
    fn ge(self, b: Self) -> Self::Mask;
    fn eq(self, b: Self) -> Self::Mask;
    fn is_nan(self) -> Self::Mask;
    fn mask_or(a: Self::Mask, b: Self::Mask) -> Self::Mask;
    /// `m ? a : b` per lane.
    fn select(m: Self::Mask, a: Self, b: Self) -> Self;
    /// `self · 2^n` for integral `n` in [-150, 130], exact unless the result is subnormal or
    /// overflows (one rounding).
    fn ldexp(self, n: Self) -> Self;
    /// For positive normal `self`: `(m, e)` with `self = m · 2^e`, `m` in [0.5, 1).
    fn frexp(self) -> (Self, Self);
    /// `self * self - s` exactly, for `s = self * self` rounded.
    fn sq_err(self, s: Self) -> Self;
    /// `self − j·π/2` for integral `j` with |j| < 2^16, with a relative error of a few ulp
    /// even when the result is tiny (extra-precise Cody–Waite reduction).
    fn reduce_pio2(self, j: Self) -> Self;
}

impl Simd for f32 {
    type Mask = bool;
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        *p
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *p = self
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        self - b
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        self * b
    }
    #[inline(always)]
    fn div(self, b: Self) -> Self {
        self / b
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        // Unfused: a libm `fmaf` call on CPUs without FMA would cost more than it gains.
        self * b + c
    }
    #[inline(always)]
    fn min(self, b: Self) -> Self {
        if self < b {
            self
        } else {
            b
        }
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        if self > b {
            self
        } else {
            b
        }
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::from_bits(self.to_bits() & 0x7fff_ffff)
    }
    #[inline(always)]
    fn neg(self) -> Self {
        -self
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        f32::from_bits((self.to_bits() & 0x7fff_ffff) | (sign.to_bits() & 0x8000_0000))
    }
    #[inline(always)]
    fn lt(self, b: Self) -> bool {
        self < b
    }
    #[inline(always)]
    fn gt(self, b: Self) -> bool {
        self > b
    }
    #[inline(always)]
    fn ge(self, b: Self) -> bool {
        self >= b
    }
    #[inline(always)]
    fn eq(self, b: Self) -> bool {
        self == b
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn mask_or(a: bool, b: bool) -> bool {
        a | b
    }
    #[inline(always)]
    fn select(m: bool, a: Self, b: Self) -> Self {
        if m {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn ldexp(self, n: Self) -> Self {
        let n = n as i32; // NaN -> 0: the value is NaN anyway
        let n1 = n >> 1;
        let n2 = n - n1;
        let p1 = f32::from_bits(((n1 + 127) as u32) << 23);
        let p2 = f32::from_bits(((n2 + 127) as u32) << 23);
        self * p1 * p2
    }
    #[inline(always)]
    fn frexp(self) -> (Self, Self) {
        let bits = self.to_bits();
        let e = ((bits >> 23) & 0xff) as i32 - 126;
        let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
        (m, e as f32)
    }
    #[inline(always)]
    fn sq_err(self, s: Self) -> Self {
        // Exact in f64: a 24-bit by 24-bit product fits in 53 bits.
        let x = self as f64;
        (x * x - s as f64) as f32
    }
    #[inline(always)]
    fn reduce_pio2(self, j: Self) -> Self {
        // fdlibm's medium-range split in f64: `j·PIO2_1` is exact (33-bit constant).
        const PIO2_1: f64 = 1.570_796_326_734_125_6;
        const PIO2_1T: f64 = 6.077_100_506_506_192e-11;
        let j = j as f64;
        ((self as f64 - j * PIO2_1) - j * PIO2_1T) as f32
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{drive, drive2, Kernel, Kernel2, Simd};
    use std::arch::x86_64::*;

    /// π/2 as a sum of three f32 values, for fused reductions (residual 1e-23).
    const PIO2_F32: [f32; 3] = [1.570_796_4, -4.371_139e-8, -1.715_124_5e-15];

    /// Runs `K` with 8-lane AVX2+FMA vectors.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn drive_avx2<K: Kernel>(src: &[f32], dst: &mut [f32]) {
        drive::<V8, K>(src, dst)
    }

    /// [`super::run_wide`]'s AVX2 + FMA build.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_wide_avx2<K: super::WideKernel>(kernel: &mut K) {
        kernel.run()
    }

    /// [`super::run_wide`]'s AVX-512F build.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_wide_avx512<K: super::WideKernel>(kernel: &mut K) {
        kernel.run()
    }

    /// Runs the two-result `K` with 8-lane AVX2+FMA vectors.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn drive2_avx2<K: Kernel2>(src: &[f32], d0: &mut [f32], d1: &mut [f32]) {
        drive2::<V8, K>(src, d0, d1)
    }

    // The methods below are only ever inlined into `drive_avx2` / `drive_avx512`, which enable
    // the target features their intrinsics need.

    #[derive(Clone, Copy)]
    pub(super) struct V8(__m256);

    impl Simd for V8 {
        type Mask = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            V8(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            V8(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            V8(unsafe { _mm256_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            V8(unsafe { _mm256_sub_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            V8(unsafe { _mm256_mul_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn div(self, b: Self) -> Self {
            V8(unsafe { _mm256_div_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn fma(self, b: Self, c: Self) -> Self {
            V8(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn min(self, b: Self) -> Self {
            V8(unsafe { _mm256_min_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            V8(unsafe { _mm256_max_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn abs(self) -> Self {
            V8(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
        }
        #[inline(always)]
        fn neg(self) -> Self {
            V8(unsafe { _mm256_xor_ps(_mm256_set1_ps(-0.0), self.0) })
        }
        #[inline(always)]
        fn copysign(self, sign: Self) -> Self {
            unsafe {
                let s = _mm256_set1_ps(-0.0);
                V8(_mm256_or_ps(
                    _mm256_andnot_ps(s, self.0),
                    _mm256_and_ps(s, sign.0),
                ))
            }
        }
        #[inline(always)]
        fn lt(self, b: Self) -> __m256 {
            unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn gt(self, b: Self) -> __m256 {
            unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn ge(self, b: Self) -> __m256 {
            unsafe { _mm256_cmp_ps::<_CMP_GE_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn eq(self, b: Self) -> __m256 {
            unsafe { _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn is_nan(self) -> __m256 {
            unsafe { _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0) }
        }
        #[inline(always)]
        fn mask_or(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_or_ps(a, b) }
        }
        #[inline(always)]
        fn select(m: __m256, a: Self, b: Self) -> Self {
            V8(unsafe { _mm256_blendv_ps(b.0, a.0, m) })
        }
        #[inline(always)]
        fn ldexp(self, n: Self) -> Self {
            unsafe {
                let n = _mm256_cvtps_epi32(n.0);
                let n1 = _mm256_srai_epi32::<1>(n);
                let n2 = _mm256_sub_epi32(n, n1);
                let bias = _mm256_set1_epi32(127);
                let p1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
                let p2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
                V8(_mm256_mul_ps(_mm256_mul_ps(self.0, p1), p2))
            }
        }
        #[inline(always)]
        fn frexp(self) -> (Self, Self) {
            unsafe {
                let bits = _mm256_castps_si256(self.0);
                let e = _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(0xff)),
                    _mm256_set1_epi32(126),
                );
                let m = _mm256_or_si256(
                    _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
                    _mm256_set1_epi32(0x3f00_0000),
                );
                (V8(_mm256_castsi256_ps(m)), V8(_mm256_cvtepi32_ps(e)))
            }
        }
        #[inline(always)]
        fn sq_err(self, s: Self) -> Self {
            V8(unsafe { _mm256_fmsub_ps(self.0, self.0, s.0) })
        }
        #[inline(always)]
        fn reduce_pio2(self, j: Self) -> Self {
            unsafe {
                let mut r = self.0;
                for p in PIO2_F32 {
                    r = _mm256_fnmadd_ps(j.0, _mm256_set1_ps(p), r);
                }
                V8(r)
            }
        }
    }

    pub(super) use avx512::{drive2_avx512, drive_avx512};

    /// The AVX-512F path (its intrinsics are stable since Rust 1.89, the workspace's
    /// `rust-version`).
    mod avx512 {
        use super::super::{drive, drive2, Kernel, Kernel2, Simd};
        use std::arch::x86_64::*;

        /// Runs `K` with 16-lane AVX-512F vectors.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(in crate::vmath) unsafe fn drive_avx512<K: Kernel>(src: &[f32], dst: &mut [f32]) {
            drive::<V16, K>(src, dst)
        }

        /// Runs the two-result `K` with 16-lane AVX-512F vectors.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(in crate::vmath) unsafe fn drive2_avx512<K: Kernel2>(
            src: &[f32],
            d0: &mut [f32],
            d1: &mut [f32],
        ) {
            drive2::<V16, K>(src, d0, d1)
        }

        #[derive(Clone, Copy)]
        struct V16(__m512);

        #[inline(always)]
        fn bits(v: __m512) -> __m512i {
            unsafe { _mm512_castps_si512(v) }
        }

        #[inline(always)]
        fn float(v: __m512i) -> __m512 {
            unsafe { _mm512_castsi512_ps(v) }
        }

        impl Simd for V16 {
            type Mask = __mmask16;
            const LANES: usize = 16;
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                V16(_mm512_loadu_ps(p))
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                _mm512_storeu_ps(p, self.0)
            }
            #[inline(always)]
            fn splat(x: f32) -> Self {
                V16(unsafe { _mm512_set1_ps(x) })
            }
            #[inline(always)]
            fn add(self, b: Self) -> Self {
                V16(unsafe { _mm512_add_ps(self.0, b.0) })
            }
            #[inline(always)]
            fn sub(self, b: Self) -> Self {
                V16(unsafe { _mm512_sub_ps(self.0, b.0) })
            }
            #[inline(always)]
            fn mul(self, b: Self) -> Self {
                V16(unsafe { _mm512_mul_ps(self.0, b.0) })
            }
            #[inline(always)]
            fn div(self, b: Self) -> Self {
                V16(unsafe { _mm512_div_ps(self.0, b.0) })
            }
            #[inline(always)]
            fn fma(self, b: Self, c: Self) -> Self {
                V16(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
            }
            #[inline(always)]
            fn min(self, b: Self) -> Self {
                V16(unsafe { _mm512_min_ps(self.0, b.0) })
            }
            #[inline(always)]
            fn max(self, b: Self) -> Self {
                V16(unsafe { _mm512_max_ps(self.0, b.0) })
            }
            #[inline(always)]
            fn abs(self) -> Self {
                V16(float(unsafe {
                    _mm512_and_epi32(bits(self.0), _mm512_set1_epi32(0x7fff_ffff))
                }))
            }
            #[inline(always)]
            fn neg(self) -> Self {
                V16(float(unsafe {
                    _mm512_xor_epi32(bits(self.0), _mm512_set1_epi32(i32::MIN))
                }))
            }
            #[inline(always)]
            fn copysign(self, sign: Self) -> Self {
                V16(float(unsafe {
                    _mm512_or_epi32(
                        _mm512_and_epi32(bits(self.0), _mm512_set1_epi32(0x7fff_ffff)),
                        _mm512_and_epi32(bits(sign.0), _mm512_set1_epi32(i32::MIN)),
                    )
                }))
            }
            #[inline(always)]
            fn lt(self, b: Self) -> __mmask16 {
                unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, b.0) }
            }
            #[inline(always)]
            fn gt(self, b: Self) -> __mmask16 {
                unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, b.0) }
            }
            #[inline(always)]
            fn ge(self, b: Self) -> __mmask16 {
                unsafe { _mm512_cmp_ps_mask::<_CMP_GE_OQ>(self.0, b.0) }
            }
            #[inline(always)]
            fn eq(self, b: Self) -> __mmask16 {
                unsafe { _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self.0, b.0) }
            }
            #[inline(always)]
            fn is_nan(self) -> __mmask16 {
                unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0) }
            }
            #[inline(always)]
            fn mask_or(a: __mmask16, b: __mmask16) -> __mmask16 {
                a | b
            }
            #[inline(always)]
            fn select(m: __mmask16, a: Self, b: Self) -> Self {
                // Lanes whose mask bit is set take the second operand.
                V16(unsafe { _mm512_mask_blend_ps(m, b.0, a.0) })
            }
            #[inline(always)]
            fn ldexp(self, n: Self) -> Self {
                unsafe {
                    let n = _mm512_cvtps_epi32(n.0);
                    let n1 = _mm512_srai_epi32::<1>(n);
                    let n2 = _mm512_sub_epi32(n, n1);
                    let bias = _mm512_set1_epi32(127);
                    let p1 = float(_mm512_slli_epi32::<23>(_mm512_add_epi32(n1, bias)));
                    let p2 = float(_mm512_slli_epi32::<23>(_mm512_add_epi32(n2, bias)));
                    V16(_mm512_mul_ps(_mm512_mul_ps(self.0, p1), p2))
                }
            }
            #[inline(always)]
            fn frexp(self) -> (Self, Self) {
                unsafe {
                    let b = bits(self.0);
                    let e = _mm512_sub_epi32(
                        _mm512_and_epi32(_mm512_srli_epi32::<23>(b), _mm512_set1_epi32(0xff)),
                        _mm512_set1_epi32(126),
                    );
                    let m = _mm512_or_epi32(
                        _mm512_and_epi32(b, _mm512_set1_epi32(0x007f_ffff)),
                        _mm512_set1_epi32(0x3f00_0000),
                    );
                    (V16(float(m)), V16(_mm512_cvtepi32_ps(e)))
                }
            }
            #[inline(always)]
            fn sq_err(self, s: Self) -> Self {
                V16(unsafe { _mm512_fmsub_ps(self.0, self.0, s.0) })
            }
            #[inline(always)]
            fn reduce_pio2(self, j: Self) -> Self {
                unsafe {
                    let mut r = self.0;
                    for p in super::PIO2_F32 {
                        r = _mm512_fnmadd_ps(j.0, _mm512_set1_ps(p), r);
                    }
                    V16(r)
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------- the kernels

/// Horner evaluation of `c[0]·x^(N-1) + ... + c[N-1]` (highest degree first).
#[inline(always)]
fn poly<S: Simd, const N: usize>(x: S, c: &[f32; N]) -> S {
    let mut acc = S::splat(c[0]);
    for &k in &c[1..] {
        acc = acc.fma(x, S::splat(k));
    }
    acc
}

#[inline(always)]
fn one<S: Simd>() -> S {
    S::splat(1.0)
}

/// Cephes `expf` minimax polynomial: `exp(r) ≈ 1 + r + r²·P(r)` on [-ln2/2, ln2/2].
const EXP_P: [f32; 6] = [
    0.000_198_756_91,
    0.001_398_199_9,
    0.008_333_452,
    0.041_665_796,
    0.166_666_66,
    0.5,
];
/// ln 2 split for Cody–Waite reduction: `LN2_HI` has 9 significant bits, so `n·LN2_HI` is
/// exact for the |n| ≤ 150 that can occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -0.000_212_194_44;
/// 1.5·2^23: adding it rounds to an integer (ties to even).
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this, `exp` underflows to 0 (exp(-103.98) is half the smallest subnormal).
const EXP_LO: f32 = -104.0;
/// Above this, `exp` overflows to inf (ln(f32::MAX) = 88.72).
const EXP_HI: f32 = 89.0;

/// `exp(x)`: x = n·ln2 + r, exp(x) = 2^n · exp(r); NaN in, NaN out.
#[inline(always)]
fn exp_v<S: Simd>(x: S) -> S {
    let a = S::splat(EXP_LO).max(S::splat(EXP_HI).min(x));
    let n = a
        .fma(S::splat(std::f32::consts::LOG2_E), S::splat(ROUND_MAGIC))
        .sub(S::splat(ROUND_MAGIC));
    let r = n.fma(S::splat(-LN2_HI), a);
    let r = n.fma(S::splat(-LN2_LO), r);
    let p = poly(r, &EXP_P);
    let y = p.fma(r.mul(r), r).add(one());
    y.ldexp(n)
}

/// Cephes `logf` polynomial: `ln(1 + f) ≈ f − f²/2 + f³·P(f)` for `1 + f` in [√½, √2).
const LOG_P: [f32; 9] = [
    0.070_376_836,
    -0.115_146_1,
    0.116_769_984,
    -0.124_201_41,
    0.142_493_23,
    -0.166_680_57,
    0.200_007_14,
    -0.249_999_94,
    0.333_333_3,
];

/// `ln(x)`: x = m·2^e with m in [√½, √2); subnormals are scaled up first.
#[inline(always)]
fn ln_v<S: Simd>(x: S) -> S {
    let tiny = x.lt(S::splat(f32::MIN_POSITIVE));
    let xs = S::select(tiny, x.mul(S::splat(8_388_608.0)), x); // 2^23
    let (m, e) = xs.frexp();
    let e = e.sub(S::select(tiny, S::splat(23.0), S::splat(0.0)));
    let low = m.lt(S::splat(std::f32::consts::FRAC_1_SQRT_2));
    let e = e.sub(S::select(low, one(), S::splat(0.0)));
    let f = S::select(low, m.add(m), m).sub(one());
    let z = f.mul(f);
    let y = poly(f, &LOG_P).mul(f).mul(z);
    let y = e.fma(S::splat(LN2_LO), y);
    let y = z.fma(S::splat(-0.5), y);
    let r = f.add(y);
    let r = e.fma(S::splat(LN2_HI), r);
    // Specials: +inf -> +inf, ±0 -> -inf, negative or NaN -> NaN.
    let r = S::select(x.eq(S::splat(f32::INFINITY)), x, r);
    let r = S::select(x.eq(S::splat(0.0)), S::splat(f32::NEG_INFINITY), r);
    S::select(
        S::mask_or(x.lt(S::splat(0.0)), x.is_nan()),
        S::splat(f32::NAN),
        r,
    )
}

/// Cephes `tanhf` polynomial for |x| < 0.625: `tanh(x) ≈ x + x³·P(x²)`.
const TANH_P: [f32; 5] = [
    -0.005_704_988_7,
    0.020_639_088,
    -0.053_739_715,
    0.133_314_42,
    -0.333_332_8,
];

/// `tanh(x)`: the odd polynomial near 0, `1 − 2/(exp(2|x|) + 1)` beyond, with the sign of x.
#[inline(always)]
fn tanh_v<S: Simd>(x: S) -> S {
    let a = x.abs();
    let z = a.mul(a);
    let small = poly(z, &TANH_P).mul(z).fma(a, a);
    // tanh(9) rounds to 1 in f32; clamping keeps exp finite (and NaN stays NaN).
    let ac = S::splat(9.0).min(a);
    let e = exp_v(ac.add(ac));
    let large = one::<S>().sub(S::splat(2.0).div(e.add(one())));
    S::select(a.lt(S::splat(0.625)), small, large).copysign(x)
}

/// `(sigmoid(x), 1 − sigmoid(x))`, each with full relative accuracy.
#[inline(always)]
fn sigmoid_pair<S: Simd>(x: S) -> (S, S) {
    let e = exp_v(x.abs().neg());
    let r = one::<S>().div(one::<S>().add(e));
    let er = e.mul(r);
    let pos = x.ge(S::splat(0.0));
    (S::select(pos, r, er), S::select(pos, er, r))
}

#[inline(always)]
fn sigmoid_v<S: Simd>(x: S) -> S {
    sigmoid_pair(x).0
}

/// Minimax polynomial (relative error 1.4e-9) for `erf(x)/x ≈ P(x²)` on |x| ≤ 0.75. (The
/// constant term is a fitted coefficient one ulp below 2/√π, not the constant itself.)
#[allow(clippy::approx_constant)]
const ERF_P: [f32; 6] = [
    -0.000_674_952_5,
    0.005_114_347,
    -0.026_834_626,
    0.112_833_77,
    -0.376_126_2,
    1.128_379_1,
];
/// `ERF_P` rescaled for `erf(x/√2)/x ≈ P(x²)` (the GELU argument).
const GELU_P: [f32; 6] = [
    -1.491_448_4e-5,
    0.000_226_024_36,
    -0.002_371_868_1,
    0.019_946_38,
    -0.132_980_69,
    0.797_884_6,
];
/// Minimax polynomial (relative error 1.4e-9) for `erfc(a)·exp(a²) ≈ Q(t)`, `t = 1/(1 + a/2)`,
/// on 0.75 ≤ a ≤ 10.7.
const ERFC_Q: [f32; 10] = [
    -0.069_383_83,
    0.332_042_3,
    -0.579_252_6,
    0.376_693_8,
    -0.090_809_63,
    0.228_913_46,
    0.236_399_08,
    0.283_405_6,
    0.282_000_36,
    2.966_723e-6,
];
const ERF_SPLIT: f32 = 0.75;
/// `ERF_SPLIT·√2`: where the GELU argument x/√2 crosses `ERF_SPLIT`.
const GELU_SPLIT: f32 = 1.060_660_1;

/// `erf(x)`: `x·P(x²)` for |x| < 0.75, `1 − exp(−x²)·Q(t)` beyond (with the sign of x).
#[inline(always)]
fn erf_v<S: Simd>(x: S) -> S {
    let a = x.abs();
    let small = a.mul(poly(a.mul(a), &ERF_P));
    // erf(4) rounds to 1 in f32.
    let ac = S::splat(4.0).min(a);
    let t = one::<S>().div(ac.fma(S::splat(0.5), one()));
    let e = exp_v(ac.mul(ac).neg()).mul(poly(t, &ERFC_Q));
    let large = one::<S>().sub(e);
    S::select(a.lt(S::splat(ERF_SPLIT)), small, large).copysign(x)
}

/// `(2·Φ(x), exp(−x²/2))` for the GELU family, where `Φ` is the standard normal CDF; both with
/// full relative accuracy (2Φ(x) = erfc(−x/√2) is formed directly for negative x, and x² is
/// carried exactly into the exponent).
#[inline(always)]
fn normal_cdf2<S: Simd>(x: S) -> (S, S) {
    let a = x.abs();
    let small = x.mul(poly(x.mul(x), &GELU_P)).add(one());
    // exp(−15²/2) underflows; the clamp keeps lanes of ±inf finite (NaN stays NaN).
    let ac = S::splat(15.0).min(a);
    let t = one::<S>().div(ac.fma(S::splat(0.353_553_38), one())); // 1/(1 + a/(2√2))
    let s = ac.mul(ac);
    let lo = ac.sq_err(s);
    let g = exp_v(s.mul(S::splat(-0.5)));
    let g = g.fma(lo.mul(S::splat(-0.5)), g); // exp(−(s + lo)/2)
    let erfc = g.mul(poly(t, &ERFC_Q));
    let large = S::select(x.lt(S::splat(0.0)), erfc, S::splat(2.0).sub(erfc));
    (S::select(a.lt(S::splat(GELU_SPLIT)), small, large), g)
}

#[inline(always)]
fn gelu_erf_v<S: Simd>(x: S) -> S {
    gelu_erf_from(x, normal_cdf2(x).0)
}

/// `x·Φ(x)` from [`normal_cdf2`]'s `2Φ(x)`.
#[inline(always)]
fn gelu_erf_from<S: Simd>(x: S, cdf2: S) -> S {
    // Below −30 the CDF is 0: clamping keeps gelu(−inf) = −0 rather than −inf·0.
    let xm = S::splat(-30.0).max(x);
    xm.mul(S::splat(0.5)).mul(cdf2)
}

#[inline(always)]
fn gelu_erf_grad_v<S: Simd>(x: S) -> S {
    let (cdf2, g) = normal_cdf2(x);
    gelu_erf_grad_from(x, cdf2, g)
}

/// `Φ(x) + x·φ(x)`, φ(x) = exp(−x²/2)/√(2π), from [`normal_cdf2`]'s results.
#[inline(always)]
fn gelu_erf_grad_from<S: Simd>(x: S, cdf2: S, g: S) -> S {
    let xc = S::splat(30.0).min(S::splat(-30.0).max(x));
    xc.mul(g)
        .fma(S::splat(0.398_942_3), cdf2.mul(S::splat(0.5)))
}

/// `(gelu_erf_v(x), gelu_erf_grad_v(x))` from one evaluation of the CDF.
#[inline(always)]
fn gelu_erf_with_grad_v<S: Simd>(x: S) -> (S, S) {
    let (cdf2, g) = normal_cdf2(x);
    (gelu_erf_from(x, cdf2), gelu_erf_grad_from(x, cdf2, g))
}

/// √(2/π) and the cubic coefficient of the tanh-approximated GELU.
const GELU_K0: f32 = 0.797_884_6;
const GELU_K1: f32 = 0.044_715;

/// `(sigmoid(2u), 1 − sigmoid(2u))` with `u = √(2/π)(x + 0.044715x³)`; `½(1 + tanh u) = sigmoid(2u)`.
#[inline(always)]
fn gelu_tanh_sig<S: Simd>(x: S) -> (S, S) {
    let x2 = x.mul(x);
    let inner = x2.mul(S::splat(GELU_K1)).fma(x, x);
    sigmoid_pair(inner.mul(S::splat(2.0 * GELU_K0)))
}

#[inline(always)]
fn gelu_tanh_v<S: Simd>(x: S) -> S {
    let xc = S::splat(30.0).min(S::splat(-30.0).max(x));
    let (s, _) = gelu_tanh_sig(xc);
    S::splat(-30.0).max(x).mul(s)
}

#[inline(always)]
fn gelu_tanh_grad_v<S: Simd>(x: S) -> S {
    // Beyond ±30 the derivative is exactly 1 or 0 in f32.
    let xc = S::splat(30.0).min(S::splat(-30.0).max(x));
    let (s, c) = gelu_tanh_sig(xc);
    // s + x·σ'(2u)·2√(2/π)(1 + 3·0.044715x²), σ' = s(1 − s)
    let du = xc
        .mul(xc)
        .fma(S::splat(3.0 * GELU_K1), one())
        .mul(S::splat(2.0 * GELU_K0));
    xc.mul(du).mul(s.mul(c)).add(s)
}

#[inline(always)]
fn silu_v<S: Simd>(x: S) -> S {
    let (s, _) = sigmoid_pair(x);
    // sigmoid(x) is 0 below −200: the clamp makes silu(−inf) = −0 rather than −inf·0.
    S::splat(-200.0).max(x).mul(s)
}

#[inline(always)]
fn silu_grad_v<S: Simd>(x: S) -> S {
    let (s, c) = sigmoid_pair(x);
    let xc = S::splat(200.0).min(S::splat(-200.0).max(x));
    s.mul(xc.fma(c, one()))
}

#[inline(always)]
fn softplus_v<S: Simd>(x: S) -> S {
    // max(x, 0) + log1p(exp(−|x|)), with log1p(e) = ln(u)·e/(u − 1), u = 1 + e (exact: e
    // when u rounds to 1).
    let e = exp_v(x.abs().neg());
    let u = one::<S>().add(e);
    let d = u.sub(one());
    let l = ln_v(u).mul(e.div(d));
    let l = S::select(d.eq(S::splat(0.0)), e, l);
    let r = S::splat(0.0).max(x).add(l);
    S::select(x.gt(S::splat(20.0)), x, r)
}

/// Cephes `sinf` / `cosf` polynomials on [-π/4, π/4]: `sin r ≈ r + r³·S(r²)`,
/// `cos r ≈ 1 − r²/2 + r⁴·C(r²)`.
const SIN_P: [f32; 3] = [-0.000_195_152_96, 0.008_332_161, -0.166_666_55];
const COS_P: [f32; 3] = [2.443_315_7e-5, -0.001_388_731_6, 0.041_666_646];

/// Largest |x| the vector sin/cos reduce themselves; beyond it (and for ±inf) the slice
/// functions recompute those elements with f64 std math.
const TRIG_LIMIT: f32 = 65_536.0;

/// `(sin r, cos r, q)` with `x = j·π/2 + r`, |r| ≤ π/4, `q = j mod 4` (as 0..=3).
#[inline(always)]
fn sincos_parts<S: Simd>(x: S) -> (S, S, S) {
    let j = x
        .fma(S::splat(std::f32::consts::FRAC_2_PI), S::splat(ROUND_MAGIC))
        .sub(S::splat(ROUND_MAGIC));
    let r = x.reduce_pio2(j);
    // floor(j/4) = round(j/4 − 3/8) exactly, as j/4 has a fraction in {0, ¼, ½, ¾}.
    let fl = j
        .fma(S::splat(0.25), S::splat(-0.375))
        .add(S::splat(ROUND_MAGIC))
        .sub(S::splat(ROUND_MAGIC));
    let q = fl.fma(S::splat(-4.0), j);
    let z = r.mul(r);
    let sin = poly(z, &SIN_P).mul(z).fma(r, r);
    let cos = poly(z, &COS_P)
        .mul(z.mul(z))
        .add(z.fma(S::splat(-0.5), one()));
    (sin, cos, q)
}

#[inline(always)]
fn sin_v<S: Simd>(x: S) -> S {
    let (sin, cos, q) = sincos_parts(x);
    let odd = S::mask_or(q.eq(one()), q.eq(S::splat(3.0)));
    let v = S::select(odd, cos, sin);
    S::select(q.ge(S::splat(2.0)), v.neg(), v)
}

#[inline(always)]
fn cos_v<S: Simd>(x: S) -> S {
    // cos x = sin(x + π/2): quadrant q + 1.
    let (sin, cos, q) = sincos_parts(x);
    let even = S::mask_or(q.eq(S::splat(0.0)), q.eq(S::splat(2.0)));
    let v = S::select(even, cos, sin);
    let neg = S::mask_or(q.eq(one()), q.eq(S::splat(2.0)));
    S::select(neg, v.neg(), v)
}

struct SinK;
impl Kernel for SinK {
    #[inline(always)]
    fn eval<S: Simd>(x: S) -> S {
        sin_v(x)
    }
}

struct CosK;
impl Kernel for CosK {
    #[inline(always)]
    fn eval<S: Simd>(x: S) -> S {
        cos_v(x)
    }
}

/// Runs a trig kernel block by block, then recomputes the rare elements beyond
/// [`TRIG_LIMIT`] (where f32 arguments are integers spaced ≥ 1/128 apart) with `big`.
fn run_trig<K: Kernel>(isa: Isa, name: &str, src: &[f32], dst: &mut [f32], big: fn(f64) -> f64) {
    assert_eq!(
        src.len(),
        dst.len(),
        "vmath::{name}: src has {} elements, dst has {}",
        src.len(),
        dst.len()
    );
    const BLOCK: usize = 4096;
    let limit = TRIG_LIMIT.to_bits();
    for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        run::<K>(isa, name, s, d);
        // An integer max (vectorises) over |bits|: NaN and inf also exceed the limit.
        let widest = s
            .iter()
            .map(|x| x.to_bits() & 0x7fff_ffff)
            .max()
            .unwrap_or(0);
        if widest > limit {
            for (x, y) in s.iter().zip(d.iter_mut()) {
                if x.to_bits() & 0x7fff_ffff > limit {
                    *y = big(*x as f64) as f32;
                }
            }
        }
    }
}

/// `dst[i] = sin(src[i])`.
///
/// Panics if the slices differ in length.
pub fn sin(src: &[f32], dst: &mut [f32]) {
    run_trig::<SinK>(isa(), "sin", src, dst, f64::sin)
}

/// `dst[i] = cos(src[i])`.
///
/// Panics if the slices differ in length.
pub fn cos(src: &[f32], dst: &mut [f32]) {
    run_trig::<CosK>(isa(), "cos", src, dst, f64::cos)
}

// ---------------------------------------------------------------------------- f64 scalar helpers

/// `erf(x)` in f64 (FreeBSD `s_erf.c` via the `libm` crate; see [`erfc_f64`]): the test
/// reference for the f32 kernels.
#[cfg(test)]
pub(crate) fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let y = if a.is_nan() {
        return x;
    } else if a < 0.84375 {
        if a < 3.725_290_298_461_914e-9 {
            // |x| < 2^-28
            return x + x * ERF_EFX;
        }
        a + a * erf_small_ratio(a)
    } else if a < 6.0 {
        1.0 - erfc_large(a)
    } else {
        1.0
    };
    y.copysign(x)
}

/// `erfc(x) = 1 − erf(x)` in f64, accurate in relative terms for large positive x.
///
/// Ported from FreeBSD's `s_erf.c` (via the MIT-licensed `libm` crate):
/// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved. Developed at SunPro, a
/// Sun Microsystems, Inc. business. Permission to use, copy, modify, and distribute this
/// software is freely granted, provided that this notice is preserved.
pub(crate) fn erfc_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a < 0.84375 {
        let y = erf_small_ratio(a);
        return if x < 0.25 {
            1.0 - (x + x * y)
        } else {
            0.5 - (x - 0.5 + x * y)
        };
    }
    if a < 28.0 {
        let r = erfc_large(a);
        return if x < 0.0 { 2.0 - r } else { r };
    }
    if x < 0.0 {
        2.0
    } else {
        0.0
    }
}

#[cfg(test)]
const ERF_EFX: f64 = 1.283_791_670_955_126e-1;

/// `(erf(a) − a)/a` for 0 ≤ a < 0.84375.
fn erf_small_ratio(a: f64) -> f64 {
    const PP: [f64; 5] = [
        1.283_791_670_955_125_6e-1,
        -3.250_421_072_470_015e-1,
        -2.848_174_957_559_851e-2,
        -5.770_270_296_489_442e-3,
        -2.376_301_665_665_016_3e-5,
    ];
    const QQ: [f64; 5] = [
        3.979_172_239_591_553_5e-1,
        6.502_224_998_876_73e-2,
        5.081_306_281_875_766e-3,
        1.324_947_380_043_216_4e-4,
        -3.960_228_278_775_368e-6,
    ];
    let z = a * a;
    let r = PP[0] + z * (PP[1] + z * (PP[2] + z * (PP[3] + z * PP[4])));
    let s = 1.0 + z * (QQ[0] + z * (QQ[1] + z * (QQ[2] + z * (QQ[3] + z * QQ[4]))));
    r / s
}

/// `erfc(a)` for 0.84375 ≤ a < 28.
fn erfc_large(a: f64) -> f64 {
    const ERX: f64 = 8.450_629_115_104_675e-1;
    if a < 1.25 {
        const PA: [f64; 7] = [
            -2.362_118_560_752_659_4e-3,
            4.148_561_186_837_483_3e-1,
            -3.722_078_760_357_013e-1,
            3.183_466_199_011_617_5e-1,
            -1.108_946_942_823_966_8e-1,
            3.547_830_432_561_823_6e-2,
            -2.166_375_594_868_791e-3,
        ];
        const QA: [f64; 6] = [
            1.064_208_804_008_442_3e-1,
            5.403_979_177_021_71e-1,
            7.182_865_441_419_627e-2,
            1.261_712_198_087_616_4e-1,
            1.363_708_391_202_905e-2,
            1.198_449_984_679_910_8e-2,
        ];
        let s = a - 1.0;
        let p =
            PA[0] + s * (PA[1] + s * (PA[2] + s * (PA[3] + s * (PA[4] + s * (PA[5] + s * PA[6])))));
        let q =
            1.0 + s * (QA[0] + s * (QA[1] + s * (QA[2] + s * (QA[3] + s * (QA[4] + s * QA[5])))));
        return 1.0 - ERX - p / q;
    }
    let s = 1.0 / (a * a);
    let (r, big_s) = if a < 1.0 / 0.35 {
        const RA: [f64; 8] = [
            -9.864_944_034_847_148e-3,
            -6.938_585_727_071_818e-1,
            -1.055_862_622_532_329_1e1,
            -6.237_533_245_032_600_6e1,
            -1.623_966_694_625_734_7e2,
            -1.846_050_929_067_110_4e2,
            -8.128_743_550_630_66e1,
            -9.814_329_344_169_145,
        ];
        const SA: [f64; 8] = [
            1.965_127_166_743_925_7e1,
            1.376_577_541_435_190_4e2,
            4.345_658_774_752_292_3e2,
            6.453_872_717_332_679e2,
            4.290_081_400_275_678_3e2,
            1.086_350_055_417_794_4e2,
            6.570_249_770_319_282,
            -6.042_441_521_485_81e-2,
        ];
        let r = RA[0]
            + s * (RA[1]
                + s * (RA[2] + s * (RA[3] + s * (RA[4] + s * (RA[5] + s * (RA[6] + s * RA[7]))))));
        let big_s = 1.0
            + s * (SA[0]
                + s * (SA[1]
                    + s * (SA[2]
                        + s * (SA[3] + s * (SA[4] + s * (SA[5] + s * (SA[6] + s * SA[7])))))));
        (r, big_s)
    } else {
        const RB: [f64; 7] = [
            -9.864_942_924_700_1e-3,
            -7.992_832_376_805_23e-1,
            -1.775_795_491_775_475_2e1,
            -1.606_363_848_558_219_2e2,
            -6.375_664_433_683_896e2,
            -1.025_095_131_611_077_2e3,
            -4.835_191_916_086_514e2,
        ];
        const SB: [f64; 7] = [
            3.033_806_074_348_246e1,
            3.257_925_129_965_739e2,
            1.536_729_586_084_437e3,
            3.199_858_219_508_595_5e3,
            2.553_050_406_433_164_4e3,
            4.745_285_412_069_553_7e2,
            -2.244_095_244_658_582e1,
        ];
        let r =
            RB[0] + s * (RB[1] + s * (RB[2] + s * (RB[3] + s * (RB[4] + s * (RB[5] + s * RB[6])))));
        let big_s = 1.0
            + s * (SB[0]
                + s * (SB[1] + s * (SB[2] + s * (SB[3] + s * (SB[4] + s * (SB[5] + s * SB[6]))))));
        (r, big_s)
    };
    // exp(−a² − 0.5625 + r/S) with a² split so the large exponent is exact.
    let z = f64::from_bits(a.to_bits() & 0xffff_ffff_0000_0000);
    (-z * z - 0.5625).exp() * ((z - a) * (z + a) + r / big_s).exp() / a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::{FRAC_1_SQRT_2, PI};

    type PathFn = fn(Isa, &[f32], &mut [f32]);

    /// One slice function with its f64 reference and tolerance: an element passes when
    /// `|got − ref| <= max(rel·|ref|, abs)`.
    struct Case {
        name: &'static str,
        run: PathFn,
        reference: fn(f64) -> f64,
        rel: f64,
        abs: f64,
    }

    /// Three subnormal steps: the floor for functions whose results underflow gradually.
    const SUB: f64 = 3.0 * 1.401_298_464_324_817e-45;

    fn sigmoid64(x: f64) -> f64 {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    }

    /// Standard normal CDF, accurate in the lower tail.
    fn phi_cdf(x: f64) -> f64 {
        0.5 * erfc_f64(-x * FRAC_1_SQRT_2)
    }

    fn gelu_u2(x: f64) -> f64 {
        2.0 * (2.0 / PI).sqrt() * (x + 0.044715 * x * x * x)
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "exp",
                run: |i, s, d| run::<ExpK>(i, "exp", s, d),
                reference: f64::exp,
                rel: 5e-7,
                abs: SUB,
            },
            Case {
                name: "ln",
                run: |i, s, d| run::<LnK>(i, "ln", s, d),
                reference: f64::ln,
                rel: 5e-7,
                abs: SUB,
            },
            Case {
                name: "tanh",
                run: |i, s, d| run::<TanhK>(i, "tanh", s, d),
                reference: f64::tanh,
                rel: 5e-7,
                abs: SUB,
            },
            Case {
                name: "sigmoid",
                run: |i, s, d| run::<SigmoidK>(i, "sigmoid", s, d),
                reference: sigmoid64,
                rel: 5e-7,
                abs: SUB,
            },
            Case {
                name: "erf",
                run: |i, s, d| run::<ErfK>(i, "erf", s, d),
                reference: erf_f64,
                rel: 5e-7,
                abs: SUB,
            },
            Case {
                name: "gelu_erf",
                run: |i, s, d| run::<GeluErfK>(i, "gelu_erf", s, d),
                reference: |x| {
                    if x == f64::NEG_INFINITY {
                        0.0
                    } else {
                        x * phi_cdf(x)
                    }
                },
                rel: 5e-7,
                abs: 1.5e-7,
            },
            Case {
                name: "gelu_erf_grad",
                run: |i, s, d| run::<GeluErfGradK>(i, "gelu_erf_grad", s, d),
                reference: |x| {
                    if x.is_infinite() {
                        return if x > 0.0 { 1.0 } else { 0.0 };
                    }
                    phi_cdf(x) + x * (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
                },
                rel: 5e-7,
                abs: 1.5e-7,
            },
            Case {
                name: "gelu_tanh",
                run: |i, s, d| run::<GeluTanhK>(i, "gelu_tanh", s, d),
                reference: |x| {
                    if x == f64::NEG_INFINITY {
                        0.0
                    } else {
                        // ½x(1 + tanh u) = x·sigmoid(2u), without cancellation for x < 0
                        x * sigmoid64(gelu_u2(x))
                    }
                },
                rel: 5e-7,
                abs: 1.5e-7,
            },
            Case {
                name: "gelu_tanh_grad",
                run: |i, s, d| run::<GeluTanhGradK>(i, "gelu_tanh_grad", s, d),
                reference: |x| {
                    if x.is_infinite() {
                        return if x > 0.0 { 1.0 } else { 0.0 };
                    }
                    let u2 = gelu_u2(x);
                    let (s, c) = (sigmoid64(u2), sigmoid64(-u2));
                    let du = 2.0 * (2.0 / PI).sqrt() * (1.0 + 3.0 * 0.044715 * x * x);
                    s + x * s * c * du
                },
                rel: 5e-7,
                abs: 1.5e-7,
            },
            Case {
                name: "silu",
                run: |i, s, d| run::<SiluK>(i, "silu", s, d),
                reference: |x| {
                    if x == f64::NEG_INFINITY {
                        0.0
                    } else {
                        x * sigmoid64(x)
                    }
                },
                rel: 5e-7,
                abs: 1.5e-7,
            },
            Case {
                name: "silu_grad",
                run: |i, s, d| run::<SiluGradK>(i, "silu_grad", s, d),
                reference: |x| {
                    if x.is_infinite() {
                        return if x > 0.0 { 1.0 } else { 0.0 };
                    }
                    let (s, c) = (sigmoid64(x), sigmoid64(-x));
                    s * (1.0 + x * c)
                },
                rel: 5e-7,
                abs: 1.5e-7,
            },
            Case {
                name: "sin",
                run: |i, s, d| run_trig::<SinK>(i, "sin", s, d, f64::sin),
                reference: f64::sin,
                rel: 5e-7,
                abs: SUB,
            },
            Case {
                name: "cos",
                run: |i, s, d| run_trig::<CosK>(i, "cos", s, d, f64::cos),
                reference: f64::cos,
                rel: 5e-7,
                abs: SUB,
            },
            Case {
                name: "softplus",
                run: |i, s, d| run::<SoftplusK>(i, "softplus", s, d),
                reference: |x| {
                    if x.is_nan() || x > 20.0 {
                        x
                    } else {
                        x.max(0.0) + (-x.abs()).exp().ln_1p()
                    }
                },
                rel: 5e-7,
                abs: SUB,
            },
        ]
    }

    /// A dense sweep of the f32 line: every 2039th bit pattern of each sign (all binades,
    /// subnormals included), a fine grid over [-20, 20], the branch and overflow/underflow
    /// boundaries with their neighbours, and the special values.
    fn sweep() -> Vec<f32> {
        let mut v = Vec::new();
        let mut b = 0u32;
        while b < 0x7f80_0000 {
            let x = f32::from_bits(b);
            v.extend([x, -x]);
            b += 2039;
        }
        for i in -20_000..=20_000 {
            v.push(i as f32 * 1e-3);
        }
        let edges = [
            0.625f32,
            0.75,
            1.060_660_1,
            4.0,
            9.0,
            15.0,
            20.0,
            30.0,
            88.722_83,
            88.0,
            89.0,
            87.336_55,
            103.278_93,
            65_536.0,
            std::f32::consts::FRAC_PI_4,
            103.972_08,
            104.0,
            200.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            1.0,
            std::f32::consts::FRAC_1_SQRT_2,
            std::f32::consts::SQRT_2,
        ];
        for e in edges {
            let mut x = e;
            let mut y = e;
            for _ in 0..8 {
                v.extend([x, -x, y, -y]);
                x = f32::from_bits(x.to_bits() + 1);
                y = f32::from_bits(y.to_bits() - 1);
            }
        }
        // The f32 values nearest to k·π/2 (where sin or cos is tiny) up to and past the
        // trig reduction limit, with their neighbours.
        for k in (1..45_000).step_by(7).chain(1..200) {
            let x = (k as f64 * std::f64::consts::FRAC_PI_2) as f32;
            for b in [x.to_bits() - 1, x.to_bits(), x.to_bits() + 1] {
                let x = f32::from_bits(b);
                v.extend([x, -x]);
            }
        }
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(1),
            -f32::from_bits(1),
        ]);
        v
    }

    /// After asserting every element is within tolerance: the max relative error where the
    /// relative bound applies, and the max absolute error where the absolute floor does
    /// (results smaller than `abs / rel`), and the max relative error over all results in the
    /// normal range.
    fn check(case: &Case, isa: Isa, xs: &[f32], got: &[f32]) -> (f64, f64, f64) {
        let (mut max_rel, mut max_abs, mut max_rel_all) = (0f64, 0f64, 0f64);
        for (&x, &g) in xs.iter().zip(got) {
            let want = (case.reference)(x as f64);
            let g = g as f64;
            let what = || {
                format!(
                    "{} [{}] at x = {x:e}: got {g:e}, want {want:e}",
                    case.name,
                    isa.name()
                )
            };
            if want.is_nan() || g.is_nan() {
                assert!(want.is_nan() && g.is_nan(), "{}", what());
                continue;
            }
            let want32 = want as f32;
            if want32.is_infinite() || g.is_infinite() {
                let near_max = want.abs() >= f32::MAX as f64 * (1.0 - case.rel);
                assert!(g == want32 as f64 || near_max, "{}", what());
                continue;
            }
            let err = (g - want).abs();
            assert!(err <= (case.rel * want.abs()).max(case.abs), "{}", what());
            if want.abs() >= f32::MIN_POSITIVE as f64 {
                max_rel_all = max_rel_all.max(err / want.abs());
            }
            if case.rel * want.abs() >= case.abs {
                max_rel = max_rel.max(err / want.abs());
            } else {
                max_abs = max_abs.max(err);
            }
        }
        (max_rel, max_abs, max_rel_all)
    }

    #[test]
    fn every_function_on_every_path_matches_f64_reference() {
        let xs = sweep();
        let mut out = vec![0f32; xs.len()];
        for case in cases() {
            for isa in available_isas() {
                (case.run)(isa, &xs, &mut out);
                let (rel, abs, rel_all) = check(&case, isa, &xs, &out);
                println!(
                    "{:>15} {:>6}: max rel err {rel:.2e}, max abs err {abs:.2e} where |ref| < {:.0e} \
                     (rel err over all normal results: {rel_all:.2e})",
                    case.name,
                    isa.name(),
                    case.abs / case.rel
                );
            }
        }
    }

    #[test]
    fn paths_agree_with_each_other() {
        let xs = sweep();
        let isas = available_isas();
        assert!(isas.contains(&Isa::Scalar));
        for case in cases() {
            let mut base = vec![0f32; xs.len()];
            (case.run)(Isa::Scalar, &xs, &mut base);
            for &isa in &isas[1..] {
                let mut out = vec![0f32; xs.len()];
                (case.run)(isa, &xs, &mut out);
                let mut worst = 0f64;
                for ((&x, &a), &b) in xs.iter().zip(&base).zip(&out) {
                    if a.is_nan() || b.is_nan() {
                        assert!(
                            a.is_nan() && b.is_nan(),
                            "{} at {x:e}: {a:e} vs {b:e}",
                            case.name
                        );
                        continue;
                    }
                    if a == b {
                        continue;
                    }
                    let (a, b) = (a as f64, b as f64);
                    let d = (a - b).abs() / a.abs().max(b.abs()).max(case.abs / case.rel);
                    worst = worst.max(d);
                }
                println!(
                    "{:>15}: {} vs scalar, max rel difference {worst:.2e}",
                    case.name,
                    isa.name()
                );
                assert!(
                    worst <= 1e-6,
                    "{}: {} differs from scalar by {worst:e}",
                    case.name,
                    isa.name()
                );
            }
        }
    }

    /// A wide kernel runs once, in place, with the same result on every path.
    #[test]
    fn wide_kernels_run_once_on_every_path() {
        struct Scale<'a> {
            xs: &'a mut [f32],
            calls: usize,
        }
        impl WideKernel for Scale<'_> {
            #[inline(always)]
            fn run(&mut self) {
                self.calls += 1;
                self.xs.iter_mut().for_each(|x| *x = *x * 3.0 + 1.0);
            }
        }
        let want: Vec<f32> = (0..37).map(|i| i as f32 * 3.0 + 1.0).collect();
        for isa in available_isas() {
            let mut xs: Vec<f32> = (0..37).map(|i| i as f32).collect();
            let mut k = Scale {
                xs: &mut xs,
                calls: 0,
            };
            run_wide_on(isa, &mut k);
            assert_eq!(k.calls, 1, "{}", isa.name());
            assert_eq!(xs, want, "{}", isa.name());
        }
    }

    #[test]
    fn gelu_with_grad_equals_the_two_single_kernels_bit_for_bit() {
        let xs = sweep();
        for isa in available_isas() {
            // Odd lengths leave a padded tail on every path.
            for n in [xs.len(), 1, 17, 33] {
                let src = &xs[..n];
                let (mut y, mut d) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                run2::<GeluErfWithGradK>(isa, "gelu_erf_with_grad", src, &mut y, &mut d);
                let (mut y1, mut d1) = (vec![0f32; n], vec![0f32; n]);
                run::<GeluErfK>(isa, "gelu_erf", src, &mut y1);
                run::<GeluErfGradK>(isa, "gelu_erf_grad", src, &mut d1);
                // NaN in, NaN out: its sign and payload may differ between builds.
                let same =
                    |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                for i in 0..n {
                    assert!(
                        same(y[i], y1[i]) && same(d[i], d1[i]),
                        "{} at {}: ({}, {}) vs ({}, {})",
                        isa.name(),
                        src[i],
                        y[i],
                        d[i],
                        y1[i],
                        d1[i]
                    );
                }
            }
        }
    }

    #[test]
    fn tails_and_short_slices_use_every_element() {
        // Lengths around the vector widths, so the padded tail path runs on each path.
        for isa in available_isas() {
            for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100] {
                let xs: Vec<f32> = (0..n).map(|i| i as f32 * 0.37 - 5.0).collect();
                let mut out = vec![f32::NAN; n];
                run::<ExpK>(isa, "exp", &xs, &mut out);
                for (&x, &y) in xs.iter().zip(&out) {
                    let want = (x as f64).exp();
                    assert!(
                        ((y as f64) - want).abs() <= 1e-6 * want,
                        "{} n={n}",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn public_functions_use_the_chosen_path() {
        let mut xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.01).collect();
        xs.extend([1e6, -3e9, f32::INFINITY]); // the trig fallback
        let mut a = vec![0f32; xs.len()];
        let mut b = vec![0f32; xs.len()];
        type PublicFn = fn(&[f32], &mut [f32]);
        let fns: [(PublicFn, PathFn); 5] = [
            (exp, |i, s, d| run::<ExpK>(i, "exp", s, d)),
            (ln, |i, s, d| run::<LnK>(i, "ln", s, d)),
            (gelu_erf, |i, s, d| run::<GeluErfK>(i, "gelu_erf", s, d)),
            (softplus, |i, s, d| run::<SoftplusK>(i, "softplus", s, d)),
            (sin, |i, s, d| run_trig::<SinK>(i, "sin", s, d, f64::sin)),
        ];
        for (public, path) in fns {
            public(&xs, &mut a);
            path(isa(), &xs, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        assert!(isa().is_available());
    }

    #[test]
    #[should_panic(expected = "vmath::exp: src has 3 elements, dst has 2")]
    fn mismatched_lengths_panic() {
        exp(&[1.0, 2.0, 3.0], &mut [0.0; 2]);
    }

    #[test]
    fn f64_erf_matches_quadrature() {
        // erf(x) = 2/√π ∫₀ˣ exp(−t²) dt by composite Simpson's rule (error ~1e-16 here).
        for &x in &[
            -3.5f64, -1.3, -0.9, -0.3, 0.0, 1e-9, 0.1, 0.5, 0.84, 0.85, 1.0, 1.2, 1.3, 2.0, 2.9,
            4.0, 5.5,
        ] {
            let n = 20_000;
            let h = x / n as f64;
            let f = |t: f64| (-t * t).exp();
            let mut s = f(0.0) + f(x);
            for k in 1..n {
                s += f(k as f64 * h) * if k % 2 == 1 { 4.0 } else { 2.0 };
            }
            let want = s * h / 3.0 * 2.0 / PI.sqrt();
            assert!(
                (erf_f64(x) - want).abs() < 1e-13,
                "erf({x}) = {} vs {want}",
                erf_f64(x)
            );
            assert!((erfc_f64(x) - (1.0 - want)).abs() < 1e-13, "erfc({x})");
        }
        // Far tail: erfc(x) ~ exp(−x²)/(x√π)·(1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶)).
        for &x in &[10.0f64, 15.0, 20.0] {
            let x2 = x * x;
            let series = 1.0 - 0.5 / x2 + 0.75 / (x2 * x2) - 1.875 / (x2 * x2 * x2);
            let want = (-x2).exp() / (x * PI.sqrt()) * series;
            assert!((erfc_f64(x) / want - 1.0).abs() < 1e-6, "erfc({x})");
        }
        assert_eq!(erf_f64(f64::INFINITY), 1.0);
        assert_eq!(erf_f64(f64::NEG_INFINITY), -1.0);
        assert!(erf_f64(f64::NAN).is_nan() && erfc_f64(f64::NAN).is_nan());
        assert_eq!(erfc_f64(f64::NEG_INFINITY), 2.0);
    }

    /// Throughput over 16M floats per function and path; run by hand:
    /// `cargo test -p kiln-core --release vmath::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        let n = 16 << 20;
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i % 20_000) as f32 - 10_000.0) * 1e-3)
            .collect();
        let mut out = vec![0f32; n];
        for case in cases() {
            let mut line = format!("{:>15}:", case.name);
            for isa in available_isas() {
                (case.run)(isa, &xs, &mut out); // warm up, fault pages in
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let t = std::time::Instant::now();
                    (case.run)(isa, &xs, &mut out);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                // The same element count through a 4096-float slice that stays in L1.
                let (small, mut small_out) = (&xs[..4096], vec![0f32; 4096]);
                let t = std::time::Instant::now();
                for _ in 0..n / 4096 {
                    (case.run)(isa, small, &mut small_out);
                }
                let cached = t.elapsed().as_secs_f64();
                line += &format!(
                    "  {} {:.2} ns/elem ({:.1} GB/s; in L1 {:.2} ns/elem)",
                    isa.name(),
                    best * 1e9 / n as f64,
                    8.0 * n as f64 / best / 1e9,
                    cached * 1e9 / n as f64
                );
            }
            println!("{line}");
        }
    }
}
