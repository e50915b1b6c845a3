"""grad_clip: equals torch's clip_grad_norm_ / clip_grad_value_; logs the pre-clip norm."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn as nn

from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.grad_clip import GradientClipping
from tests.conftest import small_recipe


def model_with_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    (model(torch.randn(16, 6)) * 100).sum().backward()
    return model


@pytest.mark.parametrize("options", [{"max_norm": 0.5}, {"max_norm": 2.0, "norm_type": 1.0},
                                     {"max_norm": None, "value": 0.01}, {"max_norm": 0.5, "value": 0.01}])
def test_equals_torch_clipping(options):
    from accelerate import Accelerator

    ours, ref = model_with_grads(), model_with_grads()
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    plugin = GradientClipping(GradientClipping.Options(**options))
    ddp = types.SimpleNamespace(distributed=types.SimpleNamespace(strategy="ddp"))
    plugin.before_optimizer_step(types.SimpleNamespace(optimizer=optimizer, accelerator=Accelerator(cpu=True),
                                                       recipe=ddp))
    if options.get("value"):
        torch.nn.utils.clip_grad_value_(ref.parameters(), options["value"])
    if options.get("max_norm"):
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), options["max_norm"], options.get("norm_type", 2.0))
        assert torch.allclose(plugin.last_norm, norm)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad)
    assert any(not torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), model_with_grads().parameters()))


def test_logs_the_gradient_norm(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10},
                       plugins={"grad_clip": {"max_norm": 1.0}})
    train(validate_recipe(raw))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/grad_norm"] > 0 for r in rows if "train/loss" in r)
