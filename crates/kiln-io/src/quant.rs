//! ggml tensor types (`GgmlType`: block size and bytes per block of every type GGUF files use)
//! and dequantisation of the common ones to f32, bit-for-bit the math of ggml's reference
//! dequantisers (and of the `gguf` Python package): one f16 → f32 widening per scale, then the
//! same f32 multiplies and adds in the same order, no fused multiply-add.
//!
//! Kernels work on whole blocks through fixed-size arrays (no bounds checks or per-element
//! branches in the inner loops, which the compiler vectorises) and run in parallel over blocks
//! when the output has at least [`PARALLEL_THRESHOLD`] elements.

use kiln_core::parallel::{install, num_threads, PARALLEL_THRESHOLD};

/// Elements per super-block of the k-quants.
pub const QK_K: usize = 256;

macro_rules! ggml_types {
    ($( $(#[$doc:meta])* $name:ident = $id:literal, $block:literal, $bytes:literal, $label:literal; )*) => {
        /// A ggml tensor element type, with the id GGUF files store.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum GgmlType {
            $( $(#[$doc])* $name, )*
        }

        impl GgmlType {
            /// Every known type, in id order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$name),*];

            /// The type with GGUF id `id`, or `None` for an unknown id.
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $( $id => Some(GgmlType::$name), )*
                    _ => None,
                }
            }

            /// The id GGUF files store for this type.
            pub fn id(self) -> u32 {
                match self { $( GgmlType::$name => $id, )* }
            }

            /// Elements per block (1 for plain types).
            pub fn block_size(self) -> usize {
                match self { $( GgmlType::$name => $block, )* }
            }

            /// Bytes per block.
            pub fn type_size(self) -> usize {
                match self { $( GgmlType::$name => $bytes, )* }
            }

            /// The name ggml and gguf-py use (`Q4_K`, `BF16`, ...).
            pub fn name(self) -> &'static str {
                match self { $( GgmlType::$name => $label, )* }
            }
        }
    };
}

ggml_types! {
    /// 32-bit float.
    F32 = 0, 1, 4, "F32";
    /// IEEE half.
    F16 = 1, 1, 2, "F16";
    /// 4-bit, scale per 32.
    Q4_0 = 2, 32, 18, "Q4_0";
    /// 4-bit, scale and min per 32.
    Q4_1 = 3, 32, 20, "Q4_1";
    /// 5-bit, scale per 32.
    Q5_0 = 6, 32, 22, "Q5_0";
    /// 5-bit, scale and min per 32.
    Q5_1 = 7, 32, 24, "Q5_1";
    /// 8-bit, scale per 32.
    Q8_0 = 8, 32, 34, "Q8_0";
    /// 8-bit, scale and sum per 32.
    Q8_1 = 9, 32, 40, "Q8_1";
    /// 2-bit k-quant.
    Q2_K = 10, 256, 84, "Q2_K";
    /// 3-bit k-quant.
    Q3_K = 11, 256, 110, "Q3_K";
    /// 4-bit k-quant.
    Q4_K = 12, 256, 144, "Q4_K";
    /// 5-bit k-quant.
    Q5_K = 13, 256, 176, "Q5_K";
    /// 6-bit k-quant.
    Q6_K = 14, 256, 210, "Q6_K";
    /// 8-bit k-quant (intermediate type).
    Q8_K = 15, 256, 292, "Q8_K";
    /// i-quant 2.06 bpw.
    IQ2_XXS = 16, 256, 66, "IQ2_XXS";
    /// i-quant 2.31 bpw.
    IQ2_XS = 17, 256, 74, "IQ2_XS";
    /// i-quant 3.06 bpw.
    IQ3_XXS = 18, 256, 98, "IQ3_XXS";
    /// i-quant 1.56 bpw.
    IQ1_S = 19, 256, 50, "IQ1_S";
    /// 4-bit non-linear, per 32.
    IQ4_NL = 20, 32, 18, "IQ4_NL";
    /// i-quant 3.44 bpw.
    IQ3_S = 21, 256, 110, "IQ3_S";
    /// i-quant 2.5 bpw.
    IQ2_S = 22, 256, 82, "IQ2_S";
    /// 4-bit non-linear k-quant.
    IQ4_XS = 23, 256, 136, "IQ4_XS";
    /// 8-bit integer.
    I8 = 24, 1, 1, "I8";
    /// 16-bit integer.
    I16 = 25, 1, 2, "I16";
    /// 32-bit integer.
    I32 = 26, 1, 4, "I32";
    /// 64-bit integer.
    I64 = 27, 1, 8, "I64";
    /// 64-bit float.
    F64 = 28, 1, 8, "F64";
    /// i-quant 1.75 bpw.
    IQ1_M = 29, 256, 56, "IQ1_M";
    /// bfloat16.
    BF16 = 30, 1, 2, "BF16";
    /// ternary 1.69 bpw.
    TQ1_0 = 34, 256, 54, "TQ1_0";
    /// ternary 2.06 bpw.
    TQ2_0 = 35, 256, 66, "TQ2_0";
    /// microscaling fp4.
    MXFP4 = 39, 32, 17, "MXFP4";
    /// NVIDIA fp4.
    NVFP4 = 40, 64, 36, "NVFP4";
    /// 1-bit, per 128.
    Q1_0 = 41, 128, 18, "Q1_0";
}

