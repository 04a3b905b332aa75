#!/usr/bin/env python3
"""Writes the PyTorch parity fixtures of kiln's losses (crates/kiln-nn/tests/fixtures/loss/).

For every loss configuration it fixes random inputs (seeded), runs torch.nn.functional in
float32, back-propagates a fixed upstream gradient, and stores inputs, targets, options,
loss values and input (and float target) gradients as JSON, one file per loss. The test
crates/kiln-nn/tests/loss_parity.rs replays them through kiln.

Run from the repository root:

    /work/venvs/torch/bin/python scripts/make_loss_fixtures.py

Any Python 3.9+ with torch works. To make such a venv from PyPI:

    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch numpy

(the fixtures in the repository were written with torch 2.x; values are float32, so another
version may differ in the last bits, well inside the test's tolerance).

Encoding: a tensor is {"shape": [...], "dtype": "f32" | "i64", "data": [row-major values]};
each case is {"name", "options", "input", "target", "weight"?, "pos_weight"?,
"grad_output", "output", "grad_input", "grad_target"?}; non-finite values are the strings
"nan", "inf" and "-inf". Options use torch's names
(reduction: "mean" | "sum" | "none" | "batchmean").
"""

import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "kiln-nn", "tests", "fixtures", "loss")


def enc(t):
    if t is None:
        return None
    t = t.detach()
    dtype = {torch.float32: "f32", torch.int64: "i64"}[t.dtype]
    if t.is_floating_point():
        # The shortest decimal that reads back as the same float32.
        # Non-finite values (not JSON numbers) are written as the strings "nan", "inf", "-inf".
        data = [float(str(v)) if np.isfinite(v) else str(v) for v in t.flatten().numpy().astype(np.float32)]
    else:
        data = t.flatten().tolist()
    return {"shape": list(t.shape), "dtype": dtype, "data": data}


class Gen:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.g) * scale

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g)

    def classes(self, c, *shape):
        return torch.randint(0, c, shape, generator=self.g)


def run(fn, name, options, x, target, grad_target, g, **extra):
    """Runs fn(x, target) with x (and a float target when grad_target) requiring grad."""
    x = x.clone().requires_grad_(True)
    if grad_target:
        target = target.clone().requires_grad_(True)
    out = fn(x, target)
    grad_out = g.randn(*out.shape) if out.dim() > 0 else torch.tensor(0.75)
    out.backward(grad_out)
    case = {
        "name": name,
        "options": options,
        "input": enc(x),
        "target": enc(target),
        "grad_output": enc(grad_out),
        "output": enc(out),
        "grad_input": enc(x.grad),
        "grad_target": enc(target.grad) if grad_target else None,
    }
    for k, v in extra.items():
        case[k] = enc(v)
    return case


def write(loss, cases):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{loss}.json")
    with open(path, "w") as f:
        f.write('{"torch": %s, "cases": [\n' % json.dumps(torch.__version__))
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    print(f"{path}: {len(cases)} cases")


def class_cases(g, loss):
    """cross_entropy (logits) or nll_loss (log-probabilities) configurations."""
    cases = []
    ce = loss == "cross_entropy"

    def inp(*shape):
        x = g.randn(*shape, scale=3.0)
        return x if ce else torch.log_softmax(x, dim=1 if x.dim() > 1 else 0)

    def add(name, x, t, reduction="mean", weight=None, ignore_index=-100, smoothing=0.0, grad_target=False):
        opts = {"reduction": reduction, "ignore_index": ignore_index}
        if ce:
            opts["label_smoothing"] = smoothing
            fn = lambda a, b: F.cross_entropy(a, b, weight=weight, ignore_index=ignore_index,
                                              reduction=reduction, label_smoothing=smoothing)
        else:
            fn = lambda a, b: F.nll_loss(a, b, weight=weight, ignore_index=ignore_index, reduction=reduction)
        cases.append(run(fn, name, opts, x, t, grad_target, g, weight=weight))

    w5 = g.rand(5) + 0.25
    t = g.classes(5, 6)
    t_ign = t.clone()
    t_ign[1] = -100
    t_ign[4] = -100
    for red in ["mean", "sum", "none"]:
        add(f"basic_{red}", inp(6, 5), t, red)
        add(f"ignore_weight_{red}", inp(6, 5), t_ign, red, weight=w5)
    add("ignore_index_is_a_class", inp(6, 5), t, "mean", ignore_index=2)
    add("all_ignored_sum", inp(3, 5), torch.full((3,), -100), "sum")
    if ce:
        for red in ["mean", "sum", "none"]:
            add(f"smoothing_{red}", inp(6, 5), t, red, smoothing=0.1)
            add(f"smoothing_weight_ignore_{red}", inp(6, 5), t_ign, red, weight=w5, smoothing=0.25)
    # Spatial dims: [N, C, d1, d2].
    ts = g.classes(4, 2, 3, 2)
    ts[0, 1, 1] = -100
    w4 = g.rand(4) + 0.5
    for red in ["mean", "none"]:
        add(f"spatial_{red}", inp(2, 4, 3, 2), ts, red, weight=w4, smoothing=0.1 if ce else 0.0)
    add("spatial_plain_sum", inp(2, 4, 3, 2), ts.clamp(min=0), "sum")
    # Unbatched [C] input, rank-0 target.
    add("unbatched", inp(5), torch.tensor(3), "mean", weight=w5)
    # Long rows and long spatial runs (past the kernel's 256-element tiles).
    add("long_rows", inp(2, 260), g.classes(260, 2), "mean", smoothing=0.05 if ce else 0.0)
    tl = g.classes(2, 1, 13, 20)
    tl[0, 0, :4] = -100
    add("long_spatial", inp(1, 2, 13, 20), tl, "none")
    if ce:
        # Class-probability targets (differentiable in the target too).
        def probs(*shape):
            return torch.softmax(g.randn(*shape), dim=1 if len(shape) > 1 else 0)

        for red in ["mean", "sum", "none"]:
            add(f"probs_{red}", inp(4, 5), probs(4, 5), red, grad_target=True)
        add("probs_smoothing_weight", inp(4, 5), probs(4, 5), "mean", weight=w5, smoothing=0.2, grad_target=True)
        add("probs_spatial_none", inp(2, 3, 2, 2), probs(2, 3, 2, 2), "none", weight=w5[:3], grad_target=True)
        add("probs_unbatched", inp(5), probs(5), "sum", grad_target=True)
    return cases


