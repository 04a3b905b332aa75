"""Writes PyTorch reference fixtures for kiln's pooling and batch-norm layers
(crates/kiln-nn/tests/fixtures/poolbn/).

Pools: a layer is applied to a fixed input and `sum(output * gw)` (gw: fixed random weights) is
back-propagated; the fixture holds the config, input, output, gw and input gradient.

Batch norm: a layer with random affine parameters takes three training steps on three inputs
(each step: output, gw, input gradient and parameter gradients are recorded; running statistics
update), then the state after those steps is recorded, then one step in eval mode.

Every tensor is {"shape": [...], "data": [...]} (f32 values written exactly, integers as ints).
`tests/poolbn_parity.rs` loads them into kiln layers and compares.

Run:  /work/venvs/torch/bin/python scripts/make_poolbn_fixtures.py
(the environment is `pip install torch numpy` from PyPI in a venv).
"""

import json
import os

import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "kiln-nn", "tests", "fixtures", "poolbn")


def enc(t):
    t = t.detach()
    if t.dtype.is_floating_point:
        data = [float(v) for v in t.to(torch.float32).reshape(-1).tolist()]
    else:
        data = [int(v) for v in t.reshape(-1).tolist()]
    return {"shape": list(t.shape), "data": data}


def write(name, fixture):
    fixture["name"] = name
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(fixture, f)


def run(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    gw = torch.randn(y.shape)
    (y * gw).sum().backward()
    step = {
        "input": enc(x),
        "output": enc(y),
        "gw": enc(gw),
        "input_grad": enc(x.grad),
        "param_grads": {k: enc(p.grad) for k, p in layer.named_parameters()},
    }
    layer.zero_grad()
    return step, y


def pool_case(name, kind, layer, x, config):
    torch.manual_seed(1234)
    step, y = run(layer, x)
    write(name, {"kind": kind, "config": config, **step})
    print(f"{name}: {list(x.shape)} -> {list(y.shape)}")


def bn_case(name, kind, shape, config):
    torch.manual_seed(99)
    c = config["num_features"]
    cls = nn.BatchNorm1d if kind == "bn1d" else nn.BatchNorm2d
    layer = cls(
        c,
        eps=config["eps"],
        momentum=config["momentum"],
        affine=config["affine"],
        track_running_stats=config["track_running_stats"],
    )
    if config["affine"]:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(c) * 0.5 + 1.0)
            layer.bias.copy_(torch.randn(c))
    init_state = {k: enc(v) for k, v in layer.state_dict().items()}
    layer.train()
    steps = []
    for _ in range(3):
        x = torch.randn(*shape) * 2.0 + 0.7
        step, _ = run(layer, x)
        steps.append(step)
    state_after = {k: enc(v) for k, v in layer.state_dict().items()}
    layer.eval()
    eval_step, _ = run(layer, torch.randn(*shape) * 1.5 - 0.3)
    write(
        name,
        {
            "kind": kind,
            "config": config,
            "init_state": init_state,
            "steps": steps,
            "state_after": state_after,
            "eval": eval_step,
        },
    )
    print(f"{name}: {shape}, state {sorted(state_after)}")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    x4 = torch.randn(2, 3, 7, 9)
    x8 = torch.randn(2, 3, 8, 8)
    x3 = torch.randn(2, 3, 11)

    def max2d(k, s=None, p=0, d=1, ceil=False):
        return nn.MaxPool2d(k, s, p, d, ceil_mode=ceil), {
            "kernel": k, "stride": s, "padding": p, "dilation": d, "ceil_mode": ceil}

    def avg2d(k, s=None, p=0, ceil=False, include=True, div=None):
        return nn.AvgPool2d(k, s, p, ceil, include, div), {
            "kernel": k, "stride": s, "padding": p, "ceil_mode": ceil,
            "count_include_pad": include, "divisor_override": div}

    for name, (layer, cfg), x in [
        ("max2d_basic", max2d(2), x8),
        ("max2d_pad_ceil", max2d(3, 2, 1, ceil=True), x4),
        ("max2d_dilation", max2d(3, 1, 1, d=2), x4),
        ("max2d_rect_overlap_unbatched", max2d([3, 2], [2, 1], [1, 0], ceil=True), x4[0]),
        ("max2d_ceil_edge", max2d(2, 2, ceil=True), x4),
    ]:
        pool_case(name, "max2d", layer, x, cfg)
    for name, (layer, cfg), x in [
        ("avg2d_basic", avg2d(2), x8),
        ("avg2d_pad_ceil_include", avg2d(3, 2, 1, ceil=True), x4),
        ("avg2d_pad_ceil_exclude", avg2d(3, 2, 1, ceil=True, include=False), x4),
        ("avg2d_rect_exclude", avg2d([3, 4], [1, 3], [1, 2], ceil=True, include=False), x4),
        ("avg2d_divisor", avg2d(3, 1, 1, div=5), x4[0]),
    ]:
        pool_case(name, "avg2d", layer, x, cfg)
    for name, size, x in [
        ("adaptive_3x2", [3, 2], x4),
        ("adaptive_4x5", [4, 5], x4),
        ("adaptive_global", [1, 1], x8),
        ("adaptive_upsample", [9, 11], x4[0]),
    ]:
        pool_case(name, "adaptive2d", nn.AdaptiveAvgPool2d(size), x, {"output_size": size})
    pool_case("max1d_pad_ceil", "max1d", nn.MaxPool1d(3, 2, 1, ceil_mode=True), x3,
              {"kernel": 3, "stride": 2, "padding": 1, "dilation": 1, "ceil_mode": True})
    pool_case("max1d_dilation_unbatched", "max1d", nn.MaxPool1d(3, 1, 1, dilation=3), x3[0],
              {"kernel": 3, "stride": 1, "padding": 1, "dilation": 3, "ceil_mode": False})
    pool_case("avg1d_exclude", "avg1d", nn.AvgPool1d(4, 3, 2, True, False), x3,
              {"kernel": 4, "stride": 3, "padding": 2, "ceil_mode": True, "count_include_pad": False})
    pool_case("avg1d_basic", "avg1d", nn.AvgPool1d(2), x3,
              {"kernel": 2, "stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True})

    def bn(c, eps=1e-5, momentum=0.1, affine=True, track=True):
        return {"num_features": c, "eps": eps, "momentum": momentum, "affine": affine,
                "track_running_stats": track}

    bn_case("bn2d", "bn2d", (4, 3, 5, 6), bn(3))
    bn_case("bn2d_momentum_none", "bn2d", (4, 3, 5, 6), bn(3, momentum=None))
    bn_case("bn2d_noaffine_eps", "bn2d", (3, 2, 4, 4), bn(2, eps=1e-3, momentum=0.3, affine=False))
    bn_case("bn2d_no_running_stats", "bn2d", (2, 3, 4, 5), bn(3, track=False))
    bn_case("bn1d_2d", "bn1d", (8, 5), bn(5))
    bn_case("bn1d_3d_momentum_none", "bn1d", (4, 3, 7), bn(3, momentum=None))


if __name__ == "__main__":
    main()
