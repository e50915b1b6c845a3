"""ema: equals the closed-form average over a known weight sequence; evaluated as val_ema;
exported; its state round-trips."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.ema import ExponentialMovingAverage
from tests.conftest import small_recipe


class Accel:
    @staticmethod
    def unwrap_model(model):
        return model


def plain_strategy():
    from launcher.strategies.base import DataParallel

    return DataParallel(Accel)


def run_sequence(weights, **options):
    """Feed weights w_1..w_n as the model after optimizer steps 1..n."""
    model = nn.Linear(3, 2, bias=False)
    ctx = types.SimpleNamespace(model=model, accelerator=Accel, strategy=plain_strategy(), step=0)
    plugin = ExponentialMovingAverage(ExponentialMovingAverage.Options(**options))
    plugin.setup(ctx)
    for step, w in enumerate(weights, start=1):
        with torch.no_grad():
            model.weight.copy_(w)
        ctx.step = step
        plugin.after_optimizer_step(ctx)
    return plugin.ema.module.weight.detach()


def test_equals_the_closed_form_average():
    torch.manual_seed(0)
    ws = [torch.randn(2, 3) for _ in range(12)]
    d = 0.8
    # The first update copies w_1; then ema_n = d^(n-1) w_1 + sum_{i=2..n} (1 - d) d^(n-i) w_i.
    n = len(ws)
    expected = d ** (n - 1) * ws[0] + sum((1 - d) * d ** (n - i) * ws[i - 1] for i in range(2, n + 1))
    assert torch.allclose(run_sequence(ws, decay=d), expected, atol=1e-6)


def test_warmup_decay_and_update_interval():
    torch.manual_seed(1)
    ws = [torch.randn(2, 3) for _ in range(9)]
    d, gamma, power, every = 0.9, 1.0, 2 / 3, 3
    ema = None
    for step, w in enumerate(ws, start=1):
        if step % every:
            continue
        t = step // every  # updates done so far
        decay = 0.0 if t == 1 else min(d, 1 - (1 + (t - 1) / gamma) ** -power)
        ema = w.clone() if ema is None else decay * ema + (1 - decay) * w
    ours = run_sequence(ws, decay=d, warmup=True, warmup_gamma=gamma, warmup_power=power, every=every)
    assert torch.allclose(ours, ema, atol=1e-6)


def test_state_round_trips():
    model = nn.Linear(3, 2)
    ctx = types.SimpleNamespace(model=model, accelerator=Accel, strategy=plain_strategy(), step=0)
    a = ExponentialMovingAverage(ExponentialMovingAverage.Options())
    a.setup(ctx)
    with torch.no_grad():
        a.ema.module.weight.fill_(3.0)
    b = ExponentialMovingAverage(ExponentialMovingAverage.Options())
    b.setup(ctx)
    b.load_state_dict(a.state_dict())
    assert torch.all(b.ema.module.weight == 3.0)


def test_in_a_run_it_is_evaluated_beside_the_model_and_exported(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 30},
                       plugins={"ema": {"decay": 0.9}})
    ctx = train(validate_recipe(raw))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val/top1", "val_ema/top1", "val_ema/loss"} <= set(row) and row["val_ema/samples"] == 360
    assert row["val_ema/loss"] != pytest.approx(row["val/loss"])
    ema = next(p for p in ctx.plugins if p.name == "ema").ema.module
    exported = load_file(tmp_path / "run" / "final" / "ema.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in ema.state_dict().items())
