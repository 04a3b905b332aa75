//! PyTorch checkpoints: parity with `torch.load(weights_only=True)` on fixtures written by
//! `scripts/make_torch_fixtures.py` (zip and legacy containers), the real EfficientNet-lite0
//! `.pth`, hostile pickles, and fuzzing (truncation, overwritten lengths, random mutations).

mod common;

use common::*;
use kiln_core::DType;
use kiln_io::{load_torch, IoError};
use kiln_nn::module::StateDict;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn torch_fixture(name: &str) -> PathBuf {
    fixture(&format!("torch/{name}"))
}

/// Checks every tensor of `sd` (names in order, dtype, shape, every value exactly) against the
/// fixture's entries.
fn assert_matches(file: &str, sd: &StateDict, want: &serde_json::Value) {
    let want = want.as_array().unwrap();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n).collect();
    let want_names: Vec<&str> = want.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, want_names, "{file}: names");
    for w in want {
        let name = w["name"].as_str().unwrap();
        let t = sd.get(name).unwrap();
        assert_eq!(t.dims(), &usizes(&w["shape"])[..], "{file}: {name} shape");
        let data = w["data"].as_array().unwrap();
        match w["dtype"].as_str().unwrap() {
            "F32" => {
                assert_eq!(t.dtype(), DType::F32, "{file}: {name}");
                assert_eq!(t.to_vec::<f32>(), f32s(&w["data"]), "{file}: {name}");
            }
            "F64" => {
                assert_eq!(t.dtype(), DType::F64, "{file}: {name}");
                let v: Vec<f64> = data.iter().map(|x| x.as_f64().unwrap()).collect();
                assert_eq!(t.to_vec::<f64>(), v, "{file}: {name}");
            }
            "I64" => {
                assert_eq!(t.dtype(), DType::I64, "{file}: {name}");
                let v: Vec<i64> = data.iter().map(|x| x.as_i64().unwrap()).collect();
                assert_eq!(t.to_vec::<i64>(), v, "{file}: {name}");
            }
            d => panic!("{file}: unknown dtype {d}"),
        }
    }
}

#[test]
fn fixtures_equal_torch_load() {
    let exp = json("torch/expected.json");
    let files = exp.as_object().unwrap();
    for f in [
        "types_zip.pt",
        "types_legacy.pt",
        "ckpt_zip.pth",
        "ckpt_legacy.pth",
        "small_zip.pt",
        "small_legacy.pt",
        "rezipped.pt",
    ] {
        let sd = load_torch(torch_fixture(f)).unwrap_or_else(|e| panic!("{e}"));
        assert_matches(f, &sd, &files[f]);
    }
    assert_eq!(files.len(), 7, "every fixture in expected.json is checked");
}

#[test]
fn views_shared_storages_and_nested_names() {
    for f in ["types_zip.pt", "types_legacy.pt"] {
        let sd = load_torch(torch_fixture(f)).unwrap();
        let w = sd.get("w").unwrap().to_vec::<f32>();
        let wt = sd.get("w_t").unwrap().to_vec::<f32>();
        for i in 0..3 {
            for j in 0..4 {
                assert_eq!(wt[j * 3 + i], w[i * 4 + j], "{f}: w_t[{j},{i}]");
            }
        }
        assert_eq!(sd.get("w_tied").unwrap().to_vec::<f32>(), w);
        assert_eq!(sd.get("w_alias").unwrap().to_vec::<f32>(), w);
        let big = sd.get("big").unwrap().to_vec::<f32>();
        assert_eq!(sd.get("big_off").unwrap().to_vec::<f32>(), &big[5..11]);
        assert_eq!(
            sd.get("expand").unwrap().to_vec::<f32>(),
            [0., 1., 2.].repeat(4)
        );
        assert_eq!(sd.get("scalar").unwrap().dims(), &[] as &[usize]);
        assert_eq!(sd.get("empty").unwrap().dims(), &[0, 3]);
        assert_eq!(
            sd.get("sub.deeper.b").unwrap().to_vec::<i64>(),
            [0, 1, 2, 3]
        );
        assert!(sd.get("epoch_count").is_none() && sd.get("note").is_none());
    }
    // A training checkpoint: the state dict under "state_dict", the optimizer ignored.
    let sd = load_torch(torch_fixture("ckpt_zip.pth")).unwrap();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["weight", "bias"]);
}

