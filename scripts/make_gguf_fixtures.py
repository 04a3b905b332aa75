"""Writes kiln-io's checkpoint-format parity fixtures into crates/kiln-io/tests/fixtures/.

Needs the PyPI packages `gguf` (gguf-py, for GGUFReader / GGUFWriter / gguf.quants), `safetensors`
and `numpy`. Run with the repository's torch venv:

    /work/venvs/torch/bin/python scripts/make_gguf_fixtures.py

Inputs: the real checkpoints from scripts/fetch_models.sh (found via $KILN_MODEL_DIR or
<repo>/.cache/models): all-MiniLM-L6-v2/model.safetensors and
smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. Outputs (all read by crates/kiln-io/tests/):

- minilm_safetensors.json: for every tensor of the MiniLM file, as the `safetensors` package reads
  it: dtype, shape, first 16 and last 16 values, float64 sum.
- smollm2_gguf.json: the SmolLM2 file as gguf-py's GGUFReader sees it (version, alignment, data
  offset, selected metadata, the whole tensor table) and, for a few tensors of each type present
  (Q8_0, Q4_1, F32), gguf.quants.dequantize's values: the first 2 blocks of the first 32 rows,
  the last 64 values of the last row, float64 sum and sum of squares of the whole tensor.
- types.gguf (+ types.json, types_expected.bin): a small GGUF v3 with 64-byte alignment holding
  one metadata value of every GGUF value type (nested arrays included) and one tensor of each
  ggml type kiln dequantises. Blocks come from gguf.quants.quantize where gguf-py can quantise the
  type and are random bytes with finite f16 scales otherwise; the expected values are
  gguf.quants.dequantize of the bytes GGUFReader reads back, little-endian f32, concatenated in
  the order of types.json.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "kiln-io" / "tests" / "fixtures"
HEAD_ROWS = 32
MODELS = Path(os.environ.get("KILN_MODEL_DIR") or ROOT / ".cache" / "models")


def floats(a):
    return [float(x) for x in np.asarray(a, dtype=np.float32).ravel()]


def minilm():
    path = MODELS / "all-MiniLM-L6-v2" / "model.safetensors"
    out = {}
    with safe_open(str(path), framework="np") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            flat = t.ravel()
            out[name] = {
                "dtype": str(t.dtype),
                "shape": list(t.shape),
                "first": [float(x) if t.dtype.kind == "f" else int(x) for x in flat[:16]],
                "last": [float(x) if t.dtype.kind == "f" else int(x) for x in flat[-16:]],
                "sum": float(flat.astype(np.float64).sum()),
            }
    (OUT / "minilm_safetensors.json").write_text(json.dumps(out, indent=0, sort_keys=True))
    print(f"minilm: {len(out)} tensors")


def smollm2():
    path = MODELS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    r = gguf.GGUFReader(str(path))

    def field(key):
        return r.fields[key].contents()

    table = [
        {
            "name": t.name,
            "shape": [int(x) for x in reversed(t.shape.tolist())],
            "type": t.tensor_type.name,
            "offset": int(t.data_offset),
        }
        for t in r.tensors
    ]
    tokens = field("tokenizer.ggml.tokens")
    meta = {
        "general.architecture": field("general.architecture"),
        "llama.block_count": int(field("llama.block_count")),
        "llama.embedding_length": int(field("llama.embedding_length")),
        "llama.rope.freq_base": float(field("llama.rope.freq_base")),
        "llama.attention.layer_norm_rms_epsilon": float(
            field("llama.attention.layer_norm_rms_epsilon")
        ),
        "tokenizer.ggml.add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
        "tokenizer.ggml.tokens.len": len(tokens),
        "tokenizer.ggml.tokens.first": tokens[:8],
        "tokenizer.ggml.tokens.last": tokens[-1],
        "tokenizer.ggml.token_type.first": [int(x) for x in field("tokenizer.ggml.token_type")[:8]],
        "tokenizer.ggml.merges.len": len(field("tokenizer.ggml.merges")),
    }
    picks = [
        "token_embd.weight",
        "blk.0.ffn_down.weight",
        "blk.29.attn_v.weight",
        "blk.0.attn_norm.weight",
        "output_norm.weight",
    ]
    by_name = {t.name: t for t in r.tensors}
    tensors = {}
    for name in picks:
        t = by_name[name]
        v = dequantize(t.data, t.tensor_type)
        rows = v.reshape(-1, v.shape[-1])
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
        width = min(rows.shape[1], 2 * max(block, 32))
        tensors[name] = {
            "type": t.tensor_type.name,
            "shape": list(v.shape),
            "head_rows": min(HEAD_ROWS, rows.shape[0]),
            "head_cols": width,
            "head": floats(rows[:HEAD_ROWS, :width]),
            "tail": floats(rows[-1, -64:]),
            "sum": float(v.astype(np.float64).sum()),
            "sumsq": float((v.astype(np.float64) ** 2).sum()),
        }
    fx = {
        "version": int(field("GGUF.version")),
        "alignment": 32,
        "data_offset": int(r.data_offset),
        "kv_count": int(field("GGUF.kv_count")),
        "metadata": meta,
        "table": table,
        "tensors": tensors,
    }
    (OUT / "smollm2_gguf.json").write_text(json.dumps(fx, indent=0))
    print(f"smollm2: {len(table)} tensors, {len(tensors)} dequantised")


def finite_f16(rng, n):
    return rng.uniform(-0.05, 0.05, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_k_blocks(rng, qtype, n_blocks):
    bsize = gguf.GGML_QUANT_SIZES[qtype][1]
    b = rng.integers(0, 256, size=(n_blocks, bsize), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):
        b[:, 0:2] = finite_f16(rng, n_blocks)  # d
        b[:, 2:4] = finite_f16(rng, n_blocks)  # dmin
    elif qtype == T.Q6_K:
        b[:, 208:210] = finite_f16(rng, n_blocks)  # d
    else:
        raise ValueError(qtype)
    return b


def types_gguf():
    rng = np.random.default_rng(1234)
    path = OUT / "types.gguf"
    w = gguf.GGUFWriter(str(path), arch="kilntest")
    w.add_custom_alignment(64)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo wörld")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", 2.0**-30)
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_str", ["a", "bé", ""])
    w.add_array("test.arr_f32", [0.5, -1.25])
    w.add_array("test.arr_bool", [True, False, True])
    w.add_array("test.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_key_value("test.arr_u8", [1, 2, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)

    specs = []  # (name, qtype, torch shape)

    def add_quant(name, qtype, shape):
        data = rng.standard_normal(size=shape).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, data)
        elif qtype == T.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
        specs.append((name, qtype, shape))

    add_quant("f32", T.F32, (5, 7))
    add_quant("f16", T.F16, (3, 10))
    add_quant("bf16", T.BF16, (2, 6))
    add_quant("q4_0", T.Q4_0, (4, 64))
    add_quant("q4_1", T.Q4_1, (4, 64))
    add_quant("q5_0", T.Q5_0, (4, 64))
    add_quant("q5_1", T.Q5_1, (4, 64))
    add_quant("q8_0", T.Q8_0, (2, 3, 64))
    for name, qtype in (("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K)):
        rows, cols = 3, 512
        blocks = random_k_blocks(rng, qtype, rows * cols // 256)
        w.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=qtype)
        specs.append((name, qtype, (rows, cols)))
    ints8 = rng.integers(-128, 128, size=(2, 5), dtype=np.int8)
    w.add_tensor("i8", ints8)
    ints32 = rng.integers(-(2**31), 2**31, size=(7,), dtype=np.int32)
    w.add_tensor("i32", ints32)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Expected values from what gguf-py reads back.
    r = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in r.tensors}
    manifest = []
    expected = []
    for name, qtype, shape in specs:
        t = by_name[name]
        assert t.tensor_type == qtype, (name, t.tensor_type)
        v = dequantize(t.data, qtype).astype(np.float32)
        assert list(v.shape) == list(shape), (name, v.shape, shape)
        manifest.append({"name": name, "type": qtype.name, "shape": list(shape), "count": int(v.size)})
        expected.append(v.ravel())
    for name, arr in (("i8", ints8), ("i32", ints32)):
        t = by_name[name]
        manifest.append({"name": name, "type": t.tensor_type.name, "shape": list(arr.shape), "count": int(arr.size)})
        expected.append(np.asarray(t.data).astype(np.float32).ravel())
    np.concatenate(expected).astype("<f4").tofile(OUT / "types_expected.bin")
    (OUT / "types.json").write_text(json.dumps({"tensors": manifest}, indent=1))
    print(f"types.gguf: {path.stat().st_size} bytes, {len(manifest)} tensors")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for fn in (minilm, smollm2, types_gguf):
        fn()
    sys.exit(0)