impl GgmlType {
    /// True when [`dequantize`] can convert this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | I8
                | I16
                | I32
                | I64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q4_K
                | Q5_K
                | Q6_K
        )
    }

    /// Bytes holding `n` elements, or `None` when `n` is not a whole number of blocks or the
    /// size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantisation of a type kiln has no kernel for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ggml type {0} cannot be dequantised (supported: F32, F16, BF16, F64, I8-I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")]
pub struct UnsupportedType(pub GgmlType);

/// Dequantises `src` (whole blocks of type `ty`) into `dst`.
///
/// Panics when `dst` is not a whole number of blocks or `src` is not exactly the bytes of
/// `dst.len()` elements; returns [`UnsupportedType`] for a type without a kernel.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), UnsupportedType> {
    let expected = ty.bytes_for(dst.len());
    assert!(
        expected == Some(src.len()),
        "dequantize {ty}: {} bytes given for {} values (block size {}, {} bytes per block)",
        src.len(),
        dst.len(),
        ty.block_size(),
        ty.type_size()
    );
    use GgmlType::*;
    match ty {
        F32 => run_blocks::<1, 4, _>(src, dst, |b, o| o[0] = f32::from_le_bytes(*b)),
        F16 => run_blocks::<1, 2, _>(src, dst, |b, o| o[0] = f16(b[0], b[1])),
        BF16 => run_blocks::<1, 2, _>(src, dst, |b, o| {
            o[0] = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16)
        }),
        F64 => run_blocks::<1, 8, _>(src, dst, |b, o| o[0] = f64::from_le_bytes(*b) as f32),
        I8 => run_blocks::<1, 1, _>(src, dst, |b, o| o[0] = b[0] as i8 as f32),
        I16 => run_blocks::<1, 2, _>(src, dst, |b, o| o[0] = i16::from_le_bytes(*b) as f32),
        I32 => run_blocks::<1, 4, _>(src, dst, |b, o| o[0] = i32::from_le_bytes(*b) as f32),
        I64 => run_blocks::<1, 8, _>(src, dst, |b, o| o[0] = i64::from_le_bytes(*b) as f32),
        Q4_0 => run_blocks::<32, 18, _>(src, dst, block_q4_0),
        Q4_1 => run_blocks::<32, 20, _>(src, dst, block_q4_1),
        Q5_0 => run_blocks::<32, 22, _>(src, dst, block_q5_0),
        Q5_1 => run_blocks::<32, 24, _>(src, dst, block_q5_1),
        Q8_0 => run_blocks::<32, 34, _>(src, dst, block_q8_0),
        Q4_K => run_blocks::<256, 144, _>(src, dst, block_q4_k),
        Q5_K => run_blocks::<256, 176, _>(src, dst, block_q5_k),
        Q6_K => run_blocks::<256, 210, _>(src, dst, block_q6_k),
        other => return Err(UnsupportedType(other)),
    }
    Ok(())
}