#[test]
fn efficientnet_lite0_equals_torch_load() {
    let path = model_file(
        "efficientnet",
        "efficientnet-lite0/efficientnet-lite0-57934424.pth",
    );
    let exp = json("torch/efficientnet.json");
    let sd = load_torch(&path).unwrap_or_else(|e| panic!("{e}"));
    let want = exp["tensors"].as_array().unwrap();
    assert_eq!(sd.len(), want.len());
    assert_eq!(want.len(), 296);
    for (w, (name, t)) in want.iter().zip(sd.iter()) {
        assert_eq!(name, w["name"].as_str().unwrap());
        assert_eq!(t.dims(), &usizes(&w["shape"])[..], "{name}");
        let v: Vec<f64> = match w["dtype"].as_str().unwrap() {
            "F32" => {
                assert_eq!(t.dtype(), DType::F32, "{name}");
                t.to_vec::<f32>().into_iter().map(f64::from).collect()
            }
            "I64" => {
                assert_eq!(t.dtype(), DType::I64, "{name}");
                t.to_vec::<i64>().into_iter().map(|x| x as f64).collect()
            }
            d => panic!("{name}: dtype {d}"),
        };
        let first: Vec<f64> = w["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(&v[..first.len()], &first[..], "{name}: first values");
        assert_eq!(
            v[v.len() - 1],
            w["last"][0].as_f64().unwrap(),
            "{name}: last"
        );
        // Sums in f64 (summation order differs from torch's: relative 1e-9).
        for (got, key) in [
            (v.iter().sum::<f64>(), "sum"),
            (v.iter().map(|x| x.abs()).sum::<f64>(), "abs_sum"),
        ] {
            let want = w[key].as_f64().unwrap();
            let scale = w["abs_sum"].as_f64().unwrap().max(1e-30);
            assert!(
                (got - want).abs() <= 1e-9 * scale,
                "{name}: {key} {got} vs torch {want}"
            );
        }
    }
}

fn err_of(r: kiln_io::Result<StateDict>, path: &Path) -> IoError {
    match r {
        Ok(sd) => panic!(
            "{}: expected an error, got {} tensors",
            path.display(),
            sd.len()
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&path.display().to_string()),
                "message lacks the path: {msg}"
            );
            e
        }
    }
}

#[test]
fn hostile_globals_are_rejected_without_running() {
    for (f, global) in [
        ("hostile_system.pt", "posix.system"),
        ("hostile_eval_legacy.pt", "__builtin__.eval"), // protocol 2 names builtins so
        ("module_zip.pt", "torch.nn.modules.linear.Linear"),
    ] {
        let p = torch_fixture(f);
        let e = err_of(load_torch(&p), &p);
        assert!(
            matches!(&e, IoError::ForbiddenGlobal { global: g, .. } if g == global),
            "{f}: {e}"
        );
        assert!(
            e.to_string().contains(&format!(
                "global '{global}' is not allowed in a weights file"
            )),
            "{e}"
        );
    }
}

/// A legacy file: the three header pickles, then `data` (a data pickle, key list, storages).
fn legacy_with(data: &[u8]) -> Vec<u8> {
    let mut b = vec![
        0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8,
    ];
    b.extend_from_slice(&[0x50, 0x19, b'.', 0x80, 2, b'M', 0xe9, 0x03, b'.']);
    b.extend_from_slice(b"\x80\x02}q\x00X\x0d\x00\x00\x00little_endianq\x01\x88s.");
    b.extend_from_slice(data);
    b
}

fn write_tmp(tag: &str, bytes: &[u8]) -> PathBuf {
    let p = temp_dir(tag).join("f.pt");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn hand_made_hostile_pickles() {
    for (tag, pkl, global) in [
        (
            "os",
            &b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR."[..],
            "os.system",
        ),
        (
            "eval",
            b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.",
            "builtins.eval",
        ),
        (
            "untyped",
            b"\x80\x02ctorch.storage\nUntypedStorage\n.",
            "torch.storage.UntypedStorage",
        ),
        (
            "frombytes",
            b"\x80\x02ctorch.storage\n_load_from_bytes\n.",
            "torch.storage._load_from_bytes",
        ),
    ] {
        let p = write_tmp(tag, &legacy_with(pkl));
        let e = err_of(load_torch(&p), &p);
        assert!(
            matches!(&e, IoError::ForbiddenGlobal { global: g, .. } if g == global),
            "{tag}: {e}"
        );
    }
}

#[test]
fn precise_errors() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "notdict",
            legacy_with(b"\x80\x02K\x05.]."),
            "the checkpoint is a int, not a dict",
        ),
        (
            "nomagic",
            b"\x80\x02K\x05.".to_vec(),
            "without the legacy torch.save magic number",
        ),
        (
            "garbage",
            b"hello world".to_vec(),
            "neither a zip archive nor a pickle",
        ),
        (
            "opcode",
            legacy_with(b"\x80\x02I5\n."),
            "opcode 0x49 (INT) is not allowed",
        ),
        (
            "bigendian",
            {
                let mut b = legacy_with(b"}.].");
                let p = b.iter().position(|&x| x == 0x88).unwrap();
                b[p] = 0x89;
                b
            },
            "big-endian checkpoint",
        ),
    ];
    for (tag, bytes, want) in cases {
        let p = write_tmp(tag, &bytes);
        let msg = err_of(load_torch(&p), &p).to_string();
        assert!(msg.contains(want), "{tag}: {msg}");
    }
    for (f, want) in [
        (
            "byteorder_big.pt",
            "big-endian checkpoint (byteorder 'big')",
        ),
        ("deflated.pt", "is compressed (method 8)"),
    ] {
        let p = torch_fixture(f);
        let msg = err_of(load_torch(&p), &p).to_string();
        assert!(msg.contains(want), "{f}: {msg}");
    }
    let p = temp_dir("missing").join("nope.pt");
    let msg = err_of(load_torch(&p), &p).to_string();
    assert!(msg.contains("cannot open"), "{msg}");
}

