#!/usr/bin/env python3
"""Reference fixtures for kiln's optimizers and LR schedulers, computed with PyTorch.

Writes crates/kiln-nn/tests/fixtures/optim/*.json; crates/kiln-nn/tests/optim_parity.rs replays
each one in kiln and checks every parameter after every step (max abs diff <= 1e-6 in f32).

Run (from the repository root):

    /work/venvs/torch/bin/python scripts/make_optim_fixtures.py

To create such a virtual environment from PyPI (the CPU wheel is enough):

    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install --upgrade pip
    /work/venvs/torch/bin/pip install torch numpy   # from PyPI
    # or simply: /work/venvs/torch/bin/pip install torch

Each fixture holds:
  - "optimizer": {"kind", "groups": [{"params": [names], "config": {...}}]}; config keys are
    the field names of kiln's config structs (lr, betas, eps, weight_decay, momentum, ...);
  - "scheduler": null or {"kind", "args": {...}} (kiln scheduler name and its arguments);
  - "params": [{"name", "shape", "init"}] with fixed f32 initial values;
  - "steps": for each of 20 steps, the synthetic gradients set before `optimizer.step()`, the
    group lrs (and momenta) in effect for that step, the metric given to ReduceLROnPlateau, and
    every parameter after the step.
Gradients are a fixed function of (step, element index), independent of the parameters.
Floats are written with the shortest decimal that reads back as the same f32.
"""

import json
import math
import os
import struct
from pathlib import Path

import torch

STEPS = 20
OUT = Path(__file__).resolve().parent.parent / "crates/kiln-nn/tests/fixtures/optim"

PARAMS = [
    ("w", [2, 3], [0.5, -1.25, 2.0, 0.75, -0.3, 1.1]),
    ("b", [3], [0.1, -0.2, 0.3]),
]


def f32(x: float) -> float:
    """The shortest decimal that reads back as the float32 value of `x`."""
    bits = struct.pack("<f", x)
    if math.isnan(x) or math.isinf(x):
        raise ValueError("non-finite value in a fixture")
    for p in range(1, 10):
        s = "%.*g" % (p, x)
        if struct.pack("<f", float(s)) == bits:
            return float(s)
    return float(struct.unpack("<f", bits)[0])


def flat(t: torch.Tensor):
    return [f32(v) for v in t.detach().reshape(-1).tolist()]


def grad_for(step: int, name: str, n: int, shape):
    off = 0 if name == "w" else 7
    vals = [
        0.8 * math.sin(0.7 * (step + 1) + 1.3 * (i + off)) + 0.15 * math.cos(0.31 * step * (i + 1))
        for i in range(n)
    ]
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, foreach=False),
    "adam": lambda groups: torch.optim.Adam(groups, foreach=False),
    "adamw": lambda groups: torch.optim.AdamW(groups, foreach=False),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, foreach=False),
    # torch fills Adagrad's `sum` from the constructor argument, ignoring a per-group value.
    "adagrad": lambda groups: torch.optim.Adagrad(
        groups, foreach=False, initial_accumulator_value=groups[0].get("initial_accumulator_value", 0.0)
    ),
}


def torch_group(params, cfg):
    g = {"params": params}
    for k, v in cfg.items():
        g[k] = tuple(v) if k == "betas" else v
    return g


def cosine_warmup_lambda(base, warmup, t_max, eta_min):
    def f(e):
        if e < warmup:
            return e / warmup
        progress = min(1.0, (e - warmup) / max(1, t_max - warmup))
        return (eta_min + (base - eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))) / base

    return f


def linear_warmup_lambda(warmup, total):
    def f(e):
        if e < warmup:
            return e / max(1, warmup)
        return max(0.0, (total - e) / max(1, total - warmup))

    return f


