#!/usr/bin/env python3
"""Times kiln and PyTorch on the same CPU workloads, in the same run, and prints a table.

kiln's side is `cargo run --release --example bench_core` (one JSON object on stdout); PyTorch's
side is timed here with the same sizes, thread counts, warm-up and median-of-N.

Python with torch, in order of preference:
  1. the interpreter running this script, if it can import torch;
  2. $KILN_BENCH_PYTHON (an existing python with torch, e.g. /work/venvs/torch/bin/python);
  3. the virtualenv .venv-bench/ at the repository root (ignored by git), created on first use
     with torch, transformers and peft from PyPI.

Usage: scripts/bench_vs_torch.py [--suite core|bert] [--reps N] [--rounds R] [--threads 1,2]
                                 [--quick] [--peak-per-core GFLOPS] [--json FILE]

`--suite bert` (default `core`) times all-MiniLM-L6-v2 instead: kiln's
`cargo run --release --example bench_bert` against transformers' BertForSequenceClassification
(2 labels) loaded from the same directory, with the same token ids, thread counts and f32 weights:
eval-mode forward under no_grad for [32, 128] (sentences/s) and [1, 16] (latency), and one
train-mode fine-tuning step [16, 128] (cross-entropy, backward, AdamW lr 2e-5, zero_grad), in
full and with LoRA (r 8, alpha 16 on query/value, classifier trained; peft on the PyTorch side). Each
workload of each side runs in its own process, whose peak RSS (ru_maxrss from wait4, taken by
a small launcher process) is reported.

       scripts/bench_vs_torch.py --suite llm [--threads 1,2] [--prompt-tokens 128]
                                 [--new-tokens 64] [--llm-reps 3] [--quick] [--json FILE]

`--suite llm`: SmolLM2-135M-Instruct (Q4_1 GGUF, scripts/fetch_models.sh smollm2): prompt
processing (tokens/s) and greedy decoding (tokens/s) in kiln (`--example bench_llm`, quantised
weights with 8-bit and with f32 activations), PyTorch + transformers (the GGUF dequantised to
f32) and llama.cpp (PyPI llama-cpp-python, built from source for this CPU on first use in the
git-ignored .venv-llama/ at the repository root), each in its own process (peak RSS from
wait4), same token ids, thread counts and token counts. Prints a table with the ratios.

With --rounds R > 1 the two sides alternate R times and each workload keeps its best median:
on a shared, noisy machine this compares both at their least disturbed moments. In the bert
suite the two sides of each workload run back to back within a round, and the table also gives
the median (and range) of the per-round ratios, whose pairs saw the same spell of the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-bench"
# f32 FMA peak of one core of the project's machine (AMD EPYC, AVX2 + FMA, no AVX-512), measured
# with a register-only loop of 12 independent 256-bit FMA chains: 93.2 GFLOP/s on one core,
# 182-187 on two (2026-11-28). Override with --peak-per-core on other machines.
DEFAULT_PEAK_PER_CORE = 93.2


def ensure_torch():
    """Re-executes this script under a python that has torch, if this one does not."""
    try:
        import torch  # noqa: F401

        return
    except ImportError:
        pass
    if os.environ.get("KILN_BENCH_REEXEC"):
        sys.exit(f"bench_vs_torch: torch is not importable from {sys.executable}")
    python = os.environ.get("KILN_BENCH_PYTHON")
    if not python:
        python = str(VENV / "bin" / "python")
        if not Path(python).exists():
            print(f"bench_vs_torch: creating {VENV} with CPU torch ...", file=sys.stderr)
            subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
            subprocess.check_call(
                [python, "-m", "pip", "install", "--upgrade", "pip"], stdout=sys.stderr
            )
            subprocess.check_call(
                [python, "-m", "pip", "install", "torch", "numpy", "transformers", "peft"],
                stdout=sys.stderr,
            )
    env = dict(os.environ, KILN_BENCH_REEXEC="1")
    os.execve(python, [python, str(Path(__file__).resolve()), *sys.argv[1:]], env)


def run_kiln(args):
    """Builds and runs the kiln side; returns its parsed JSON."""
    cmd = [
        "cargo",
        "run",
        "--quiet",
        "--release",
        "-p",
        "kiln",
        "--example",
        "bench_core",
        "--",
        "--reps",
        str(args.reps),
        "--threads",
        ",".join(map(str, args.threads)),
    ]
    if args.quick:
        cmd.append("--quick")
    print("bench_vs_torch: " + " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = [line for line in out.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1])


def timed(warmup, reps, per_call, f):
    """(median, min) seconds per operation over `reps` timed calls of f, after warm-up."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) / per_call)
    return statistics.median(times), min(times)


