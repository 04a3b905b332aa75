//! safetensors: the real MiniLM checkpoint against the Python `safetensors` package's values,
//! small files written here (dtypes, metadata, sharded pair + index, directories), errors.

mod common;

use common::*;
use kiln_core::{DType, Tensor};
use kiln_io::{load_safetensors_dir, load_sharded, save, IoError, SafeDtype, SafetensorsFile};
use kiln_nn::module::StateDict;
use std::path::Path;

#[test]
fn minilm_loads_every_tensor_with_python_values() {
    let path = minilm();
    let f = SafetensorsFile::open(&path).unwrap();
    let fx = json("minilm_safetensors.json");
    let fx = fx.as_object().unwrap();
    assert_eq!(f.len(), 104);
    assert_eq!(f.names(), fx.keys().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    let sd = f.to_state_dict().unwrap();
    assert_eq!(sd.len(), 104);
    let mut max_rel_sum = 0f64;
    for (name, e) in fx {
        let t = sd.get(name).unwrap();
        assert_eq!(t.dims(), usizes(&e["shape"]).as_slice(), "{name}");
        assert_eq!(f.info(name).unwrap().shape, usizes(&e["shape"]), "{name}");
        let n = t.elem_count();
        let k = n.min(16);
        match e["dtype"].as_str().unwrap() {
            "float32" => {
                assert_eq!(t.dtype(), DType::F32);
                let v = t.to_vec::<f32>();
                assert_eq!(v[..k], f32s(&e["first"])[..], "{name} first");
                assert_eq!(v[n - k..], f32s(&e["last"])[..], "{name} last");
                let sum: f64 = v.iter().map(|&x| x as f64).sum();
                let want = e["sum"].as_f64().unwrap();
                let rel = (sum - want).abs() / want.abs().max(1.0);
                max_rel_sum = max_rel_sum.max(rel);
                assert!(rel < 1e-9, "{name}: sum {sum} vs {want}");
            }
            "int64" => {
                assert_eq!(t.dtype(), DType::I64);
                let v = t.to_vec::<i64>();
                let want: Vec<i64> = e["first"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect();
                assert_eq!(v[..k], want[..], "{name}");
                assert_eq!(v.iter().sum::<i64>() as f64, e["sum"].as_f64().unwrap());
            }
            other => panic!("{name}: unexpected fixture dtype {other}"),
        }
    }
    eprintln!("minilm: max relative sum difference {max_rel_sum:e}");
}

/// Writes a safetensors file from `(name, dtype, shape, bytes)` with an optional metadata map,
/// independently of kiln's writer.
fn write_raw(
    path: &Path,
    tensors: &[(&str, &str, Vec<usize>, Vec<u8>)],
    metadata: Option<&[(&str, &str)]>,
) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    if let Some(m) = metadata {
        let m: serde_json::Map<String, serde_json::Value> = m
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    write_with_header(
        path,
        serde_json::Value::Object(header).to_string().as_bytes(),
        &data,
    );
}

fn write_with_header(path: &Path, header: &[u8], data: &[u8]) {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

#[test]
fn every_dtype_converts_to_the_kiln_dtype() {
    let dir = temp_dir("dtypes");
    let p = dir.join("all.safetensors");
    let f16 = |x: f32| half::f16::from_f32(x).to_bits().to_le_bytes();
    let bf16 = |x: f32| half::bf16::from_f32(x).to_bits().to_le_bytes();
    write_raw(
        &p,
        &[
            (
                "f32",
                "F32",
                vec![2, 2],
                le(&[1.0f32, -2.5, 3.25, 0.0], f32::to_le_bytes),
            ),
            (
                "f64",
                "F64",
                vec![2],
                le(&[1e-300f64, -7.0], f64::to_le_bytes),
            ),
            ("f16", "F16", vec![3], le(&[0.5f32, -65504.0, 1e-7], f16)),
            ("bf16", "BF16", vec![2], le(&[3.0f32, -1e30], bf16)),
            ("i64", "I64", vec![2], le(&[i64::MIN, 5], i64::to_le_bytes)),
            ("i32", "I32", vec![2], le(&[i32::MIN, 7], i32::to_le_bytes)),
            ("i16", "I16", vec![1], le(&[-300i16], i16::to_le_bytes)),
            ("u16", "U16", vec![1], le(&[65535u16], u16::to_le_bytes)),
            ("i8", "I8", vec![2], vec![0xff, 0x7f]),
            ("u8", "U8", vec![2], vec![0xff, 0x01]),
            ("bool", "BOOL", vec![3], vec![1, 0, 1]),
            ("u32", "U32", vec![1], le(&[u32::MAX], u32::to_le_bytes)),
            ("u64", "U64", vec![1], le(&[1u64 << 40], u64::to_le_bytes)),
            ("scalar", "F32", vec![], le(&[9.0f32], f32::to_le_bytes)),
            ("empty", "F32", vec![0, 3], vec![]),
        ],
        Some(&[("format", "pt"), ("author", "kiln")]),
    );
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.metadata().get("author").unwrap(), "kiln");
    assert_eq!(f.info("bf16").unwrap().dtype, SafeDtype::BF16);
    let t = |n: &str| f.tensor(n).unwrap();
    assert_eq!(t("f32").to_vec::<f32>(), vec![1.0, -2.5, 3.25, 0.0]);
    assert_eq!(t("f32").dims(), &[2, 2]);
    assert_eq!(t("f64").to_vec::<f64>(), vec![1e-300, -7.0]);
    let want_f16: Vec<f32> = [0.5f32, -65504.0, 1e-7]
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(t("f16").to_vec::<f32>(), want_f16);
    assert_eq!(
        t("bf16").to_vec::<f32>(),
        vec![3.0, half::bf16::from_f32(-1e30).to_f32()]
    );
    assert_eq!(t("i64").to_vec::<i64>(), vec![i64::MIN, 5]);
    assert_eq!(t("i32").to_vec::<i64>(), vec![i32::MIN as i64, 7]);
    assert_eq!(t("i16").to_vec::<i64>(), vec![-300]);
    assert_eq!(t("u16").to_vec::<i64>(), vec![65535]);
    assert_eq!(t("i8").to_vec::<i64>(), vec![-1, 127]);
    assert_eq!(t("u8").to_vec::<i64>(), vec![255, 1]);
    assert_eq!(t("bool").to_vec::<i64>(), vec![1, 0, 1]);
    assert_eq!(t("u32").to_vec::<u32>(), vec![u32::MAX]);
    assert_eq!(t("u64").to_vec::<i64>(), vec![1 << 40]);
    assert_eq!(t("scalar").to_vec::<f32>(), vec![9.0]);
    assert_eq!(t("empty").dims(), &[0, 3]);
    let err = f.tensor("nope").unwrap_err().to_string();
    assert!(err.contains(&p.display().to_string()) && err.contains("no tensor named 'nope'"));
}

#[test]
fn u64_above_i64_max_and_f8_are_errors_naming_the_tensor() {
    let dir = temp_dir("u64");
    let p = dir.join("x.safetensors");
    write_raw(
        &p,
        &[
            ("big", "U64", vec![1], le(&[u64::MAX], u64::to_le_bytes)),
            ("f8", "F8_E4M3", vec![2], vec![0, 0]),
        ],
        None,
    );
    let f = SafetensorsFile::open(&p).unwrap();
    let e = f.tensor("big").unwrap_err().to_string();
    assert!(
        e.contains("tensor 'big': U64 value 18446744073709551615 does not fit in i64"),
        "{e}"
    );
    let e = f.tensor("f8").unwrap_err().to_string();
    assert!(
        e.contains("tensor 'f8': dtype F8_E4M3 cannot be loaded"),
        "{e}"
    );
}

fn sd_of(pairs: &[(&str, Tensor)]) -> StateDict {
    pairs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect()
}

#[test]
fn save_round_trips_through_kiln_nn_writer() {
    let dir = temp_dir("save");
    let p = dir.join("m.safetensors");
    let a = Tensor::from_vec(
        (0..6).map(|i| i as f32 * 0.5).collect::<Vec<_>>(),
        vec![2, 3],
    );
    let b = Tensor::from_vec(vec![1.0f64, -2.0], vec![2]);
    let c = Tensor::from_vec(vec![3i64, 4, 5], vec![3]);
    // A non-contiguous view is saved by value.
    let at = a.t();
    save(
        &sd_of(&[
            ("a", a.clone()),
            ("b.x", b.clone()),
            ("c", c.clone()),
            ("at", at.clone()),
        ]),
        &p,
    )
    .unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.names(), vec!["a", "at", "b.x", "c"]);
    assert_eq!(f.tensor("a").unwrap().to_vec::<f32>(), a.to_vec::<f32>());
    assert_eq!(f.tensor("at").unwrap().dims(), &[3, 2]);
    assert_eq!(f.tensor("at").unwrap().to_vec::<f32>(), at.to_vec::<f32>());
    assert_eq!(f.tensor("b.x").unwrap().to_vec::<f64>(), vec![1.0, -2.0]);
    assert_eq!(f.tensor("c").unwrap().to_vec::<i64>(), vec![3, 4, 5]);
    // A directory holding model.safetensors loads it.
    std::fs::rename(&p, dir.join("model.safetensors")).unwrap();
    assert_eq!(load_safetensors_dir(&dir).unwrap().len(), 4);
    let e = save(&StateDict::new(), dir.join("no/such/dir/x.safetensors")).unwrap_err();
    assert!(matches!(e, IoError::Save { .. }) && e.to_string().contains("no/such/dir"));
}

fn write_shards(dir: &Path, index: &str) -> std::path::PathBuf {
    let one = Tensor::from_vec(vec![1.0f32, 2.0], vec![2]);
    let two = Tensor::from_vec(vec![3.0f32; 4], vec![2, 2]);
    let three = Tensor::from_vec(vec![7i64], vec![1]);
    save(
        &sd_of(&[("a.weight", one), ("a.bias", three)]),
        dir.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    save(
        &sd_of(&[("b.weight", two)]),
        dir.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let p = dir.join("model.safetensors.index.json");
    std::fs::write(&p, index).unwrap();
    p
}

const INDEX: &str = r#"{"metadata": {"total_size": 28}, "weight_map": {
    "a.weight": "model-00001-of-00002.safetensors",
    "a.bias": "model-00001-of-00002.safetensors",
    "b.weight": "model-00002-of-00002.safetensors"}}"#;

#[test]
fn sharded_checkpoint_loads_through_index_and_directory() {
    let dir = temp_dir("sharded");
    let idx = write_shards(&dir, INDEX);
    let sd = load_sharded(&idx).unwrap();
    assert_eq!(sd.len(), 3);
    assert_eq!(sd.get("a.weight").unwrap().to_vec::<f32>(), vec![1.0, 2.0]);
    assert_eq!(sd.get("a.bias").unwrap().to_vec::<i64>(), vec![7]);
    assert_eq!(sd.get("b.weight").unwrap().dims(), &[2, 2]);
    let sd = load_safetensors_dir(&dir).unwrap();
    assert_eq!(sd.len(), 3);
}

#[test]
fn sharded_errors_name_the_index_and_the_problem() {
    let dir = temp_dir("sharded-errors");
    let cases = [
        (
            INDEX.replace("model-00002-of-00002", "model-00003-of-00002"),
            "shard 'model-00003-of-00002.safetensors' (holding 'b.weight') not found",
        ),
        (
            INDEX.replace("\"a.bias\": \"model-00001", "\"a.bias\": \"model-00002"),
            "weight_map maps 'a.bias' to shard 'model-00002-of-00002.safetensors', which lacks it",
        ),
        (
            INDEX.replace("model-00001-of-00002", "../escape"),
            "is not a file name relative to the index",
        ),
        (
            INDEX.replace("weight_map", "weights"),
            "no 'weight_map' object",
        ),
        ("{not json".to_string(), "not valid JSON"),
    ];
    for (index, want) in cases {
        let idx = write_shards(&dir, &index);
        let e = load_sharded(&idx).err().expect("an error").to_string();
        assert!(e.contains(&idx.display().to_string()), "{e}");
        assert!(e.contains(want), "{e}\nwanted: {want}");
    }
    let empty = temp_dir("sharded-none");
    let e = load_safetensors_dir(&empty)
        .err()
        .expect("an error")
        .to_string();
    assert!(
        e.contains("no model.safetensors or model.safetensors.index.json"),
        "{e}"
    );
}