def make_scheduler(opt, spec):
    if spec is None:
        return None
    kind, a = spec["kind"], spec["args"]
    S = torch.optim.lr_scheduler
    if kind == "StepLR":
        return S.StepLR(opt, a["step_size"], a["gamma"])
    if kind == "MultiStepLR":
        return S.MultiStepLR(opt, a["milestones"], a["gamma"])
    if kind == "ExponentialLR":
        return S.ExponentialLR(opt, a["gamma"])
    if kind == "CosineAnnealingLR":
        if a["warmup_steps"] == 0:
            return S.CosineAnnealingLR(opt, a["t_max"], a["eta_min"])
        fns = [
            cosine_warmup_lambda(g["lr"], a["warmup_steps"], a["t_max"], a["eta_min"])
            for g in opt.param_groups
        ]
        return S.LambdaLR(opt, fns)
    if kind == "LinearWarmupDecayLR":
        return S.LambdaLR(opt, linear_warmup_lambda(a["warmup_steps"], a["total_steps"]))
    if kind == "OneCycleLR":
        return S.OneCycleLR(
            opt,
            max_lr=a["max_lr"],
            total_steps=a["total_steps"],
            pct_start=a["pct_start"],
            anneal_strategy=a["anneal"],
            three_phase=a["three_phase"],
        )
    if kind == "ReduceLROnPlateau":
        return S.ReduceLROnPlateau(
            opt,
            mode=a["mode"],
            factor=a["factor"],
            patience=a["patience"],
            threshold=a["threshold"],
            threshold_mode=a["threshold_mode"],
            cooldown=a["cooldown"],
            min_lr=a["min_lr"],
        )
    raise ValueError(kind)


def momentum_of(group):
    if "betas" in group:
        return group["betas"][0]
    return group.get("momentum")


def run(name, kind, groups, scheduler=None, metrics=None):
    params = {
        n: torch.tensor(init, dtype=torch.float32).reshape(shape).requires_grad_(True)
        for n, shape, init in PARAMS
    }
    opt = OPTIMIZERS[kind]([torch_group([params[n] for n in g["params"]], g["config"]) for g in groups])
    sched = make_scheduler(opt, scheduler)
    steps = []
    for k in range(STEPS):
        lrs = [g["lr"] for g in opt.param_groups]
        momenta = [momentum_of(g) for g in opt.param_groups]
        grads = {}
        for n, shape, init in PARAMS:
            g = grad_for(k, n, len(init), shape)
            params[n].grad = g.clone()
            grads[n] = flat(g)
        opt.step()
        entry = {"grads": grads, "lrs": lrs, "momenta": momenta}
        if sched is not None:
            if metrics is not None:
                entry["metric"] = metrics[k]
                sched.step(metrics[k])
            else:
                sched.step()
        entry["params"] = {n: flat(p) for n, p in params.items()}
        steps.append(entry)
    fixture = {
        "name": name,
        "torch_version": torch.__version__,
        "optimizer": {"kind": kind, "groups": groups},
        "scheduler": scheduler,
        "params": [{"name": n, "shape": s, "init": [f32(v) for v in i]} for n, s, i in PARAMS],
        "steps": steps,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"{path.name}: {path.stat().st_size} bytes")


def one(kind, **cfg):
    return [{"params": ["w", "b"], "config": cfg}]


def two(kind, cfg_w, cfg_b):
    return [{"params": ["w"], "config": cfg_w}, {"params": ["b"], "config": cfg_b}]