def run_torch(args):
    """Times the bench_core workloads in PyTorch; returns results in bench_core's format."""
    import torch

    results = []
    reps = max(1, args.reps)
    sizes = [256, 512] if args.quick else [1024, 2048]
    for n in sizes:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        n_reps = max(3, -(-reps // 3)) if n >= 2048 else reps
        for t in args.threads:
            torch.set_num_threads(t)
            with torch.no_grad():
                med, mn = timed(2, n_reps, 1, lambda: torch.matmul(a, b))
            results.append(
                dict(name=f"matmul_f32_{n}", threads=t, median_s=med, min_s=mn,
                     reps=n_reps, gflops=2 * n**3 / med / 1e9)
            )

    torch.set_num_threads(1)
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4)
    inner = 1_000 if args.quick else 10_000

    def tiny():
        for _ in range(inner):
            a + b

    med, mn = timed(2, reps, inner, tiny)
    results.append(dict(name="add_f32_4_recorded", threads=1, median_s=med, min_s=mn,
                        reps=reps, gflops=None))

    n = 1 << 20 if args.quick else 1 << 24
    a = torch.randn(n)
    b = torch.randn(n)
    for op, f in (("add", lambda: torch.add(a, b)), ("exp", lambda: torch.exp(a)),
                  ("gelu", lambda: torch.nn.functional.gelu(a))):
        for t in args.threads:
            torch.set_num_threads(t)
            med, mn = timed(2, reps, 1, f)
            results.append(dict(name=f"{op}_f32_{n >> 20}M", threads=t, median_s=med,
                                min_s=mn, reps=reps, gflops=None))

    # One training step of MLP 784-256-256-10, batch 64, Adam (the same workload as bench_core).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(64, 784)
    y = torch.arange(64) % 10
    inner = 5 if args.quick else 50

    def mlp_steps():
        for _ in range(inner):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

    for t in args.threads:
        torch.set_num_threads(t)
        med, mn = timed(2, reps, inner, mlp_steps)
        results.append(dict(name="mlp_adam_step_b64", threads=t, median_s=med, min_s=mn,
                            reps=reps, gflops=None))
    # The two convolutions of the Fashion-MNIST CNN, forward + backward (as in bench_core).
    convs = [("conv2d_1x32_28_b64", 1, 32, 28, False), ("conv2d_32x64_14_b64", 32, 64, 14, True)]
    for name, cin, cout, side, input_grad in convs:
        x = torch.randn(64, cin, side, side, requires_grad=input_grad)
        w = (torch.randn(cout, cin, 3, 3) * 0.1).requires_grad_()
        bias = torch.zeros(cout, requires_grad=True)
        inner = 2 if args.quick else 10

        def conv_steps():
            for _ in range(inner):
                torch.nn.functional.conv2d(x, w, bias, padding=1).sum().backward()
                x.grad = w.grad = bias.grad = None

        for t in args.threads:
            torch.set_num_threads(t)
            med, mn = timed(2, reps, inner, conv_steps)
            results.append(dict(name=name, threads=t, median_s=med, min_s=mn, reps=reps,
                                gflops=3 * 2 * 64 * cout * side * side * cin * 9 / med / 1e9))
    return dict(framework="torch", version=torch.__version__, results=results)


BERT_WORKLOADS = ["minilm_fwd_b32_s128", "minilm_fwd_b1_s16", "minilm_train_step_b16_s128",
                  "minilm_lora_step_b16_s128"]


def minilm_dir():
    """all-MiniLM-L6-v2's directory: $KILN_MODEL_DIR or <repo>/.cache/models, fetched if missing."""
    base = Path(os.environ.get("KILN_MODEL_DIR") or ROOT / ".cache" / "models")
    d = base / "all-MiniLM-L6-v2"
    if not (d / "model.safetensors").exists() or not (d / "config.json").exists():
        subprocess.check_call([str(ROOT / "scripts" / "fetch_models.sh"), "minilm"], cwd=ROOT)
    return d


# Starts a command and writes "exit-code peak-RSS-KiB" of it (wait4's rusage) to argv[1]. It
# runs in a small process of its own: Linux carries a parent's peak RSS at fork into the child's
# ru_maxrss, so a command forked straight from this script (which has imported torch, ~500 MB)
# could never report less than that.
MEASURE = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
code = os.waitstatus_to_exitcode(status)
open(sys.argv[1], "w").write(f"{code} {usage.ru_maxrss}")
sys.exit(code)
"""


def run_measured(cmd, env=None, cwd=ROOT):
    """Runs cmd; returns (stdout, peak RSS in bytes of that process)."""
    import tempfile

    with tempfile.NamedTemporaryFile("r") as report:
        p = subprocess.run([sys.executable, "-S", "-c", MEASURE, report.name, *map(str, cmd)],
                           stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
        code, rss_kib = (int(v) for v in report.read().split())
    if code != 0 or p.returncode != 0:
        hint = ""
        if code == -4:
            hint = (" (SIGILL: an instruction this CPU does not run; for llama.cpp see"
                    " KILN_LLAMA_CMAKE_ARGS in this script)")
        sys.exit(f"bench_vs_torch: {' '.join(map(str, cmd))} failed with {code}{hint}")
    return p.stdout, rss_kib * 1024


def last_json(out):
    lines = [line for line in out.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1])


def bench_bert_binary():
    """Builds examples/bench_bert in release mode; returns the executable's path."""
    cmd = ["cargo", "build", "--release", "-p", "kiln", "--example", "bench_bert",
           "--message-format=json"]
    print("bench_vs_torch: " + " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    exe = None
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg["target"]["name"] == "bench_bert":
            exe = msg["executable"]
    if exe is None:
        sys.exit("bench_vs_torch: cargo did not report the bench_bert executable")
    return exe


def run_bert_process(cmd, args):
    """One BERT workload in its own process (`cmd` plus the shared flags): its JSON, with the
    process's peak RSS on each result."""
    cmd = cmd + ["--reps", str(args.reps), "--threads", ",".join(map(str, args.threads))]
    if args.quick:
        cmd.append("--quick")
    out, rss = run_measured(cmd, cwd=ROOT)
    res = last_json(out)
    for r in res["results"]:
        r["peak_rss"] = rss
    return res


def run_kiln_bert(args, exe, name):
    """bench_bert's workload `name`, in its own process."""
    return run_bert_process([exe, "--only", name], args)


def minilm_ids(torch, b, length):
    """The token ids bench_bert uses: (7·i + 3·j) mod 30000 + 1000."""
    i = torch.arange(b).unsqueeze(1)
    j = torch.arange(length).unsqueeze(0)
    return (7 * i + 3 * j) % 30000 + 1000


def torch_bert_worker(args):
    """One BERT workload in PyTorch (in this process); prints bench_bert's JSON format."""
    import torch
    from transformers import BertForSequenceClassification

    name = args.torch_bert
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)
    model = model.float()
    reps = 1 if args.quick else max(1, args.reps)
    warmup = 1 if args.quick else 2
    results = []
    for t in args.threads:
        torch.set_num_threads(t)
        if name.startswith("minilm_fwd"):
            b, length = (32, 128) if name == "minilm_fwd_b32_s128" else (1, 16)
            model.eval()
            x = minilm_ids(torch, b, length)

            def fwd():
                with torch.no_grad():
                    model(input_ids=x)

            med, mn = timed(warmup, reps, 1, fwd)
        else:
            b = 16
            if name == "minilm_lora_step_b16_s128" and not hasattr(model, "peft_config"):
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(
                    r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                    task_type="SEQ_CLS"))
            model.train()
            x = minilm_ids(torch, b, 128)
            y = torch.arange(b) % 2
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)

            def step():
                logits = model(input_ids=x).logits
                torch.nn.functional.cross_entropy(logits, y).backward()
                opt.step()
                opt.zero_grad()

            med, mn = timed(warmup, reps, 1, step)
        results.append(dict(name=name, threads=t, median_s=med, min_s=mn, reps=reps,
                            sent_per_s=b / med))
    print(json.dumps(dict(framework="torch", version=torch.__version__, results=results)))


