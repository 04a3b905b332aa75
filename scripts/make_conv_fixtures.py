"""Writes PyTorch reference fixtures for kiln's Conv1d/Conv2d (crates/kiln-nn/tests/fixtures/conv/).

For each case a `torch.nn.Conv1d`/`Conv2d` is built with seeded default init, applied to a fixed
input, and `sum(output * gw)` (gw: fixed random weights) is back-propagated. Each fixture is a
JSON file with the layer's config, its state dict, the input, output, `gw`, the input gradient
and the parameter gradients, each as {"shape": [...], "data": [...]} (f32 values).
`tests/conv_parity.rs` loads them into kiln layers and compares.

Run:  /work/venvs/torch/bin/python scripts/make_conv_fixtures.py
"""

import json
import os
import zlib

import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "kiln-nn", "tests", "fixtures", "conv")


def enc(t):
    t = t.detach().to(torch.float32)
    return {"shape": list(t.shape), "data": [float(v) for v in t.reshape(-1).tolist()]}


def case(name, layer, x, config):
    torch.manual_seed(1234)
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
        "input_grad": enc(x.grad),
        "param_grads": {k: enc(p.grad) for k, p in layer.named_parameters()},
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(fixture, f)
    print(f"{name}: in {list(x.shape)} out {list(y.shape)}")


def conv2d(name, cin, cout, k, x, stride=1, padding=0, dilation=1, groups=1, bias=True):
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)
    layer = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=bias)
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]
    config = {
        "kind": "conv2d", "in": cin, "out": cout, "kernel": pair(k), "stride": pair(stride),
        "padding": padding if isinstance(padding, str) else pair(padding),
        "dilation": pair(dilation), "groups": groups, "bias": bias,
    }
    case(name, layer, x, config)


def conv1d(name, cin, cout, k, x, stride=1, padding=0, dilation=1, groups=1, bias=True):
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)
    layer = nn.Conv1d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=bias)
    config = {
        "kind": "conv1d", "in": cin, "out": cout, "kernel": k, "stride": stride,
        "padding": padding, "dilation": dilation, "groups": groups, "bias": bias,
    }
    case(name, layer, x, config)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    x4 = torch.randn(2, 4, 9, 8)
    x1 = torch.randn(1, 1, 28, 28)
    conv2d("conv2d_k3_pad1", 4, 6, 3, x4, padding=1)
    conv2d("conv2d_mnist_first", 1, 8, 3, x1, padding=1)
    conv2d("conv2d_stride2_nobias", 4, 5, (3, 2), x4, stride=2, bias=False)
    conv2d("conv2d_stride_pad_mixed", 4, 3, 3, x4, stride=(2, 1), padding=(1, 2))
    conv2d("conv2d_dilation2", 4, 4, 3, x4, padding=2, dilation=2)
    conv2d("conv2d_groups2", 4, 6, 3, x4, padding=1, groups=2)
    conv2d("conv2d_depthwise", 4, 4, 3, x4, stride=2, padding=1, groups=4)
    conv2d("conv2d_pointwise", 4, 7, 1, x4)
    conv2d("conv2d_same_odd", 4, 3, 3, x4, padding="same")
    conv2d("conv2d_same_even", 4, 3, (4, 2), x4, padding="same", dilation=(1, 3))
    conv2d("conv2d_unbatched", 4, 3, 3, x4[0], padding=1)
    x3 = torch.randn(2, 4, 17)
    conv1d("conv1d_k3", 4, 6, 3, x3, stride=2, padding=1)
    conv1d("conv1d_groups_dilation", 4, 6, 3, x3, dilation=2, groups=2)
    conv1d("conv1d_depthwise", 4, 4, 5, x3, padding=2, groups=4, bias=False)
    conv1d("conv1d_same_even", 4, 3, 4, x3, padding="same")
    conv1d("conv1d_unbatched", 4, 3, 3, x3[1])


if __name__ == "__main__":
    main()