def pointwise_cases(g, loss):
    cases = []

    def add(name, fn, opts, x, t, grad_target=True, **extra):
        cases.append(run(fn, name, opts, x, t, grad_target, g, **extra))

    reds = ["mean", "sum", "none"]
    if loss in ("mse_loss", "l1_loss"):
        f = getattr(F, loss)
        for red in reds:
            add(red, lambda a, b, red=red: f(a, b, reduction=red), {"reduction": red},
                g.randn(3, 4), g.randn(3, 4))
        add("rank3", lambda a, b: f(a, b), {"reduction": "mean"}, g.randn(2, 3, 2), g.randn(2, 3, 2))
    elif loss == "huber_loss":
        for delta in [1.0, 0.5, 2.5]:
            for red in reds:
                add(f"delta{delta}_{red}", lambda a, b, red=red, delta=delta: F.huber_loss(a, b, reduction=red, delta=delta),
                    {"reduction": red, "delta": delta}, g.randn(3, 4, scale=2.0), g.randn(3, 4))
    elif loss == "smooth_l1_loss":
        for beta in [1.0, 0.5, 0.0]:
            for red in reds:
                add(f"beta{beta}_{red}", lambda a, b, red=red, beta=beta: F.smooth_l1_loss(a, b, reduction=red, beta=beta),
                    {"reduction": red, "beta": beta}, g.randn(3, 4, scale=2.0), g.randn(3, 4))
    elif loss == "binary_cross_entropy":
        w = g.rand(4) + 0.5
        for red in reds:
            add(f"soft_{red}", lambda a, b, red=red: F.binary_cross_entropy(a, b, reduction=red),
                {"reduction": red}, torch.sigmoid(g.randn(3, 4, scale=2.0)), g.rand(3, 4))
            add(f"weight_{red}", lambda a, b, red=red: F.binary_cross_entropy(a, b, weight=w, reduction=red),
                {"reduction": red}, torch.sigmoid(g.randn(3, 4, scale=2.0)), (g.rand(3, 4) > 0.5).float(),
                weight=w)
        # Exact 0 and 1 inputs: the logs are clamped at -100 (no target gradient there).
        x = torch.sigmoid(g.randn(2, 3))
        x[0, 0], x[1, 2] = 0.0, 1.0
        t = g.rand(2, 3)
        add("clamped_logs", lambda a, b: F.binary_cross_entropy(a, b, reduction="sum"),
            {"reduction": "sum"}, x, t, grad_target=False)
    elif loss == "binary_cross_entropy_with_logits":
        w = g.rand(3, 1) + 0.5
        pw = g.rand(4) * 3 + 0.2
        for red in reds:
            add(f"plain_{red}", lambda a, b, red=red: F.binary_cross_entropy_with_logits(a, b, reduction=red),
                {"reduction": red}, g.randn(3, 4, scale=3.0), g.rand(3, 4))
            add(f"weight_pos_weight_{red}",
                lambda a, b, red=red: F.binary_cross_entropy_with_logits(a, b, weight=w, pos_weight=pw, reduction=red),
                {"reduction": red}, g.randn(3, 4, scale=3.0), g.rand(3, 4), weight=w, pos_weight=pw)
        add("pos_weight_rank3", lambda a, b: F.binary_cross_entropy_with_logits(a, b, pos_weight=pw),
            {"reduction": "mean"}, g.randn(2, 3, 4, scale=3.0), (g.rand(2, 3, 4) > 0.5).float(), pos_weight=pw)
        x = g.randn(2, 4, scale=3.0)
        x[0, 0], x[0, 1], x[1, 2], x[1, 3] = 60.0, -60.0, 30.0, -30.0
        add("large_logits", lambda a, b: F.binary_cross_entropy_with_logits(a, b, pos_weight=pw, reduction="sum"),
            {"reduction": "sum"}, x, g.rand(2, 4), pos_weight=pw)
    elif loss == "kl_div":
        for log_target in [False, True]:
            for red in reds + ["batchmean"]:
                x = torch.log_softmax(g.randn(3, 5), dim=1)
                t = torch.softmax(g.randn(3, 5), dim=1)
                if log_target:
                    t = torch.log(t)
                else:
                    t[1, 2] = 0.0  # xlogy(0, 0) = 0
                add(f"log_target{log_target}_{red}",
                    lambda a, b, red=red, lt=log_target: F.kl_div(a, b, reduction=red, log_target=lt),
                    {"reduction": red, "log_target": log_target}, x, t)
    return cases


def main():
    warnings.filterwarnings("ignore", message="reduction: 'mean' divides")
    torch.set_default_dtype(torch.float32)
    losses = ["cross_entropy", "nll_loss", "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss",
              "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div"]
    for i, loss in enumerate(losses):
        g = Gen(1000 + i)
        if loss in ("cross_entropy", "nll_loss"):
            cases = class_cases(g, loss)
        else:
            cases = pointwise_cases(g, loss)
        write(loss, cases)


if __name__ == "__main__":
    main()
