//! Fuzz safety: truncated, corrupted and hostile files are errors naming the file, never
//! panics, out-of-bounds reads, overflows or huge allocations.

mod common;

use common::*;
use kiln_io::{GgufFile, SafetensorsFile};
use proptest::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

fn assert_err_names<T: std::fmt::Debug>(r: kiln_io::Result<T>, path: &Path, case: &str) {
    match r {
        Ok(v) => panic!("{case}: expected an error, got {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "{case}: message lacks the path: {msg}"
            );
        }
    }
}

/// Opens `path` and, when that works, touches every tensor and typed getter: nothing may panic.
fn exercise_gguf(path: &Path) -> kiln_io::Result<()> {
    let f = GgufFile::open(path)?;
    for info in f.tensor_infos().to_vec() {
        let (ty, bytes, shape) = f.raw(&info.name)?;
        assert_eq!(Some(bytes.len()), ty.bytes_for(shape.iter().product()));
        let _ = f.tensor_f32(&info.name);
    }
    for (k, _) in f.metadata_entries().to_vec() {
        let _ = (
            f.get_u32(&k),
            f.get_str(&k),
            f.get_str_array(&k),
            f.get_f32(&k),
        );
    }
    Ok(())
}

/// Positions of the GGUF fields that hold counts, lengths, offsets, dims (u64) and type ids
/// (u32), found by walking the file independently of the reader.
struct Fields {
    u64s: Vec<usize>,
    u32s: Vec<usize>,
    header_end: usize,
}

fn walk_gguf(b: &[u8]) -> Fields {
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    let mut f = Fields {
        u64s: vec![8, 16],
        u32s: vec![4],
        header_end: 0,
    };
    let (n_tensors, n_kv) = (u64_at(8), u64_at(16));
    let mut p = 24;
    fn value(b: &[u8], p: &mut usize, ty: u32, f: &mut Fields) {
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => *p += 1,
            2 | 3 => *p += 2,
            4..=6 => *p += 4,
            10..=12 => *p += 8,
            8 => {
                f.u64s.push(*p);
                *p += 8 + u64_at(*p);
            }
            9 => {
                f.u32s.push(*p);
                let et = u32_at(*p);
                f.u64s.push(*p + 4);
                let n = u64_at(*p + 4);
                *p += 12;
                for _ in 0..n {
                    value(b, p, et, f);
                }
            }
            t => panic!("walker: type {t}"),
        }
    }
    for _ in 0..n_kv {
        f.u64s.push(p);
        p += 8 + u64_at(p);
        f.u32s.push(p);
        let ty = u32_at(p);
        p += 4;
        value(b, &mut p, ty, &mut f);
    }
    for _ in 0..n_tensors {
        f.u64s.push(p);
        p += 8 + u64_at(p);
        f.u32s.push(p);
        let nd = u32_at(p) as usize;
        p += 4;
        for _ in 0..nd {
            f.u64s.push(p);
            p += 8;
        }
        f.u32s.push(p);
        p += 4;
        f.u64s.push(p);
        p += 8;
    }
    f.header_end = p;
    f
}

fn scratch(tag: &str, name: &str) -> PathBuf {
    temp_dir(tag).join(name)
}

#[test]
fn gguf_truncated_anywhere_is_an_error() {
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let g = GgufFile::open(fixture("types.gguf")).unwrap();
    let data_end = g.tensor_infos().iter().map(|t| t.span.1).max().unwrap();
    assert_eq!(
        walk_gguf(&bytes).header_end.next_multiple_of(64),
        g.data_offset()
    );
    let p = scratch("gguf-trunc", "t.gguf");
    // Every byte of header, metadata and tensor table, and every 7th of the data.
    let cuts = (0..g.data_offset()).chain((g.data_offset()..data_end).step_by(7));
    for cut in cuts {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_err_names(GgufFile::open(&p), &p, &format!("truncated at {cut}"));
    }
}