def run_torch_bert(args, name):
    """BERT workload `name` in PyTorch, in its own python process (this script as --torch-bert
    worker)."""
    return run_bert_process([sys.executable, str(Path(__file__).resolve()), "--torch-bert", name],
                            args)


def fmt_mb(b):
    return f"{b / 1e6:.0f} MB" if b else "-"


def bert_table(kiln, torch_res, paired):
    by_key = lambda res: {(r["name"], r["threads"]): r for r in res["results"]}
    k, t = by_key(kiln), by_key(torch_res)
    keys = list(dict.fromkeys([*t.keys(), *k.keys()]))
    head = ["workload", "thr", "kiln", "torch", "kiln/torch time", "paired ratios",
            "kiln sent/s", "torch sent/s", "kiln RSS", "torch RSS", "kiln/torch RSS"]
    rows = []
    for key in keys:
        kr, tr = k.get(key), t.get(key)
        km = kr["median_s"] if kr else None
        tm = tr["median_s"] if tr else None
        krss = kr.get("peak_rss") if kr else None
        trss = tr.get("peak_rss") if tr else None
        pairs = paired.get(key, [])
        rows.append([
            key[0], str(key[1]), fmt_time(km), fmt_time(tm),
            f"{km / tm:.2f}" if km and tm else "-",
            (f"{statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"
             if pairs else "-"),
            f"{kr['sent_per_s']:.1f}" if kr else "-",
            f"{tr['sent_per_s']:.1f}" if tr else "-",
            fmt_mb(krss), fmt_mb(trss),
            f"{krss / trss:.2f}" if krss and trss else "-",
        ])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def main_bert(args):
    """The `--suite bert` run: per round, each workload on both sides back to back (kiln first
    in even rounds, PyTorch first in odd ones); then the table. A workload's two sides run seconds apart, so a slow spell of the shared machine
    tends to hit both; its paired ratios (kiln / torch within each round) show the spread."""
    exe = bench_bert_binary()
    kiln, torch_res = None, None
    paired = {}
    for round_ in range(max(1, args.rounds)):
        for name in BERT_WORKLOADS:
            # Odd rounds run PyTorch first, so a drift of the machine's speed within a round
            # does not always fall on the same side.
            if round_ % 2:
                t_res = run_torch_bert(args, name)
                k_res = run_kiln_bert(args, exe, name)
            else:
                k_res = run_kiln_bert(args, exe, name)
                t_res = run_torch_bert(args, name)
            args.threads = [t for t in args.threads if t <= k_res["max_threads"]]
            t_by = {(r["name"], r["threads"]): r for r in t_res["results"]}
            for r in k_res["results"]:
                key = (r["name"], r["threads"])
                if key in t_by:
                    paired.setdefault(key, []).append(r["median_s"] / t_by[key]["median_s"])
            kiln = merge_best(kiln, k_res)
            torch_res = merge_best(torch_res, t_res)
    print(bert_table(kiln, torch_res, paired))
    print(f"\ntorch {torch_res['version']} (transformers BertForSequenceClassification); "
          f"kiln/torch < 1 means kiln is faster / smaller; medians of {args.reps} runs, best "
          f"of {max(1, args.rounds)} round(s); paired ratios: median (min-max) over the rounds "
          f"of kiln's median / torch's, each pair run back to back; RSS: peak of the process "
          f"running that workload.")
    if args.json:
        args.json.write_text(json.dumps({"kiln": kiln, "torch": torch_res,
                                         "paired_ratios": {f"{n}@{t}": v for (n, t), v
                                                           in paired.items()}}, indent=2))