/// Runs `f` on every (source block, output block) pair, in parallel over groups of blocks when
/// the output is large. The caller has checked that the lengths are whole, matching blocks.
fn run_blocks<const BS: usize, const BB: usize, F>(src: &[u8], dst: &mut [f32], f: F)
where
    F: Fn(&[u8; BB], &mut [f32; BS]) + Sync,
{
    let n = dst.len();
    let (sb, _) = src.as_chunks::<BB>();
    let (db, _) = dst.as_chunks_mut::<BS>();
    let serial = |s: &[[u8; BB]], d: &mut [[f32; BS]]| {
        for (s, d) in s.iter().zip(d.iter_mut()) {
            f(s, d);
        }
    };
    let threads = num_threads();
    if n < PARALLEL_THRESHOLD || threads == 1 {
        return serial(sb, db);
    }
    use rayon::prelude::*;
    // A few groups per thread for balance.
    let per = db.len().div_ceil(threads * 4).max(1);
    install(|| {
        db.par_chunks_mut(per)
            .zip(sb.par_chunks(per))
            .for_each(|(d, s)| serial(s, d));
    });
}

/// Little-endian f16 bytes to f32 (exact).
#[inline(always)]
fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// The `N` bytes of `b` starting at `at` (constant ranges inside a fixed block: the check
/// folds away).
#[inline(always)]
fn part<const N: usize, const BB: usize>(b: &[u8; BB], at: usize) -> &[u8; N] {
    b[at..at + N]
        .try_into()
        .expect("block field inside its block")
}

