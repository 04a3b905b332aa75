"""Writes PyTorch reference fixtures for kiln's recurrent layers (crates/kiln-nn/tests/fixtures/rnn/).

For each case a torch.nn.LSTM / GRU / RNN is built with seeded weights, applied to a fixed input
and given initial state, and the scalar `sum(out * gw) + sum(h_n * gh) [+ sum(c_n * gc)]` (fixed
random weights) is back-propagated. Each fixture is a JSON file holding the layer's config, its
state dict, the input, h0 (and c0), the output, h_n (and c_n), the projection weights, and the
gradients of the input, the initial states and every parameter, each as
{"shape": [...], "data": [...]} (f32 values written exactly). `tests/rnn_parity.rs` loads them into
kiln layers and compares.

Run:  /work/venvs/torch/bin/python scripts/make_rnn_fixtures.py
"""

import json
import os

import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "kiln-nn", "tests", "fixtures", "rnn")


def enc(t):
    t = t.detach()
    return {"shape": list(t.shape), "data": [float(v) for v in t.to(torch.float32).reshape(-1).tolist()]}


def case(name, kind, input_size, hidden, config, batch, seq, with_state=True):
    torch.manual_seed(sum(map(ord, name)))
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}[kind]
    kwargs = dict(
        num_layers=config["num_layers"],
        bias=config["bias"],
        batch_first=config["batch_first"],
        bidirectional=config["bidirectional"],
    )
    if kind.startswith("rnn_"):
        kwargs["nonlinearity"] = kind[4:]
    layer = cls(input_size, hidden, **kwargs)
    d = 2 if config["bidirectional"] else 1
    ld = config["num_layers"] * d
    if batch is None:
        x = torch.randn(seq, input_size)
        sshape = (ld, hidden)
    elif config["batch_first"]:
        x = torch.randn(batch, seq, input_size)
        sshape = (ld, batch, hidden)
    else:
        x = torch.randn(seq, batch, input_size)
        sshape = (ld, batch, hidden)
    x.requires_grad_(True)
    h0 = (torch.randn(sshape) * 0.5).requires_grad_(True) if with_state else None
    c0 = (torch.randn(sshape) * 0.5).requires_grad_(True) if with_state and kind == "lstm" else None
    if kind == "lstm":
        out, (hn, cn) = layer(x, (h0, c0) if with_state else None)
    else:
        out, hn = layer(x, h0)
        cn = None
    gw, gh = torch.randn(out.shape), torch.randn(hn.shape)
    loss = (out * gw).sum() + (hn * gh).sum()
    gc = None
    if cn is not None:
        gc = torch.randn(cn.shape)
        loss = loss + (cn * gc).sum()
    loss.backward()
    opt = lambda t: enc(t) if t is not None else None
    fixture = {
        "name": name,
        "kind": kind,
        "input_size": input_size,
        "hidden_size": hidden,
        "config": config,
        "state_dict": {k: enc(v) for k, v in layer.state_dict().items()},
        "input": enc(x),
        "h0": opt(h0),
        "c0": opt(c0),
        "output": enc(out),
        "h_n": enc(hn),
        "c_n": opt(cn),
        "gw": enc(gw),
        "gh": enc(gh),
        "gc": opt(gc),
        "input_grad": enc(x.grad),
        "h0_grad": opt(h0.grad if h0 is not None else None),
        "c0_grad": opt(c0.grad if c0 is not None else None),
        "param_grads": {k: enc(p.grad) for k, p in layer.named_parameters()},
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(fixture, f)
    print(f"{name}: out {list(out.shape)} h_n {list(hn.shape)}")


def cfg(num_layers=1, bias=True, batch_first=True, bidirectional=False):
    return {"num_layers": num_layers, "bias": bias, "batch_first": batch_first, "bidirectional": bidirectional}


def main():
    os.makedirs(OUT, exist_ok=True)
    for kind in ["lstm", "gru"]:
        for bf in [True, False]:
            tag = "bf" if bf else "tm"
            case(f"{kind}_2l_bidir_{tag}", kind, 5, 6, cfg(2, True, bf, True), 3, 7)
        case(f"{kind}_nobias_zero_state", kind, 4, 5, cfg(1, False, True, False), 2, 4, with_state=False)
        case(f"{kind}_unbatched_bidir", kind, 4, 3, cfg(2, True, True, True), None, 5)
    for kind in ["rnn_tanh", "rnn_relu"]:
        case(f"{kind}_2l_bidir_tm", kind, 5, 6, cfg(2, True, False, True), 3, 7)


if __name__ == "__main__":
    main()
