//! GGUF: the real SmolLM2 Q4_1 file and a small file of every dequantisable type, against what
//! gguf-py reads and dequantises (fixtures from scripts/make_gguf_fixtures.py).

mod common;

use common::*;
use kiln_io::{GgmlType, GgufArray, GgufFile, GgufValue, IoError};

#[test]
fn smollm2_header_metadata_and_table_match_gguf_py() {
    let path = smollm2();
    let f = GgufFile::open(&path).unwrap();
    let fx = json("smollm2_gguf.json");
    assert_eq!(f.version() as u64, fx["version"].as_u64().unwrap());
    assert_eq!(f.alignment() as u64, fx["alignment"].as_u64().unwrap());
    assert_eq!(f.data_offset() as u64, fx["data_offset"].as_u64().unwrap());
    assert_eq!(
        f.metadata_entries().len() as u64,
        fx["kv_count"].as_u64().unwrap()
    );
    let m = &fx["metadata"];
    assert_eq!(
        f.get_str("general.architecture").unwrap(),
        m["general.architecture"].as_str().unwrap()
    );
    assert_eq!(
        f.get_u32("llama.block_count").unwrap() as u64,
        m["llama.block_count"].as_u64().unwrap()
    );
    assert_eq!(
        f.get_u64("llama.embedding_length").unwrap(),
        m["llama.embedding_length"].as_u64().unwrap()
    );
    assert_eq!(
        f.get_f32("llama.rope.freq_base").unwrap() as f64,
        m["llama.rope.freq_base"].as_f64().unwrap()
    );
    assert_eq!(
        f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap() as f64,
        m["llama.attention.layer_norm_rms_epsilon"]
            .as_f64()
            .unwrap()
    );
    assert_eq!(
        f.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        m["tokenizer.ggml.add_bos_token"].as_bool().unwrap()
    );
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(
        tokens.len() as u64,
        m["tokenizer.ggml.tokens.len"].as_u64().unwrap()
    );
    let first: Vec<&str> = m["tokenizer.ggml.tokens.first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens[..8].iter().map(String::as_str).collect::<Vec<_>>(),
        first
    );
    assert_eq!(
        tokens.last().unwrap(),
        m["tokenizer.ggml.tokens.last"].as_str().unwrap()
    );
    let tt = f.get_i32_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!(
        tt[..8].iter().map(|&x| x as usize).collect::<Vec<_>>(),
        usizes(&m["tokenizer.ggml.token_type.first"])
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len() as u64,
        m["tokenizer.ggml.merges.len"].as_u64().unwrap()
    );

    let table = fx["table"].as_array().unwrap();
    assert_eq!(f.tensor_infos().len(), table.len());
    for (info, e) in f.tensor_infos().iter().zip(table) {
        assert_eq!(info.name, e["name"].as_str().unwrap());
        assert_eq!(info.shape(), usizes(&e["shape"]), "{}", info.name);
        assert_eq!(info.ty.name(), e["type"].as_str().unwrap(), "{}", info.name);
        assert_eq!(
            info.span.0 as u64,
            e["offset"].as_u64().unwrap(),
            "{}",
            info.name
        );
        assert_eq!(f.tensor_info(&info.name), Some(info));
    }

    // Typed getters name the key and both types.
    let p = path.display().to_string();
    let e = f.get_u32("general.architecture").unwrap_err().to_string();
    assert!(
        e.contains(&p)
            && e.contains("metadata key 'general.architecture' has type string, expected u32"),
        "{e}"
    );
    let e = f.get_str("tokenizer.ggml.tokens").unwrap_err().to_string();
    assert!(e.contains("has type array[string], expected string"), "{e}");
    let e = f.get_u32("llama.nonexistent").unwrap_err();
    assert!(matches!(e, IoError::MissingKey { .. }));
    assert!(e
        .to_string()
        .contains("metadata key 'llama.nonexistent' missing"));
    let e = f.tensor_f32("nope").unwrap_err().to_string();
    assert!(e.contains(&p) && e.contains("no tensor named 'nope'"));
}