def merge_best(best, res):
    """`best` with each workload of `res` whose median beats it (or is new)."""
    if best is None:
        return res
    index = {(r["name"], r["threads"]): i for i, r in enumerate(best["results"])}
    for r in res["results"]:
        i = index.get((r["name"], r["threads"]))
        if i is None:
            best["results"].append(r)
        elif r["median_s"] < best["results"][i]["median_s"]:
            best["results"][i] = r
    return best


def fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def table(kiln, torch_res, peak_per_core):
    by_key = lambda res: {(r["name"], r["threads"]): r for r in res["results"]}
    k, t = by_key(kiln), by_key(torch_res)
    keys = list(dict.fromkeys([*t.keys(), *k.keys()]))
    head = ["workload", "thr", "kiln", "torch", "torch/kiln", "kiln GF/s", "torch GF/s",
            "kiln %peak", "torch %peak"]
    rows = []
    for key in keys:
        kr, tr = k.get(key), t.get(key)
        name, threads = key
        km = kr["median_s"] if kr else None
        tm = tr["median_s"] if tr else None
        speed = f"{tm / km:.2f}x" if km and tm else "-"
        peak = peak_per_core * threads

        def gf(r):
            return f"{r['gflops']:.1f}" if r and r.get("gflops") else "-"

        def pct(r):
            return f"{100 * r['gflops'] / peak:.0f}%" if r and r.get("gflops") else "-"

        rows.append([name, str(threads), fmt_time(km), fmt_time(tm), speed,
                     gf(kr), gf(tr), pct(kr), pct(tr)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------ --suite llm (SmolLM2)

LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_VENV = ROOT / ".venv-llama"
# $KILN_LLAMA_CMAKE_ARGS replaces these. On a VM whose CPU reports AMX, GGML_NATIVE builds AMX
# code that died with SIGILL (2026-11-30); there, build without it, e.g. "-DGGML_NATIVE=OFF
# -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
# (and remove .venv-llama/ to rebuild).
LLAMA_CMAKE_ARGS = os.environ.get(
    "KILN_LLAMA_CMAKE_ARGS", "-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF")


def llm_prompt_ids(n):
    """The prompt every side runs: n deterministic token ids (all inside SmolLM2's vocabulary)."""
    return [(i * 7919 + 13) % 40000 + 100 for i in range(n)]


def llm_gguf_path():
    models = Path(os.environ.get("KILN_MODEL_DIR", ROOT / ".cache" / "models"))
    path = models / "smollm2" / LLM_GGUF
    if not path.exists():
        subprocess.check_call(["bash", str(ROOT / "scripts" / "fetch_models.sh"), "smollm2"],
                              env=dict(os.environ, KILN_MODEL_DIR=str(models)))
    return path


def ensure_llama_cpp():
    """The python of .venv-llama/, with llama-cpp-python built from source for this CPU."""
    python = LLAMA_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"],
                                          capture_output=True).returncode == 0:
        return python
    print(f"bench_vs_torch: building llama-cpp-python into {LLAMA_VENV} (several minutes) ...",
          file=sys.stderr)
    if not python.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(LLAMA_VENV)])
    env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS,
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    subprocess.check_call(["nice", "-n", "19", str(python), "-m", "pip", "install",
                           "--no-cache-dir", "llama-cpp-python", "numpy"],
                          env=env, stdout=sys.stderr)
    return python


