"""early_stopping: stops after `patience` evaluations without an improvement larger than
min_delta, on every rank alike, and records why."""

from __future__ import annotations

import json
import types

import pytest

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.early_stopping import EarlyStopping
from tests.conftest import small_recipe


def first_stop(values, **options):
    """The evaluation index (0-based) at which the plugin stops, or None."""
    plugin = EarlyStopping(EarlyStopping.Options(monitor="m", **options))
    ctx = types.SimpleNamespace(step=0, stop_training=False, stop_reason="", is_main=False)
    for i, v in enumerate(values):
        ctx.step = i
        plugin.on_evaluate(ctx, {"m": v})
        if ctx.stop_training:
            return i
    return None


@pytest.mark.parametrize("values, options, expected", [
    ([0.5, 0.6, 0.6, 0.6], {"patience": 2}, 3),                # two evaluations without improvement
    ([0.5, 0.6, 0.59, 0.61, 0.6, 0.6], {"patience": 2}, 5),    # an improvement resets the count
    ([0.5, 0.505, 0.509, 0.6], {"patience": 2, "min_delta": 0.01}, 2),  # +0.005 and +0.009 are too small
    ([1.0, 0.9, 0.95, 0.96], {"patience": 2, "mode": "min"}, 3),
    ([0.1, 0.2, 0.3, 0.4], {"patience": 1}, None),
])
def test_stops_at_the_expected_evaluation(values, options, expected):
    assert first_stop(values, **options) == expected


def test_a_run_stops_early_and_records_why(digits, tmp_path):
    # min_delta=10 on val/loss: nothing ever counts as an improvement after the first evaluation.
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 6}, data={"batch_size": 256},
                       plugins={"early_stopping": {"monitor": "val/loss", "mode": "min", "patience": 2,
                                                   "min_delta": 10.0}})
    ctx = train(validate_recipe(raw))
    record = json.loads((tmp_path / "run" / "early_stopping.json").read_text())
    assert record["stopped_at_step"] == ctx.step == 3 * ctx.steps_per_epoch < ctx.total_steps
    assert record["best_step"] == ctx.steps_per_epoch
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_an_unknown_metric_is_named(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 2},
                       plugins={"early_stopping": {"monitor": "val/top2"}})
    with pytest.raises(LauncherError, match="reports no 'val/top2'.*val/top1"):
        train(validate_recipe(raw))