#[test]
fn smollm2_dequantised_tensors_match_gguf_py() {
    let f = GgufFile::open(smollm2()).unwrap();
    let fx = json("smollm2_gguf.json");
    let mut seen = std::collections::BTreeSet::new();
    let mut max_abs = 0f32;
    for (name, e) in fx["tensors"].as_object().unwrap() {
        let (ty, bytes, shape) = f.raw(name).unwrap();
        assert_eq!(ty.name(), e["type"].as_str().unwrap());
        seen.insert(ty);
        assert_eq!(shape, usizes(&e["shape"]));
        assert_eq!(Some(bytes.len()), ty.bytes_for(shape.iter().product()));
        let t = f.tensor_f32(name).unwrap();
        assert_eq!(t.dims(), shape.as_slice());
        let v = t.to_vec::<f32>();
        let cols = *shape.last().unwrap();
        let (hr, hc) = (
            e["head_rows"].as_u64().unwrap() as usize,
            e["head_cols"].as_u64().unwrap() as usize,
        );
        let head = f32s(&e["head"]);
        for r in 0..hr {
            for c in 0..hc {
                let (got, want) = (v[r * cols + c], head[r * hc + c]);
                max_abs = max_abs.max((got - want).abs());
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{name}[{r}, {c}]: {got} vs {want}"
                );
            }
        }
        let tail = f32s(&e["tail"]);
        assert_eq!(v[v.len() - tail.len()..], tail[..], "{name} tail");
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let sumsq: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        for (got, key) in [(sum, "sum"), (sumsq, "sumsq")] {
            let want = e[key].as_f64().unwrap();
            let rel = (got - want).abs() / want.abs().max(1e-3);
            assert!(rel < 1e-9, "{name} {key}: {got} vs {want}");
        }
    }
    assert_eq!(seen, [GgmlType::F32, GgmlType::Q4_1, GgmlType::Q8_0].into());
    eprintln!("smollm2: max abs diff vs gguf-py {max_abs}");
    assert_eq!(max_abs, 0.0);
}

fn types_file() -> std::path::PathBuf {
    fixture("types.gguf")
}

#[test]
fn every_type_dequantises_exactly_like_gguf_py() {
    let f = GgufFile::open(types_file()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    let manifest = json("types.json");
    let bytes = std::fs::read(fixture("types_expected.bin")).unwrap();
    let expected: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut at = 0;
    let mut types = Vec::new();
    for e in manifest["tensors"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let n = e["count"].as_u64().unwrap() as usize;
        let info = f.tensor_info(name).unwrap();
        assert_eq!(info.ty.name(), e["type"].as_str().unwrap());
        assert_eq!(info.shape(), usizes(&e["shape"]));
        types.push(info.ty);
        let t = f.tensor_f32(name).unwrap();
        assert_eq!(t.dims(), usizes(&e["shape"]).as_slice());
        let v = t.to_vec::<f32>();
        assert_eq!(v.len(), n);
        for (i, (g, w)) in v.iter().zip(&expected[at..at + n]).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs {w}");
        }
        at += n;
    }
    assert_eq!(at, expected.len());
    use GgmlType::*;
    for t in [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, I8, I32,
    ] {
        assert!(types.contains(&t), "{t} missing from the fixture");
    }
}

