"""Writes PyTorch reference fixtures for kiln's attention layers (crates/kiln-nn/tests/fixtures/attn/).

Cases: nn.MultiheadAttention (key-padding mask, causal mask, float attention masks, kdim/vdim,
a fully masked sequence) and nn.TransformerEncoderLayer / nn.TransformerEncoder (relu, gelu,
norm_first, two layers with a final norm), all in eval mode (dropout off). Every parameter is
set to seeded random values (biases included, so their gradients are checked). Because the
inputs require grad, PyTorch takes its slow ("math") path, never the fused fast path.

The scalar `sum(out * gw) [+ sum(weights * gw_weights)]` is back-propagated. Each fixture is a
JSON file with the case's config, state dict, inputs, masks, outputs, `gw`s, input gradients and
parameter gradients, each tensor as {"shape": [...], "data": [...]} (f32 values written exactly;
masks also carry "kind": "bool" or "float", and "neg_inf": the indices of -inf entries, which JSON
cannot hold). `tests/attn_parity.rs` loads them and compares.

Run:  /work/venvs/torch/bin/python scripts/make_attn_fixtures.py
(an environment from PyPI: `python3 -m venv /work/venvs/torch && /work/venvs/torch/bin/pip install torch`)
"""

import json
import os

import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "kiln-nn", "tests", "fixtures", "attn")


def enc(t):
    t = t.detach()
    if t.dtype == torch.bool:
        return {"shape": list(t.shape), "data": [float(v) for v in t.to(torch.float32).reshape(-1).tolist()], "kind": "bool"}
    data = [float(v) for v in t.to(torch.float32).reshape(-1).tolist()]
    # JSON has no infinities: -inf entries (additive masks) are listed by index, stored as 0.
    neg_inf = [i for i, v in enumerate(data) if v == float("-inf")]
    for i in neg_inf:
        data[i] = 0.0
    assert all(v == v and abs(v) != float("inf") for v in data), "non-finite value in a fixture"
    return {"shape": list(t.shape), "data": data, "kind": "float", "neg_inf": neg_inf}


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g) * 0.3
            if "norm" in name and name.endswith("weight"):
                r = r + 1.0
            p.copy_(r)


def write(name, fixture):
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(fixture, f)


def mha_case(name, config, inputs, masks, need_weights=True, average=True, is_causal=False):
    torch.manual_seed(100)
    m = nn.MultiheadAttention(
        config["embed_dim"], config["num_heads"], bias=config.get("bias", True),
        kdim=config.get("kdim"), vdim=config.get("vdim"), batch_first=config["batch_first"],
        dropout=0.1,
    )
    randomize(m, 7)
    m.eval()
    ins = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    q = ins["query"]
    k = ins.get("key", q)
    v = ins.get("value", q)
    out, w = m(q, k, v, key_padding_mask=masks.get("key_padding_mask"), attn_mask=masks.get("attn_mask"),
               need_weights=need_weights, average_attn_weights=average, is_causal=is_causal)
    gw = torch.randn(out.shape)
    loss = (out * gw).sum()
    fixture_out = {"out": enc(out)}
    gws = {"out": enc(gw)}
    if need_weights:
        gww = torch.randn(w.shape)
        loss = loss + (w * gww).sum()
        fixture_out["weights"] = enc(w)
        gws["weights"] = enc(gww)
    loss.backward()
    config = dict(config, need_weights=need_weights, average_attn_weights=average, is_causal=is_causal)
    write(name, {
        "name": name,
        "config": config,
        "state_dict": {k: enc(t) for k, t in m.state_dict().items()},
        "inputs": {k: enc(t) for k, t in ins.items()},
        "masks": {k: enc(t) for k, t in masks.items()},
        "outputs": fixture_out,
        "gws": gws,
        "input_grads": {k: enc(t.grad) for k, t in ins.items()},
        "param_grads": {k: enc(p.grad) for k, p in m.named_parameters()},
    })
    print(f"{name}: out {list(out.shape)}")


