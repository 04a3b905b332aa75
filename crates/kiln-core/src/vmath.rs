//! Vectorised transcendental functions over f32 slices (exp, ln, tanh, sigmoid, erf, GELU),
//! chosen at run time among AVX-512, AVX2+FMA and a portable scalar path.
//!
//! STUB: scalar placeholders with the final signatures; the vectorised versions replace them.

/// `dst[i] = exp(src[i])`.
pub fn exp(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x.exp();
    }
}

/// `dst[i] = ln(src[i])`.
pub fn ln(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x.ln();
    }
}

/// `dst[i] = tanh(src[i])`.
pub fn tanh(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x.tanh();
    }
}

/// `dst[i] = 1 / (1 + exp(-src[i]))`.
pub fn sigmoid(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 1.0 / (1.0 + (-x).exp());
    }
}
