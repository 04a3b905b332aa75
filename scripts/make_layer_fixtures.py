"""Writes PyTorch reference fixtures for kiln's layers (crates/kiln-nn/tests/fixtures/layers/).

For each case a layer is built with fixed (seeded) weights, applied to a fixed input, and the
scalar `sum(output * gw)` (gw: fixed random weights) is back-propagated. Each fixture is a JSON
file holding the layer's config, its state dict, the input, output, `gw`, the input gradient
and the parameter gradients, each as {"shape": [...], "data": [...]} (f32 values written exactly).
`tests/layer_parity.rs` loads them into kiln layers and compares.

Run:  /work/venvs/torch/bin/python scripts/make_layer_fixtures.py

Such an environment can be made from PyPI with:
    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch numpy   # from PyPI
(or plain `pip install torch`).
"""

import json
import os

import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "kiln-nn", "tests", "fixtures", "layers")


def enc(t):
    t = t.detach()
    if t.dtype.is_floating_point:
        data = [float(v) for v in t.to(torch.float32).reshape(-1).tolist()]
    else:
        data = [int(v) for v in t.reshape(-1).tolist()]
    return {"shape": list(t.shape), "data": data}


def case(name, layer, x, config):
    torch.manual_seed(1234)
    layer.eval() if config.get("eval") else layer.train()
    if x.dtype.is_floating_point:
        x = x.clone().requires_grad_(True)
    y = layer(x)
    gw = torch.randn(y.shape)
    (y * gw).sum().backward()
    fixture = {
        "name": name,
        "config": config,
        "state_dict": {k: enc(v) for k, v in layer.state_dict().items()},
        "input": enc(x),
        "output": enc(y),
        "gw": enc(gw),
        "input_grad": enc(x.grad) if x.dtype.is_floating_point else None,
        "param_grads": {k: enc(p.grad) for k, p in layer.named_parameters()},
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(fixture, f)
    print(f"{name}: out {list(y.shape)}")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    x3 = torch.randn(2, 3, 6) * 2.0 + 0.5
    case("linear", nn.Linear(6, 5), x3, {"in": 6, "out": 5, "bias": True})
    case("linear_nobias", nn.Linear(6, 4, bias=False), x3, {"in": 6, "out": 4, "bias": False})
    case("linear_1d", nn.Linear(6, 3), x3[0, 0], {"in": 6, "out": 3, "bias": True})
    emb = nn.Embedding(10, 4)
    case("embedding", emb, torch.tensor([[1, 3, 3, 9], [0, 1, 7, 2]]), {"num": 10, "dim": 4})

    ln = nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(6))
        ln.bias.copy_(torch.randn(6))
    case("layernorm", ln, x3, {"shape": [6], "eps": 1e-5, "affine": True, "bias": True})
    ln2 = nn.LayerNorm([3, 6], eps=1e-3)
    with torch.no_grad():
        ln2.weight.copy_(torch.randn(3, 6))
        ln2.bias.copy_(torch.randn(3, 6))
    case("layernorm_2d", ln2, x3, {"shape": [3, 6], "eps": 1e-3, "affine": True, "bias": True})
    case(
        "layernorm_noaffine",
        nn.LayerNorm(6, elementwise_affine=False),
        x3,
        {"shape": [6], "eps": 1e-5, "affine": False, "bias": False},
    )
    rn = nn.RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        rn.weight.copy_(torch.randn(6))
    case("rmsnorm", rn, x3, {"shape": [6], "eps": 1e-6, "affine": True})
    case("rmsnorm_noaffine", nn.RMSNorm(6, eps=1e-6, elementwise_affine=False), x3,
         {"shape": [6], "eps": 1e-6, "affine": False})

    for name, layer, cfg in [
        ("relu", nn.ReLU(), {}),
        ("gelu", nn.GELU(), {}),
        ("gelu_tanh", nn.GELU(approximate="tanh"), {}),
        ("silu", nn.SiLU(), {}),
        ("tanh", nn.Tanh(), {}),
        ("sigmoid", nn.Sigmoid(), {}),
        ("softmax", nn.Softmax(dim=1), {"dim": 1}),
        ("softmax_last", nn.Softmax(dim=-1), {"dim": -1}),
        ("flatten", nn.Flatten(), {"start": 1, "end": -1}),
        ("dropout_eval", nn.Dropout(0.5), {"p": 0.5, "eval": True}),
    ]:
        case(name, layer, x3, cfg)

    torch.manual_seed(5)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    case("sequential", mlp, x3, {})


if __name__ == "__main__":
    main()