#[test]
fn metadata_of_every_value_type_reads_back() {
    let f = GgufFile::open(types_file()).unwrap();
    let m = |k: &str| {
        f.metadata(k)
            .unwrap_or_else(|| panic!("{k} missing"))
            .clone()
    };
    // The values scripts/make_gguf_fixtures.py wrote.
    assert_eq!(m("test.u8"), GgufValue::U8(200));
    assert_eq!(m("test.i8"), GgufValue::I8(-100));
    assert_eq!(m("test.u16"), GgufValue::U16(60000));
    assert_eq!(m("test.i16"), GgufValue::I16(-30000));
    assert_eq!(m("test.u32"), GgufValue::U32(4_000_000_000));
    assert_eq!(m("test.i32"), GgufValue::I32(-2_000_000_000));
    assert_eq!(m("test.f32"), GgufValue::F32(0.1));
    assert_eq!(m("test.bool"), GgufValue::Bool(true));
    assert_eq!(m("test.string"), GgufValue::String("héllo wörld".into()));
    assert_eq!(m("test.u64"), GgufValue::U64((1 << 63) + 5));
    assert_eq!(m("test.i64"), GgufValue::I64(-(1 << 62)));
    assert_eq!(m("test.f64"), GgufValue::F64(2f64.powi(-30)));
    assert_eq!(
        m("test.arr_i32"),
        GgufValue::Array(GgufArray::I32(vec![1, -2, 3]))
    );
    assert_eq!(f.get_str_array("test.arr_str").unwrap(), ["a", "bé", ""]);
    assert_eq!(
        m("test.arr_f32"),
        GgufValue::Array(GgufArray::F32(vec![0.5, -1.25]))
    );
    assert_eq!(
        m("test.arr_bool"),
        GgufValue::Array(GgufArray::Bool(vec![true, false, true]))
    );
    assert_eq!(
        m("test.arr_u8"),
        GgufValue::Array(GgufArray::U8(vec![1, 2, 255]))
    );
    assert_eq!(
        m("test.nested"),
        GgufValue::Array(GgufArray::Array(vec![
            GgufArray::I32(vec![1, 2]),
            GgufArray::I32(vec![3]),
            GgufArray::I32(vec![4, 5, 6]),
        ]))
    );
    assert_eq!(f.get_array("test.nested").unwrap().len(), 3);
    assert_eq!(f.get_u64("test.u8").unwrap(), 200);
    assert_eq!(f.get_u32("general.alignment").unwrap(), 64);
    assert_eq!(f.get_str("general.architecture").unwrap(), "kilntest");
    let e = f.get_u64("test.i64").unwrap_err().to_string();
    assert!(
        e.contains("metadata key 'test.i64' has type i64, expected unsigned integer"),
        "{e}"
    );
    let e = f.get_str_array("test.nested").unwrap_err().to_string();
    assert!(
        e.contains("has type array[array], expected array[string]"),
        "{e}"
    );
}

fn with_version(tag: &str, version: u32) -> std::path::PathBuf {
    let mut b = std::fs::read(types_file()).unwrap();
    b[4..8].copy_from_slice(&version.to_le_bytes());
    let p = temp_dir(tag).join("v.gguf");
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn version_2_reads_and_other_versions_are_refused() {
    let p = with_version("v2", 2);
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 2);
    let g = GgufFile::open(types_file()).unwrap();
    for info in g.tensor_infos() {
        assert_eq!(
            f.tensor_f32(&info.name).unwrap().to_vec::<f32>(),
            g.tensor_f32(&info.name).unwrap().to_vec::<f32>()
        );
    }
    for v in [1u32, 4, u32::MAX] {
        let p = with_version(&format!("v{v}"), v);
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(
            e.contains(&format!("GGUF version {v} not supported (2 or 3)")),
            "{e}"
        );
    }
}

#[test]
fn unsupported_type_and_bad_magic_are_errors() {
    // Patch the q4_0 tensor's type id to IQ2_XXS? Its block size differs, so use IQ4_NL
    // (same 32-element, 18-byte blocks), which kiln does not dequantise.
    let mut b = std::fs::read(types_file()).unwrap();
    let f = GgufFile::open(types_file()).unwrap();
    let name = b"q4_0";
    let pos = b
        .windows(12)
        .position(|w| w[..8] == (name.len() as u64).to_le_bytes() && &w[8..] == name)
        .unwrap();
    let ty_at = pos + 12 + 4 + 8 * f.tensor_info("q4_0").unwrap().dims.len();
    assert_eq!(
        u32::from_le_bytes(b[ty_at..ty_at + 4].try_into().unwrap()),
        GgmlType::Q4_0.id()
    );
    b[ty_at..ty_at + 4].copy_from_slice(&GgmlType::IQ4_NL.id().to_le_bytes());
    let p = temp_dir("iq4").join("t.gguf");
    std::fs::write(&p, &b).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.raw("q4_0").unwrap().0, GgmlType::IQ4_NL);
    let e = g.tensor_f32("q4_0").unwrap_err().to_string();
    assert!(
        e.contains("tensor 'q4_0': ggml type IQ4_NL cannot be dequantised"),
        "{e}"
    );

    b[0] = b'X';
    std::fs::write(&p, &b).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        e.contains(&p.display().to_string()) && e.contains("bad magic"),
        "{e}"
    );
    let e = GgufFile::open(p.with_extension("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot open"), "{e}");
}