#[test]
fn real_gguf_truncated_is_an_error() {
    let src = smollm2();
    let g = GgufFile::open(&src).unwrap();
    let data_end = g.tensor_infos().iter().map(|t| t.span.1).max().unwrap();
    let header = g.data_offset();
    // Every byte of the first 4 KiB, ~600 cuts across the rest of the metadata and tensor
    // table, 40 across the data; cut from the longest down, on one copy of the file.
    let mut cuts: Vec<usize> = (0..4096).collect();
    cuts.extend((4096..header).step_by(header / 600));
    cuts.extend((header..data_end).step_by((data_end - header) / 40));
    cuts.push(header - 1);
    cuts.push(data_end - 1);
    cuts.sort_unstable();
    cuts.dedup();
    let p = scratch("gguf-real-trunc", "smollm2.gguf");
    {
        let mut out = std::fs::File::create(&p).unwrap();
        let mut inp = std::fs::File::open(&src).unwrap();
        std::io::copy(
            &mut std::io::Read::take(&mut inp, *cuts.last().unwrap() as u64),
            &mut out,
        )
        .unwrap();
        out.flush().unwrap();
    }
    let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    for &cut in cuts.iter().rev() {
        file.set_len(cut as u64).unwrap();
        assert_err_names(GgufFile::open(&p), &p, &format!("truncated at {cut}"));
    }
    drop(file);
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn gguf_huge_counts_lengths_offsets_and_type_ids_are_errors() {
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let fields = walk_gguf(&bytes);
    assert!(fields.u64s.len() > 60 && fields.u32s.len() > 40);
    let p = scratch("gguf-huge", "m.gguf");
    for &at in &fields.u64s {
        for v in [u64::MAX, 1 << 40, 1 << 63, bytes.len() as u64 + 1] {
            let mut b = bytes.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            std::fs::write(&p, &b).unwrap();
            assert_err_names(exercise_gguf(&p), &p, &format!("u64 field at {at} = {v}"));
        }
    }
    for &at in &fields.u32s {
        for v in [u32::MAX, 1 << 31, 99] {
            let mut b = bytes.clone();
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            std::fs::write(&p, &b).unwrap();
            assert_err_names(exercise_gguf(&p), &p, &format!("u32 field at {at} = {v}"));
        }
    }
}

#[test]
fn gguf_bad_alignment_and_deep_nesting_are_errors() {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let key = b"general.alignment";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key);
    let mut bad_align = b.clone();
    bad_align.extend(4u32.to_le_bytes());
    bad_align.extend(48u32.to_le_bytes());
    let p = scratch("gguf-align", "a.gguf");
    std::fs::write(&p, &bad_align).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("general.alignment 48 is not a power of two"),
        "{e}"
    );
    let mut wrong_type = b.clone();
    wrong_type.extend(10u32.to_le_bytes());
    wrong_type.extend(32u64.to_le_bytes());
    std::fs::write(&p, &wrong_type).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("'general.alignment' has type u64, expected u32"),
        "{e}"
    );
    // 100 nested arrays of one element each.
    let mut deep = b;
    deep.extend(9u32.to_le_bytes());
    for _ in 0..100 {
        deep.extend(9u32.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    std::fs::write(&p, &deep).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("nested deeper than"), "{e}");
}

/// A small safetensors file: two F32 tensors and an I64 one, the last ending at the file end.
fn small_safetensors() -> (Vec<u8>, usize) {
    let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]},"c":{"dtype":"I64","shape":[1],"data_offsets":[40,48]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend((0..12).flat_map(|i| (i as f32).to_le_bytes()));
    (b, header.len())
}

fn with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data_len));
    b
}

