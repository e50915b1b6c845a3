"""amp: bf16 and fp16 really compute in low precision (on the CPU too) with float32 master
weights; with fp16 a forced overflow skips the step, lowers the loss scale and is counted;
SAM's second pass is unscaled and overflow-checked too."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
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


def test_fp16_overflow_skips_the_step_and_counts_it(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 5}, run={"log_every": 5},
                       plugins={"amp": {"dtype": "fp16"}, "test_overflow_at_step_3": {}})
    ctx = train(validate_recipe(raw))
    helper = next(p for p in ctx.plugins if p.name == "test_overflow_at_step_3")
    assert helper.unchanged  # the overflowed step did not touch the weights
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if "train/loss" in r] == [1]


def test_fp16_with_sam_unscales_both_passes(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 8}, run={"log_every": 4},
                       plugins={"amp": {"dtype": "fp16"}, "sam": {"rho": 0.05}, "recorder": {}})
    ctx = train(validate_recipe(raw))
    record = json.loads((tmp_path / "run" / "recorder-rank0.json").read_text())
    assert record["compute_dtype"] == "torch.float16" and ctx.accelerator.scaler is not None
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert all(r["train/skipped_steps"] == 0 for r in train_rows)  # scale 65536 and no overflow in 8 steps
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())


def test_accelerate_launch_precision_cannot_override_the_recipe(digits, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION for the ranks."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(LauncherError, match=r"--mixed_precision bf16 .* the recipe trains in fp32 \(no amp plugin\)"
                                            r".*plugins.amp=\{dtype: bf16\}"):
        train(validate_recipe(small_recipe(digits, tmp_path / "run", train={"max_steps": 2})))
    assert not (tmp_path / "run").exists()
    # The same precision as the recipe's is no conflict.
    ctx = train(validate_recipe(small_recipe(digits, tmp_path / "amp", train={"max_steps": 2},
                                             plugins={"amp": {"dtype": "bf16"}})))
    assert ctx.accelerator.mixed_precision == "bf16"
