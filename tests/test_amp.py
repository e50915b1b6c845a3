"""amp: bf16 really computes in bf16 (on the CPU too) with float32 master weights; fp16 is
refused without a GPU; on a GPU a forced overflow skips the step and is counted."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.recipe import validate_recipe
from launcher.registry import Plugin, register
from tests.conftest import small_recipe


def test_bf16_runs_on_the_cpu_with_float32_weights(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 20},
                       plugins={"amp": {"dtype": "bf16"}, "recorder": {}})
    ctx = train(validate_recipe(raw))
    assert ctx.accelerator.mixed_precision == "bf16"
    record = json.loads((tmp_path / "run" / "recorder-rank0.json").read_text())
    assert record["compute_dtype"] == "torch.bfloat16"  # the convolutions ran in bf16
    assert all(p.dtype == torch.float32 for p in ctx.model.parameters())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0] and rows[-1]["val/top1"] > 0.2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_without_a_gpu_is_refused_with_the_fix(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", plugins={"amp": {"dtype": "fp16"}})
    with pytest.raises(LauncherError, match="fp16 needs a CUDA GPU.*use dtype: bf16"):
        train(validate_recipe(raw))
    assert not (tmp_path / "run").exists()


@register("test_overflow_at_step_3")
class OverflowAtStep3(Plugin):
    """Test helper: makes the loss infinite on the 3rd step, as an fp16 overflow would."""

    def transform_loss(self, ctx, loss, batch, logits):
        return loss * float("inf") if ctx.step == 2 else loss

    def before_optimizer_step(self, ctx):
        self.before = [p.detach().clone() for p in ctx.model.parameters()] if ctx.step == 2 else None

    def after_optimizer_step(self, ctx):
        if ctx.step == 3:
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, ctx.model.parameters()))


@pytest.mark.gpu
def test_fp16_overflow_skips_the_step_and_counts_it(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 5}, run={"log_every": 5},
                       plugins={"amp": {"dtype": "fp16"}, "test_overflow_at_step_3": {}})
    ctx = train(validate_recipe(raw))
    helper = next(p for p in ctx.plugins if p.name == "test_overflow_at_step_3")
    assert helper.unchanged  # the overflowed step did not touch the weights
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if "train/loss" in r] == [1]