#[inline(always)]
fn block_q4_0(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    let qs = part::<16, 18>(b, 2);
    for j in 0..16 {
        o[j] = d * ((qs[j] & 0x0f) as i32 - 8) as f32;
        o[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

#[inline(always)]
fn block_q4_1(b: &[u8; 20], o: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    let m = f16(b[2], b[3]);
    let qs = part::<16, 20>(b, 4);
    for j in 0..16 {
        o[j] = d * (qs[j] & 0x0f) as f32 + m;
        o[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

#[inline(always)]
fn block_q5_0(b: &[u8; 22], o: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    let qh = u32::from_le_bytes(*part::<4, 22>(b, 2));
    let qs = part::<16, 22>(b, 6);
    for j in 0..16 {
        let lo = (qs[j] & 0x0f) as u32 | (((qh >> j) & 1) << 4);
        let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        o[j] = d * (lo as i32 - 16) as f32;
        o[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

#[inline(always)]
fn block_q5_1(b: &[u8; 24], o: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    let m = f16(b[2], b[3]);
    let qh = u32::from_le_bytes(*part::<4, 24>(b, 4));
    let qs = part::<16, 24>(b, 8);
    for j in 0..16 {
        let lo = (qs[j] & 0x0f) as u32 | (((qh >> j) & 1) << 4);
        let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        o[j] = d * lo as f32 + m;
        o[j + 16] = d * hi as f32 + m;
    }
}

#[inline(always)]
fn block_q8_0(b: &[u8; 34], o: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    let qs = part::<32, 34>(b, 2);
    for j in 0..32 {
        o[j] = (qs[j] as i8) as f32 * d;
    }
}

/// The eight 6-bit scales and mins packed in the 12 scale bytes of Q4_K / Q5_K.
#[inline(always)]
fn k_scale_min(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for i in 0..4 {
        sc[i] = s[i] & 0x3f;
        mn[i] = s[4 + i] & 0x3f;
        sc[4 + i] = (s[8 + i] & 0x0f) | ((s[i] >> 2) & 0x30);
        mn[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
    }
    (sc, mn)
}

#[inline(always)]
fn block_q4_k(b: &[u8; 144], o: &mut [f32; 256]) {
    let d = f16(b[0], b[1]);
    let dmin = f16(b[2], b[3]);
    let (sc, mn) = k_scale_min(part::<12, 144>(b, 4));
    let qs = part::<128, 144>(b, 16);
    for (s, out) in o.as_chunks_mut::<32>().0.iter_mut().enumerate() {
        let dl = d * sc[s] as f32;
        let ml = dmin * mn[s] as f32;
        let shift = 4 * (s % 2);
        let q = part::<32, 128>(qs, 32 * (s / 2));
        for l in 0..32 {
            out[l] = dl * ((q[l] >> shift) & 0x0f) as f32 - ml;
        }
    }
}

#[inline(always)]
fn block_q5_k(b: &[u8; 176], o: &mut [f32; 256]) {
    let d = f16(b[0], b[1]);
    let dmin = f16(b[2], b[3]);
    let (sc, mn) = k_scale_min(part::<12, 176>(b, 4));
    let qh = part::<32, 176>(b, 16);
    let qs = part::<128, 176>(b, 48);
    for (s, out) in o.as_chunks_mut::<32>().0.iter_mut().enumerate() {
        let dl = d * sc[s] as f32;
        let ml = dmin * mn[s] as f32;
        let shift = 4 * (s % 2);
        let q = part::<32, 128>(qs, 32 * (s / 2));
        for l in 0..32 {
            let v = ((q[l] >> shift) & 0x0f) | (((qh[l] >> s) & 1) << 4);
            out[l] = dl * v as f32 - ml;
        }
    }
}

#[inline(always)]
fn block_q6_k(b: &[u8; 210], o: &mut [f32; 256]) {
    let ql = part::<128, 210>(b, 0);
    let qh = part::<64, 210>(b, 128);
    let scales = part::<16, 210>(b, 192);
    let d = f16(b[208], b[209]);
    for (h, out) in o.as_chunks_mut::<128>().0.iter_mut().enumerate() {
        let ql = part::<64, 128>(ql, 64 * h);
        let qh = part::<32, 64>(qh, 32 * h);
        for g in 0..4 {
            let lq = part::<32, 64>(ql, 32 * (g % 2));
            let lshift = 4 * (g / 2);
            let hshift = 2 * g;
            for hf in 0..2 {
                let dl = d * (scales[8 * h + 2 * g + hf] as i8) as f32;
                for k in 0..16 {
                    let l = 16 * hf + k;
                    let v = ((lq[l] >> lshift) & 0x0f) | (((qh[l] >> hshift) & 3) << 4);
                    out[32 * g + l] = dl * (v as i32 - 32) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deq(ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        dequantize(ty, src, &mut out).unwrap();
        out
    }

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for &t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(u32::MAX), None);
        // Block layouts from ggml-common.h: the struct fields add up to the sizes.
        assert_eq!(GgmlType::Q4_K.type_size(), 2 + 2 + 12 + QK_K / 2);
        assert_eq!(GgmlType::Q5_K.type_size(), 2 + 2 + 12 + QK_K / 8 + QK_K / 2);
        assert_eq!(
            GgmlType::Q6_K.type_size(),
            QK_K / 2 + QK_K / 4 + QK_K / 16 + 2
        );
        assert_eq!(GgmlType::Q5_0.type_size(), 2 + 4 + 16);
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(GgmlType::F32.bytes_for(usize::MAX), None);
    }

    #[test]
    fn q4_0_and_q4_1_decode_nibbles_low_half_first() {
        // d = 0.5 (f16 0x3800), every byte 0x9f: low nibble 15, high nibble 9.
        let mut b = vec![0x00, 0x38];
        b.extend([0x9f; 16]);
        let v = deq(GgmlType::Q4_0, &b, 32);
        assert!(v[..16].iter().all(|&x| x == 0.5 * 7.0));
        assert!(v[16..].iter().all(|&x| x == 0.5));
        // Q4_1 with min m = -1 (f16 0xbc00).
        let mut b = vec![0x00, 0x38, 0x00, 0xbc];
        b.extend([0x9f; 16]);
        let v = deq(GgmlType::Q4_1, &b, 32);
        assert!(v[..16].iter().all(|&x| x == 0.5 * 15.0 - 1.0));
        assert!(v[16..].iter().all(|&x| x == 0.5 * 9.0 - 1.0));
    }

    #[test]
    fn q5_0_takes_the_fifth_bit_from_qh() {
        // d = 1, qh bit j set only for j = 0 and j = 16; all nibbles zero.
        let mut b = vec![0x00, 0x3c];
        b.extend(((1u32 << 16) | 1).to_le_bytes());
        b.extend([0u8; 16]);
        let v = deq(GgmlType::Q5_0, &b, 32);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[16], 0.0);
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, &x)| i == 0 || i == 16 || x == -16.0));
    }

    #[test]
    fn q8_0_is_signed_bytes_times_scale() {
        let mut b = vec![0x00, 0x40]; // d = 2
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = deq(GgmlType::Q8_0, &b, 32);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, (i as f32 - 16.0) * 2.0);
        }
    }

    #[test]
    fn plain_types_convert_exactly() {
        let b: Vec<u8> = [1.5f32, -2.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(deq(GgmlType::F32, &b, 2), vec![1.5, -2.25]);
        assert_eq!(
            deq(GgmlType::F16, &[0x00, 0x3c, 0x00, 0xc0], 2),
            vec![1.0, -2.0]
        );
        // bf16 is the top half of an f32.
        let hi = |x: f32| ((x.to_bits() >> 16) as u16).to_le_bytes();
        let b: Vec<u8> = hi(3.0).into_iter().chain(hi(-0.5)).collect();
        assert_eq!(deq(GgmlType::BF16, &b, 2), vec![3.0, -0.5]);
        assert_eq!(deq(GgmlType::I8, &[0xff, 0x05], 2), vec![-1.0, 5.0]);
    }

    #[test]
    fn parallel_path_equals_block_by_block() {
        // Enough Q4_K blocks to cross the threshold; compare against one block at a time.
        let blocks = PARALLEL_THRESHOLD / QK_K + 3;
        let mut rng = kiln_core::Rng::new(7);
        let mut src: Vec<u8> = (0..blocks * 144).map(|_| rng.next_u64() as u8).collect();
        for blk in src.chunks_mut(144) {
            blk[..4].copy_from_slice(&[0x00, 0x30, 0x00, 0x2c]); // finite d and dmin
        }
        let all = deq(GgmlType::Q4_K, &src, blocks * QK_K);
        for (i, blk) in src.chunks(144).enumerate() {
            assert_eq!(
                deq(GgmlType::Q4_K, blk, QK_K),
                all[i * QK_K..(i + 1) * QK_K]
            );
        }
    }

    #[test]
    fn unsupported_types_are_errors() {
        let mut out = vec![0.0; 256];
        let err = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut out).unwrap_err();
        assert!(err.to_string().contains("IQ2_XXS cannot be dequantised"));
        assert!(!GgmlType::IQ2_XXS.can_dequantize());
    }

    #[test]
    #[should_panic(expected = "dequantize Q4_0: 17 bytes given for 32 values")]
    fn wrong_source_length_panics() {
        let mut out = vec![0.0; 32];
        let _ = dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out);
    }
}