#[test]
fn tensor_outside_its_storage_is_an_error() {
    // small_legacy.pt's tensor 'a' is 2×3 float32 at offset 0: make its offset 1.
    let mut b = std::fs::read(torch_fixture("small_legacy.pt")).unwrap();
    // The first rebuild after the persistent id: `Q K\x00` (BINPERSID, offset 0).
    let p = b.windows(3).position(|w| w == b"QK\x00").unwrap();
    b[p + 2] = 1;
    let path = write_tmp("outside", &b);
    let msg = err_of(load_torch(&path), &path).to_string();
    assert!(
        msg.contains("tensor 'a': size [2, 3], stride [3, 1] at offset 1 reach beyond its storage"),
        "{msg}"
    );
}

/// Loads `bytes` from a file: an error must name the file; nothing may panic.
fn check_no_panic(path: &Path, bytes: &[u8], case: &str) {
    std::fs::write(path, bytes).unwrap();
    if let Err(e) = load_torch(path) {
        let msg = e.to_string();
        assert!(
            msg.starts_with(&path.display().to_string()),
            "{case}: message lacks the path: {msg}"
        );
    }
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    for f in ["small_zip.pt", "small_legacy.pt"] {
        let b = std::fs::read(torch_fixture(f)).unwrap();
        let path = temp_dir(&format!("trunc-{f}")).join(f);
        for n in 0..b.len() {
            std::fs::write(&path, &b[..n]).unwrap();
            let r = load_torch(&path);
            let e = err_of(r, &path);
            let _ = e;
        }
    }
}

#[test]
fn hostile_lengths_at_every_offset() {
    for f in ["small_zip.pt", "small_legacy.pt"] {
        let b = std::fs::read(torch_fixture(f)).unwrap();
        let path = temp_dir(&format!("len-{f}")).join(f);
        for p in 0..b.len() {
            for v in [
                &[0xff; 4][..],
                &[0xff, 0xff, 0xff, 0x7f],
                &[0xff; 8],
                &[0, 0, 0, 0x80],
            ] {
                let mut m = b.clone();
                let e = (p + v.len()).min(m.len());
                m[p..e].copy_from_slice(&v[..e - p]);
                check_no_panic(&path, &m, &format!("{f}: {v:02x?} at {p}"));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_mutations_never_panic(
        zip in any::<bool>(),
        muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let f = if zip { "small_zip.pt" } else { "small_legacy.pt" };
        let mut b = std::fs::read(torch_fixture(f)).unwrap();
        for (i, v) in &muts {
            let at = i.index(b.len());
            b[at] = *v;
        }
        let path = temp_dir(&format!("mut-{}", std::thread::current().name().unwrap_or("t").replace(':', "_"))).join(f);
        check_no_panic(&path, &b, &format!("{f}: {muts:?}"));
    }
}

/// A legacy file holding `{'v': tensor}` where the tensor (offset 0, size 2, stride 1) lies on
/// view `(off, len)` of a 4-element float32 storage [1, 2, 3, 4] (torch < 1.? wrote such views).
fn legacy_view_file(off: u8, len: u8) -> Vec<u8> {
    fn s(b: &mut Vec<u8>, x: &str) {
        b.push(b'X');
        b.extend_from_slice(&(x.len() as u32).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    }
    let mut p = b"\x80\x02}(".to_vec();
    s(&mut p, "v");
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    s(&mut p, "storage");
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    s(&mut p, "0");
    s(&mut p, "cpu");
    p.extend_from_slice(b"K\x04(");
    s(&mut p, "1");
    p.extend_from_slice(&[b'K', off, b'K', len, b't', b't', b'Q']);
    p.extend_from_slice(b"K\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRu.");
    p.extend_from_slice(b"](");
    s(&mut p, "0");
    p.extend_from_slice(b"e.");
    p.extend_from_slice(&4u64.to_le_bytes());
    for v in [1f32, 2., 3., 4.] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    legacy_with(&p)
}

#[test]
fn legacy_storage_views() {
    let p = write_tmp("view", &legacy_view_file(1, 2));
    let sd = load_torch(&p).unwrap();
    assert_eq!(sd.get("v").unwrap().to_vec::<f32>(), [2.0, 3.0]);
    // The tensor needs 2 elements of a 1-element view.
    let p = write_tmp("view-short", &legacy_view_file(1, 1));
    let msg = err_of(load_torch(&p), &p).to_string();
    assert!(
        msg.contains("reach beyond its storage '0' of 1 float32"),
        "{msg}"
    );
    // The view itself lies outside the 4-element storage.
    let p = write_tmp("view-out", &legacy_view_file(3, 2));
    let msg = err_of(load_torch(&p), &p).to_string();
    assert!(
        msg.contains("storage '0': view 3..3+2 exceeds its 4 elements"),
        "{msg}"
    );
}