def main():
    torch.set_num_threads(1)
    for old in OUT.glob("*.json"):
        old.unlink()
    # Optimizers.
    run("sgd_plain", "sgd", one("sgd", lr=0.1))
    run("sgd_momentum", "sgd", one("sgd", lr=0.05, momentum=0.9))
    run("sgd_nesterov", "sgd", one("sgd", lr=0.05, momentum=0.9, nesterov=True))
    run("sgd_weight_decay", "sgd", one("sgd", lr=0.1, momentum=0.5, weight_decay=0.05))
    run("sgd_dampening", "sgd", one("sgd", lr=0.05, momentum=0.9, dampening=0.3))
    run("sgd_maximize", "sgd", one("sgd", lr=0.05, momentum=0.9, maximize=True))
    run("adam", "adam", one("adam", lr=0.01))
    run("adam_amsgrad", "adam", one("adam", lr=0.02, amsgrad=True, weight_decay=0.01))
    run("adamw", "adamw", one("adamw", lr=0.01, weight_decay=0.1))
    run("adamw_amsgrad", "adamw", one("adamw", lr=0.01, betas=[0.8, 0.95], amsgrad=True))
    run("rmsprop", "rmsprop", one("rmsprop", lr=0.01))
    run(
        "rmsprop_centered_momentum",
        "rmsprop",
        one("rmsprop", lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01),
    )
    run(
        "adagrad",
        "adagrad",
        one("adagrad", lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    )
    run(
        "adam_two_groups",
        "adam",
        two("adam", {"lr": 0.01}, {"lr": 0.001, "betas": [0.8, 0.99], "weight_decay": 0.1}),
    )
    run("sgd_two_groups", "sgd", two("sgd", {"lr": 0.1, "momentum": 0.9}, {"lr": 0.02}))

    # Schedulers, each over two SGD groups (momentum 0.9) unless stated.
    sgd2 = two("sgd", {"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.9})
    run("sched_step_lr", "sgd", sgd2, {"kind": "StepLR", "args": {"step_size": 5, "gamma": 0.5}})
    run(
        "sched_multistep_lr",
        "sgd",
        sgd2,
        {"kind": "MultiStepLR", "args": {"milestones": [3, 8, 15], "gamma": 0.3}},
    )
    run("sched_exponential_lr", "sgd", sgd2, {"kind": "ExponentialLR", "args": {"gamma": 0.9}})
    run(
        "sched_cosine",
        "sgd",
        sgd2,
        {"kind": "CosineAnnealingLR", "args": {"t_max": 8, "eta_min": 0.001, "warmup_steps": 0}},
    )
    run(
        "sched_cosine_warmup",
        "sgd",
        sgd2,
        {"kind": "CosineAnnealingLR", "args": {"t_max": 16, "eta_min": 0.001, "warmup_steps": 4}},
    )
    run(
        "sched_linear_warmup_decay",
        "sgd",
        sgd2,
        {"kind": "LinearWarmupDecayLR", "args": {"warmup_steps": 5, "total_steps": 18}},
    )
    one_cycle = {"total_steps": 20, "pct_start": 0.3, "anneal": "cos", "three_phase": False}
    run(
        "sched_one_cycle_sgd",
        "sgd",
        sgd2,
        {"kind": "OneCycleLR", "args": {"max_lr": [0.2, 0.1], **one_cycle}},
    )
    run(
        "sched_one_cycle_adam",
        "adam",
        two("adam", {"lr": 0.01}, {"lr": 0.001}),
        {"kind": "OneCycleLR", "args": {"max_lr": [0.01, 0.005], **one_cycle}},
    )
    run(
        "sched_one_cycle_three_phase_linear",
        "sgd",
        sgd2,
        {
            "kind": "OneCycleLR",
            "args": {**one_cycle, "max_lr": [0.2, 0.1], "pct_start": 0.25, "anneal": "linear", "three_phase": True},
        },
    )
    metrics = [1.0, 0.9, 0.85, 0.849, 0.85, 0.86, 0.7, 0.69, 0.695, 0.7,
               0.71, 0.72, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    run(
        "sched_plateau_min",
        "sgd",
        sgd2,
        {
            "kind": "ReduceLROnPlateau",
            "args": {"mode": "min", "factor": 0.5, "patience": 2, "threshold": 0.01,
                     "threshold_mode": "rel", "cooldown": 1, "min_lr": [0.02, 0.01]},
        },
        metrics,
    )
    accuracy = [0.1, 0.3, 0.35, 0.36, 0.5, 0.52, 0.55, 0.7, 0.7, 0.71,
                0.72, 0.9, 0.9, 0.95, 0.96, 0.97, 0.98, 1.2, 1.2, 1.2]
    run(
        "sched_plateau_max_abs",
        "sgd",
        sgd2,
        {
            "kind": "ReduceLROnPlateau",
            "args": {"mode": "max", "factor": 0.3, "patience": 1, "threshold": 0.1,
                     "threshold_mode": "abs", "cooldown": 0, "min_lr": [0.0, 0.0]},
        },
        accuracy,
    )


if __name__ == "__main__":
    main()