#[test]
fn safetensors_truncated_anywhere_is_an_error() {
    let (bytes, _) = small_safetensors();
    let p = scratch("st-trunc", "t.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(SafetensorsFile::open(&p).unwrap().len(), 3);
    for cut in 0..bytes.len() {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_err_names(
            SafetensorsFile::open(&p),
            &p,
            &format!("truncated at {cut}"),
        );
    }
}

#[test]
fn safetensors_hostile_headers_are_precise_errors() {
    let p = scratch("st-hostile", "h.safetensors");
    let (good, hlen) = small_safetensors();
    for (v, want) in [
        (u64::MAX, "exceeds the 104857600-byte limit".to_string()),
        (1 << 40, "exceeds the 104857600-byte limit".to_string()),
        (
            good.len() as u64,
            format!(
                "header length {} exceeds file size {}",
                good.len(),
                good.len()
            ),
        ),
        (hlen as u64 + 1, "not valid JSON".to_string()),
    ] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&v.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains(&want),
            "{e}\nwanted {want}"
        );
    }
    let f32e = |shape: &str, offs: &str| {
        format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":{offs}}}}}"#)
    };
    let cases: Vec<(String, usize, &str)> = vec![
        (f32e("[2]", "[0,1099511627776]"), 8, "tensor 'x': data span 0..1099511627776 exceeds the data region of 8 bytes"),
        (f32e("[2]", "[0,18446744073709551615]"), 8, "exceeds the data region"),
        (f32e("[2]", "[18446744073709551615,8]"), 8, "ends before it begins"),
        (f32e("[1099511627776,1099511627776]", "[0,8]"), 8, "of F32 overflows"),
        (f32e("[3]", "[0,8]"), 8, "tensor 'x': shape [3] of F32 needs 12 bytes, data span 0..8 holds 8"),
        (f32e("[-1]", "[0,8]"), 8, "shape entry -1 is not a non-negative integer"),
        (f32e("[2]", "[0,8,9]"), 8, "data_offsets is not a [begin, end] pair"),
        (f32e("[2]", "[0.5,8]"), 8, "data offset 0.5 is not a non-negative integer"),
        (r#"{"x":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}"#.into(), 8, "tensor 'x': unknown dtype 'F7'"),
        (r#"{"x":{"shape":[2],"data_offsets":[0,8]}}"#.into(), 8, "tensor 'x': missing 'dtype'"),
        (r#"{"x":[]}"#.into(), 8, "tensor 'x': entry is not an object"),
        (r#"[1,2]"#.into(), 0, "header is not a JSON object"),
        (r#"{"__metadata__":{"a":1}}"#.into(), 0, "__metadata__ value of 'a' is not a string"),
        (
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#.into(),
            12,
            "tensors 'x' (bytes 0..8) and 'y' (bytes 4..12) overlap",
        ),
        ("[".repeat(10_000), 0, "not valid JSON"),
    ];
    for (header, data, want) in cases {
        std::fs::write(&p, with_header(&header, data)).unwrap();
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains(want),
            "{e}\nwanted {want}"
        );
    }
    let mut b = with_header(r#"{"x":1}"#, 0);
    b[9] = 0xff;
    std::fs::write(&p, &b).unwrap();
    let e = SafetensorsFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("header is not UTF-8"), "{e}");
}

fn exercise_safetensors(path: &Path) -> kiln_io::Result<()> {
    let f = SafetensorsFile::open(path)?;
    for n in f.names() {
        let _ = f.tensor(n)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn gguf_random_byte_mutations_never_panic(
        muts in proptest::collection::vec((0usize..1 << 20, any::<u8>()), 1..8),
        header_only in any::<bool>(),
    ) {
        let mut b = std::fs::read(fixture("types.gguf")).unwrap();
        let limit = if header_only { walk_gguf(&b).header_end } else { b.len() };
        for (at, v) in muts {
            let i = at % limit;
            b[i] = v;
        }
        let p = scratch("gguf-prop", "p.gguf");
        std::fs::write(&p, &b).unwrap();
        if let Err(e) = exercise_gguf(&p) {
            prop_assert!(e.to_string().contains(&p.display().to_string()), "{}", e);
        }
    }

    #[test]
    fn safetensors_random_byte_mutations_never_panic(
        muts in proptest::collection::vec((0usize..1 << 20, any::<u8>()), 1..6),
    ) {
        let (mut b, _) = small_safetensors();
        let n = b.len();
        for (at, v) in muts {
            b[at % n] = v;
        }
        let p = scratch("st-prop", "p.safetensors");
        std::fs::write(&p, &b).unwrap();
        if let Err(e) = exercise_safetensors(&p) {
            prop_assert!(e.to_string().contains(&p.display().to_string()), "{}", e);
        }
    }
}