def encoder_case(name, config, x, masks, num_layers=None, is_causal=False):
    torch.manual_seed(200)
    layer = nn.TransformerEncoderLayer(
        config["d_model"], config["nhead"], dim_feedforward=config["dim_feedforward"], dropout=0.1,
        activation=config["activation"], batch_first=config["batch_first"], norm_first=config["norm_first"],
        layer_norm_eps=config["layer_norm_eps"],
    )
    if num_layers is None:
        m = layer
    else:
        m = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(config["d_model"], eps=config["layer_norm_eps"]),
                                  enable_nested_tensor=False)
    randomize(m, 11)
    m.eval()
    xi = x.clone().requires_grad_(True)
    if num_layers is None:
        out = m(xi, src_mask=masks.get("src_mask"), src_key_padding_mask=masks.get("src_key_padding_mask"),
                is_causal=is_causal)
    else:
        out = m(xi, mask=masks.get("src_mask"), src_key_padding_mask=masks.get("src_key_padding_mask"),
                is_causal=is_causal)
    gw = torch.randn(out.shape)
    (out * gw).sum().backward()
    config = dict(config, num_layers=num_layers, is_causal=is_causal)
    write(name, {
        "name": name,
        "config": config,
        "state_dict": {k: enc(t) for k, t in m.state_dict().items()},
        "inputs": {"src": enc(xi)},
        "masks": {k: enc(t) for k, t in masks.items()},
        "outputs": {"out": enc(out)},
        "gws": {"out": enc(gw)},
        "input_grads": {"src": enc(xi.grad)},
        "param_grads": {k: enc(p.grad) for k, p in m.named_parameters()},
    })
    print(f"{name}: out {list(out.shape)}")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    E = 8
    base = {"embed_dim": E, "num_heads": 2, "batch_first": True}

    x = torch.randn(2, 5, E)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 4] = True
    kpm[1, 2:] = True
    mha_case("mha_kpm", base, {"query": x}, {"key_padding_mask": kpm})

    x = torch.randn(2, 6, E)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    mha_case("mha_causal", dict(base, num_heads=4), {"query": x}, {"attn_mask": causal},
             need_weights=False, is_causal=True)

    q, k, v = torch.randn(2, 4, E), torch.randn(2, 6, E), torch.randn(2, 6, E)
    fmask = torch.randn(2 * 2, 4, 6)
    fmask[:, :, 5] = float("-inf")
    mha_case("mha_float_mask", base, {"query": q, "key": k, "value": v}, {"attn_mask": fmask},
             need_weights=True, average=False)

    q, k, v = torch.randn(4, 2, E), torch.randn(6, 2, 6), torch.randn(6, 2, 5)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 3:] = True
    fm = torch.randn(4, 6)
    mha_case("mha_kdim_seq_first", dict(base, kdim=6, vdim=5, batch_first=False),
             {"query": q, "key": k, "value": v}, {"key_padding_mask": kpm, "attn_mask": fm})

    x = torch.randn(2, 4, E)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1, :] = True
    mha_case("mha_fully_masked", base, {"query": x}, {"key_padding_mask": kpm}, need_weights=False)

    layer = {"d_model": E, "nhead": 2, "dim_feedforward": 16, "activation": "relu", "batch_first": True,
             "norm_first": False, "layer_norm_eps": 1e-5}
    x = torch.randn(2, 5, E)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    encoder_case("enc_relu", layer, x, {"src_key_padding_mask": kpm})
    encoder_case("enc_gelu", dict(layer, activation="gelu", layer_norm_eps=1e-4), x,
                 {"src_mask": torch.randn(5, 5)})
    encoder_case("enc_norm_first", dict(layer, norm_first=True), x,
                 {"src_mask": torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)}, is_causal=True)
    kpm_full = torch.zeros(2, 5, dtype=torch.bool)
    kpm_full[0, :] = True
    encoder_case("enc_fully_masked", layer, x, {"src_key_padding_mask": kpm_full})
    encoder_case("encoder_2layers", dict(layer, batch_first=False, activation="gelu"), x.transpose(0, 1).contiguous(),
                 {"src_key_padding_mask": kpm}, num_layers=2)


if __name__ == "__main__":
    main()