def llm_run_measured(cmd, threads, env=None):
    """Runs cmd in its own process with `threads` threads everywhere; returns its last JSON
    line with the process's peak RSS (MiB, from wait4) added."""
    env = dict(env or os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               KILN_NUM_THREADS=str(threads))
    print("bench_vs_torch: " + " ".join(map(str, cmd)), file=sys.stderr)
    out, rss = run_measured(cmd, env=env)
    res = last_json(out)
    res["peak_rss_mib"] = rss / 1048576
    return res


def llm_worker_torch(args, ids):
    """Worker process: PyTorch + transformers on the dequantised GGUF; prints one JSON line."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads[0])
    gguf = llm_gguf_path()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])

    def run():
        with torch.inference_mode():
            t = time.perf_counter()
            out = model(x, use_cache=True, logits_to_keep=1)
            nxt = out.logits[0, -1].argmax()
            prompt_s = time.perf_counter() - t
            past = out.past_key_values
            t = time.perf_counter()
            toks = []
            for _ in range(args.new_tokens):
                toks.append(int(nxt))
                out = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[0, -1].argmax()
            return prompt_s, time.perf_counter() - t, toks

    return llm_worker_finish("pytorch", args, ids, load_s, run,
                             {"version": f"torch {torch.__version__}, transformers "
                                         f"{transformers.__version__}"})


def llm_worker_llama_cpp(args, ids):
    """Worker process: llama.cpp (llama-cpp-python) on the GGUF itself; prints one JSON line."""
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(llm_gguf_path()), n_ctx=1024, n_batch=512,
                          n_threads=args.threads[0], n_threads_batch=args.threads[0],
                          logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax():
        # Without logits_all, eval keeps no scores: read the context's only logits row.
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def run():
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        nxt = last_argmax()
        prompt_s = time.perf_counter() - t
        t = time.perf_counter()
        toks = []
        for _ in range(args.new_tokens):
            toks.append(nxt)
            llm.eval([nxt])
            nxt = last_argmax()
        return prompt_s, time.perf_counter() - t, toks

    return llm_worker_finish("llama.cpp", args, ids, load_s, run,
                             {"version": f"llama-cpp-python {llama_cpp.__version__}"})


def llm_worker_finish(side, args, ids, load_s, run, extra):
    """One warm-up, then the medians of --llm-reps runs, as one JSON line on stdout."""
    _, _, toks = run()
    prompt, decode = [], []
    for _ in range(args.llm_reps):
        p, d, _ = run()
        prompt.append(len(ids) / p)
        decode.append(args.new_tokens / max(d, 1e-12))
    print(json.dumps({"side": side, "threads": args.threads[0], "prompt_tokens": len(ids),
                      "new_tokens": args.new_tokens, "load_s": load_s,
                      "prompt_tok_s": statistics.median(prompt),
                      "decode_tok_s": statistics.median(decode), "tokens": toks, **extra}))


def kiln_example_binary(name):
    """Builds a release example of the kiln crate; returns the binary's path."""
    subprocess.check_call(["cargo", "build", "--quiet", "--release", "-p", "kiln", "--example",
                           name], cwd=ROOT)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    return target / "release" / "examples" / name


