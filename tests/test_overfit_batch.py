"""overfit_batch: every step trains on the same batch; a working setup reaches the threshold;
the diagnosis names the usual failure shapes of the loss curve."""

from __future__ import annotations

import json
import math

import pytest

from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.overfit_batch import diagnose
from tests.conftest import small_recipe


@pytest.mark.parametrize("losses,verdict", [
    ([2.3, 1.0, 0.2, 0.005], "reached"),
    ([2.3, 5.0, math.nan], "exploding"),
    ([2.3, 4.0, 30.0, 90.0], "exploding"),
    ([2.3, 2.4, 2.5, 2.6, 2.7], "rising"),
    ([2.3, 1.5, 2.4, 1.4, 2.3, 1.6, 2.2, 1.5, 2.2], "oscillating"),
    ([2.30, 2.29, 2.30, 2.28, 2.29, 2.28], "plateau"),
    ([2.3, 2.0, 1.7, 1.4, 1.1, 0.8], "slow"),
])
def test_diagnosis_of_scripted_curves(losses, verdict):
    assert diagnose(losses, threshold=0.01) == verdict


def run(digits, run_dir, lr, steps=200):
    raw = small_recipe(digits, run_dir, train={"epochs": 10, "max_steps": steps}, data={"val": None},
                       optimizer={"name": "adamw", "lr": lr, "weight_decay": 0.0},
                       schedule={"name": "constant", "warmup_epochs": 0},
                       plugins={"overfit_batch": {"threshold": 0.02}, "recorder": {"trace": False}})
    ctx = train(validate_recipe(raw))
    return ctx, json.loads((run_dir / "overfit_batch.json").read_text())


def test_a_working_setup_fits_one_batch_and_stops(digits, tmp_path):
    ctx, report = run(digits, tmp_path / "ok", lr=3e-3)
    assert report["verdict"] == "reached" and report["last_loss"] <= 0.02 and report["first_loss"] > 1.5
    recorder = next(p for p in ctx.plugins if p.name == "recorder")
    assert len({tuple(s["ids"]) for s in recorder.steps}) == 1  # one batch, every step
    assert ctx.step == report["steps"] < 200  # stopped at the threshold


def test_a_far_too_high_lr_is_diagnosed(digits, tmp_path):
    _, report = run(digits, tmp_path / "high", lr=50.0, steps=30)
    assert report["verdict"] in ("exploding", "rising", "oscillating", "plateau"), report["verdict"]
    assert report["verdict"] != "reached" and "LR" in report["hint"]
