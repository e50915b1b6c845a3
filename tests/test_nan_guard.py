"""nan_guard: a NaN step is skipped (weights and momentum untouched) and counted, or stops
the run with a diagnosis naming the step."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.registry import Plugin, register
from tests.conftest import small_recipe


@register("test_nan_at_step_3")
class NanAtStep3(Plugin):
    """Test helper: a NaN loss on the 3rd step; remembers the weights around it."""

    def transform_loss(self, ctx, loss, batch, logits):
        return loss * float("nan") if ctx.step == 2 else loss

    def after_optimizer_step(self, ctx):
        if ctx.step == 2:
            self.before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
            self.momentum = [ctx.optimizer.state[p]["momentum_buffer"].clone() for p in ctx.model.parameters()]
        if ctx.step == 3:
            params = {n: p for n, p in ctx.model.named_parameters()}
            self.unchanged = all(torch.equal(self.before[n], p) for n, p in params.items())
            self.momentum_unchanged = all(torch.equal(a, ctx.optimizer.state[p]["momentum_buffer"])
                                          for a, p in zip(self.momentum, ctx.model.parameters()))


def test_skip_drops_the_step_and_counts_it(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10},
                       plugins={"test_nan_at_step_3": {}, "nan_guard": {"action": "skip"}})
    ctx = train(validate_recipe(raw))
    helper = next(p for p in ctx.plugins if p.name == "test_nan_at_step_3")
    assert helper.unchanged and helper.momentum_unchanged
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/nan_skipped_steps"] for r in rows if "train/loss" in r] == [1, 1]


def test_without_the_guard_the_weights_are_ruined(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 4}, data={"val": None},
                       plugins={"test_nan_at_step_3": {}})
    ctx = train(validate_recipe(raw))
    assert not all(torch.isfinite(p).all() for p in ctx.model.parameters())


def test_stop_names_the_step_and_the_causes(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10},
                       plugins={"test_nan_at_step_3": {}, "nan_guard": {"action": "stop"}})
    with pytest.raises(LauncherError, match=r"Non-finite gradients at step 3 .*learning rate too high"):
        train(validate_recipe(raw))