def run_llm_suite(args):
    """--suite llm: every side in its own process, then a table."""
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.llm_reps = 16, 4, 1
    ids = llm_prompt_ids(args.prompt_tokens)
    gguf = llm_gguf_path()
    kiln_bin = kiln_example_binary("bench_llm")
    llama_python = ensure_llama_cpp()
    me = Path(__file__).resolve()
    common = ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
              "--llm-reps", str(args.llm_reps)]
    worker_env = dict(os.environ, KILN_BENCH_REEXEC="1")
    results = []
    for t in args.threads:
        for weights in ["q8", "quant"]:
            r = llm_run_measured([kiln_bin, "--gguf", gguf, "--weights", weights, "--threads", t,
                              "--prompt-tokens", args.prompt_tokens, "--new-tokens",
                              args.new_tokens, "--reps", args.llm_reps], t)
            r["side"] = f"kiln ({'q8' if weights == 'q8' else 'f32'} act)"
            results.append(r)
        results.append(llm_run_measured([sys.executable, me, "--llm-worker", "torch", "--threads",
                                     str(t), *common], t, worker_env))
        results.append(llm_run_measured([llama_python, me, "--llm-worker", "llama.cpp",
                                     "--threads", str(t), *common], t, worker_env))
    print(llm_table(results))
    versions = sorted({r["version"] for r in results if "version" in r})
    print(f"\n{'; '.join(versions)}. Prompt: {args.prompt_tokens} tokens; decode: "
          f"{args.new_tokens} greedy tokens; medians of {args.llm_reps} runs after a warm-up. "
          "Ratios are kiln tok/s over the other side's: > 1 means kiln is faster.")
    if args.json:
        args.json.write_text(json.dumps({"llm": results}, indent=2))


