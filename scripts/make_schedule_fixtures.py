"""Writes PyTorch reference learning rates of the one-cycle schedule for kiln-tune
(crates/kiln-tune/tests/fixtures/one_cycle.json).

For each case (total optimizer steps, warmup steps) it builds torch.optim.lr_scheduler.OneCycleLR
with anneal_strategy="cos", div_factor=25, final_div_factor=1e4 and pct_start = warmup / total
(pct_start = 0.3 where warmup is 0: kiln's default when no warmup is configured), and records
the learning rate in force at every optimizer step (the lr read before `optimizer.step()`).
Momentum cycling is off: kiln's schedule moves only the learning rate.
`crates/kiln-tune/tests/trainer.rs` compares `Schedule::OneCycle.factor(step, warmup, total)`
× max_lr with these values.

Needs PyPI: torch.
Run:  /work/venvs/torch/bin/python scripts/make_schedule_fixtures.py
"""

import json
import os

import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "kiln-tune", "tests", "fixtures")

MAX_LR = 3e-4
CASES = [(100, 30), (37, 9), (10, 3), (1000, 250), (7, 2), (50, 0), (64, 5)]


def lrs(total, warmup):
    pct_start = warmup / total if warmup > 0 else 0.3
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=MAX_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=MAX_LR,
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy="cos",
        div_factor=25.0,
        final_div_factor=1e4,
        cycle_momentum=False,
    )
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return pct_start, out


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for total, warmup in CASES:
        pct_start, values = lrs(total, warmup)
        cases.append({"total": total, "warmup": warmup, "pct_start": pct_start, "lrs": values})
    path = os.path.join(OUT, "one_cycle.json")
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "max_lr": MAX_LR, "cases": cases}, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
