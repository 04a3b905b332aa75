"""Writes kiln-io's PyTorch-checkpoint fixtures into crates/kiln-io/tests/fixtures/torch/.

Needs PyPI packages: torch (and its numpy-free core only). Run:

    /work/venvs/torch/bin/python scripts/make_torch_fixtures.py

Files written (all small):
  types_zip.pt / types_legacy.pt   one state dict saved with torch.save in the zip format and
                                   with _use_new_zipfile_serialization=False (legacy): every
                                   dtype kiln loads, a transposed view, two names sharing one
                                   storage (and one tensor object saved twice), a storage offset,
                                   a strided column, a stride-0 expand, a 0-d scalar, an empty
                                   tensor, a Parameter, a nested dict, non-tensor entries
  ckpt_zip.pth / ckpt_legacy.pth   a training checkpoint {"epoch", "state_dict", "optimizer"}
  small_zip.pt / small_legacy.pt   two tensors: the files the fuzz tests truncate and mutate
  rezipped.pt                      small_zip.pt's members re-zipped by Python's zipfile under
                                   another prefix (no torch alignment padding)
  byteorder_big.pt                 small_zip.pt re-zipped with byteorder "big"
  deflated.pt                      small_zip.pt re-zipped with compressed members
  hostile_system.pt                torch.save of an object reducing to os.system (zip)
  hostile_eval_legacy.pt           the same with builtins.eval (legacy)
  module_zip.pt                    a pickled nn.Module (its class is not an allowed global)
  expected.json                    per file, each tensor as torch.load(weights_only=True) gives
                                   it: name, kiln dtype, shape, values (row-major, exact)
  efficientnet.json                names, shapes, dtypes, sums, abs sums and a few values of
                                   the EfficientNet-lite0 checkpoint (scripts/fetch_models.sh
                                   efficientnet; found via $KILN_MODEL_DIR or .cache/models)
"""

import collections
import json
import os
import pathlib
import subprocess
import zipfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "kiln-io" / "tests" / "fixtures" / "torch"
MODEL_DIR = pathlib.Path(os.environ.get("KILN_MODEL_DIR") or ROOT / ".cache" / "models")
EFFNET = MODEL_DIR / "efficientnet-lite0" / "efficientnet-lite0-57934424.pth"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def kiln_dtype(t):
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return "F32"
    if t.dtype == torch.float64:
        return "F64"
    return "I64"


def values(t):
    t = t.detach().contiguous()
    if t.dtype.is_floating_point:
        return [float(v) for v in t.to(torch.float64).reshape(-1).tolist()]
    return [int(v) for v in t.to(torch.int64).reshape(-1).tolist()]


def flatten(obj, prefix=""):
    """The tensors of a loaded checkpoint, named as kiln names them."""
    out = []
    for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, torch.Tensor):
            out.append((name, v))
        elif isinstance(v, dict):
            out.extend(flatten(v, name))
    return out


def expected(path):
    obj = torch.load(path, weights_only=True)
    for k in STATE_DICT_KEYS:
        if isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    return [
        {"name": n, "dtype": kiln_dtype(t), "shape": list(t.shape), "data": values(t)}
        for n, t in flatten(obj)
    ]


def save_both(obj, stem, ext=".pt"):
    torch.save(obj, OUT / f"{stem}_zip{ext}")
    torch.save(obj, OUT / f"{stem}_legacy{ext}", _use_new_zipfile_serialization=False)
    return [f"{stem}_zip{ext}", f"{stem}_legacy{ext}"]


def types_state():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 4, generator=g)
    big = torch.randn(20, generator=g)
    grid = torch.randn(4, 5, generator=g, dtype=torch.float64)
    sd = collections.OrderedDict()
    sd["w"] = w
    sd["w_t"] = w.t()  # non-contiguous view of w's storage
    sd["w_tied"] = w  # the same tensor object under a second name
    sd["w_alias"] = w.detach()  # another tensor object on the same storage
    sd["big"] = big
    sd["big_off"] = big[5:11].view(2, 3)  # storage offset 5
    sd["grid_col"] = grid[:, 2]  # stride 5, offset 2
    sd["expand"] = torch.arange(3.0).expand(4, 3)  # stride 0
    sd["f64"] = torch.randn(5, generator=g, dtype=torch.float64)
    sd["f16"] = torch.randn(2, 3, generator=g).half()
    sd["bf16"] = torch.randn(4, generator=g).bfloat16()
    sd["f16_t"] = torch.randn(3, 2, generator=g).half().t()
    sd["i64"] = torch.tensor([-(2**62), -1, 0, 2**40, 2**62])
    sd["i32"] = torch.tensor([-(2**31), -7, 2**31 - 1], dtype=torch.int32)
    sd["i16"] = torch.tensor([-(2**15), 3, 2**15 - 1], dtype=torch.int16)
    sd["i8"] = torch.tensor([-128, -1, 127], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 1, 200, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([[True, False], [False, True]])
    sd["scalar"] = torch.tensor(3.5)
    sd["scalar_i"] = torch.tensor(42)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    sd["sub"] = {"a": torch.randn(2, generator=g), "deeper": {"b": torch.arange(4).view(2, 2)}}
    sd["epoch_count"] = 3  # not a tensor: skipped
    sd["note"] = "not a tensor"
    return sd


def ckpt():
    torch.manual_seed(3)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"epoch": 7, "state_dict": lin.state_dict(), "optimizer": opt.state_dict()}


def rezip(src, dst, prefix=None, byteorder=None, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            name = info.filename
            if prefix is not None:
                name = prefix + "/" + name.split("/", 1)[1]
            if byteorder is not None and name.endswith("/byteorder"):
                data = byteorder
            zout.writestr(name, data)


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def effnet_fixture():
    if not EFFNET.is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "fetch_models.sh"), "efficientnet"], check=True)
    sd = torch.load(EFFNET, weights_only=True)
    tensors = []
    for name, t in sd.items():
        v = t.detach().reshape(-1)
        tensors.append(
            {
                "name": name,
                "dtype": kiln_dtype(t),
                "shape": list(t.shape),
                "sum": float(v.double().sum()),
                "abs_sum": float(v.double().abs().sum()),
                "first": values(v[:3]),
                "last": values(v[-1:]),
            }
        )
    return {"file": EFFNET.name, "tensors": tensors}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    files = []
    files += save_both(types_state(), "types")
    files += save_both(ckpt(), "ckpt", ".pth")
    g = torch.Generator().manual_seed(11)
    small = collections.OrderedDict(a=torch.randn(2, 3, generator=g), b=torch.arange(3))
    files += save_both(small, "small")
    rezip(OUT / "small_zip.pt", OUT / "rezipped.pt", prefix="mymodel")
    files.append("rezipped.pt")
    rezip(OUT / "small_zip.pt", OUT / "byteorder_big.pt", byteorder=b"big")
    rezip(OUT / "small_zip.pt", OUT / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    torch.save({"w": torch.zeros(2), "x": Evil(os.system, "echo pwned")}, OUT / "hostile_system.pt")
    torch.save(
        {"w": torch.zeros(2), "x": Evil(eval, "print('pwned')")},
        OUT / "hostile_eval_legacy.pt",
        _use_new_zipfile_serialization=False,
    )
    torch.save(torch.nn.Linear(2, 2), OUT / "module_zip.pt")
    exp = {f: expected(OUT / f) for f in files}
    (OUT / "expected.json").write_text(json.dumps(exp, separators=(",", ":")) + "\n")
    (OUT / "efficientnet.json").write_text(json.dumps(effnet_fixture(), separators=(",", ":")) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