def llm_table(results):
    """Markdown table: tok/s, peak RSS and kiln's ratios against llama.cpp and PyTorch."""
    by = {(r["side"], r["threads"]): r for r in results}
    head = ["side", "threads", "prompt tok/s", "decode tok/s", "peak RSS MiB",
            "prompt kiln/llama.cpp", "decode kiln/llama.cpp", "prompt kiln/torch",
            "decode kiln/torch"]
    rows = []
    for r in results:
        cells = [r["side"], str(r["threads"]), f"{r['prompt_tok_s']:.1f}",
                 f"{r['decode_tok_s']:.1f}", f"{r['peak_rss_mib']:.0f}"]
        for other in ["llama.cpp", "pytorch"]:
            o = by.get((other, r["threads"]))
            for key in ["prompt_tok_s", "decode_tok_s"]:
                cells.append(f"{r[key] / o[key]:.2f}" if o and r["side"].startswith("kiln")
                             else "")
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate kiln and torch this many times, keep each best median")
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--peak-per-core", type=float, default=DEFAULT_PEAK_PER_CORE,
                        help="f32 GFLOP/s peak of one core, for the %%peak columns")
    parser.add_argument("--json", type=Path, help="also write both result sets to this file")
    parser.add_argument("--suite", choices=["core", "bert", "llm"], default="core",
                        help="core: the kernel workloads (default); bert: MiniLM (bench_bert); "
                             "llm: SmolLM2 generation")
    parser.add_argument("--torch-bert", choices=BERT_WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="llm: prompt length")
    parser.add_argument("--new-tokens", type=int, default=64, help="llm: greedy tokens decoded")
    parser.add_argument("--llm-reps", type=int, default=3, help="llm: timed runs (median)")
    parser.add_argument("--llm-worker", choices=["torch", "llama.cpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.llm_worker:
        ids = llm_prompt_ids(args.prompt_tokens)
        worker = llm_worker_torch if args.llm_worker == "torch" else llm_worker_llama_cpp
        return worker(args, ids)
    if args.suite == "llm":
        ensure_torch()
        return run_llm_suite(args)

    ensure_torch()
    if args.torch_bert:
        torch_bert_worker(args)
        return
    if args.suite == "bert":
        main_bert(args)
        return
    kiln, torch_res = None, None
    for _ in range(max(1, args.rounds)):
        kiln = merge_best(kiln, run_kiln(args))
        args.threads = [t for t in args.threads if t <= kiln["max_threads"]]
        torch_res = merge_best(torch_res, run_torch(args))
    print(table(kiln, torch_res, args.peak_per_core))
    print(f"\ntorch {torch_res['version']}; torch/kiln > 1 means kiln is faster; "
          f"%peak against {args.peak_per_core:g} GFLOP/s per thread; medians of "
          f"{args.reps} runs (2048: fewer), best of {max(1, args.rounds)} round(s).")
    if args.json:
        args.json.write_text(json.dumps({"kiln": kiln, "torch": torch_res}, indent=2))


if __name__ == "__main__":
    main()
