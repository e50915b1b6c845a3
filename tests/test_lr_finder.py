"""lr_finder: the sweep is exponential, the smoothing is fastai's bias-corrected average, the
suggestion lands at the steepest descent of a known curve, and the command writes its
plot and JSON from a real run."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from launcher.plugins.lr_finder import range_test_lr, smooth, suggest
from tests.conftest import run_cli, small_recipe


def test_exponential_sweep_endpoints():
    lrs = [range_test_lr(1e-6, 10.0, 50, i) for i in range(50)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(10.0)
    ratios = np.diff(np.log(lrs))
    assert np.allclose(ratios, ratios[0])


def test_smoothing_is_a_bias_corrected_ema():
    losses = [3.0, 2.0, 1.0]
    beta = 0.9
    ema1 = 0.1 * 3.0
    ema2 = 0.9 * ema1 + 0.1 * 2.0
    assert smooth(losses, beta)[:2] == pytest.approx([ema1 / 0.1, ema2 / (1 - 0.81)])


def test_suggestion_on_a_synthetic_curve():
    """loss = 2 - tanh(x + 3) for x = log10(lr) falls fastest at lr = 1e-3, bottoms out, then
    diverges above 1e-1: the suggestion is 1e-3 (within one grid step), the minimum ~1e-1."""
    x = np.linspace(-6, 1, 141)
    lrs = 10.0 ** x
    loss = 2 - np.tanh(x + 3) + np.exp(4 * (x + 1))
    result = suggest(lrs.tolist(), loss.tolist())
    assert abs(math.log10(result["steepest"]) + 3) <= 0.05 + 1e-9
    lowest = lrs[np.argmin(loss)]
    assert result["minimum"] == pytest.approx(lowest) and result["minimum_div_10"] == pytest.approx(lowest / 10)


def test_the_command_writes_plot_and_json(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", plugins={"checkpoint": {"every_steps": 5}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli([sys.executable, "-m", "launcher.lr_find", str(tmp_path / "r.yaml"), "--steps", "60",
                    "--start-lr", "1e-5", "--end-lr", "100"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left out for the range test: checkpoint" in proc.stdout and "suggested LR" in proc.stdout
    out = tmp_path / "run" / "lr_find"
    result = json.loads((out / "lr_find.json").read_text())
    lrs = result["lrs"]
    assert lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert len(lrs) <= 60 and 1e-5 <= result["suggested_lr"] <= 100
    # The diverging end of the sweep stops it early (100 is far too high for SGD here).
    assert len(lrs) < 60 and max(result["smoothed"]) > 2 * min(result["smoothed"])
    # loss falls over the sweep before diverging
    assert min(result["smoothed"]) < result["smoothed"][0] * 0.9
    with Image.open(out / "lr_find.png") as img:
        assert img.size[0] > 400 and img.size[1] > 300
    assert not (out / "checkpoints").exists()


def test_a_recipe_with_checkpoints_is_refused_for_the_plugin(digits, tmp_path):
    from launcher.errors import LauncherError
    from launcher.config.load import validate_recipe

    raw = small_recipe(digits, tmp_path, schedule={"name": "constant", "warmup_epochs": 0},
                       plugins={"lr_finder": {}, "checkpoint": {}})
    with pytest.raises(LauncherError, match="'lr_finder' and 'checkpoint' cannot run together"):
        validate_recipe(raw)
    raw["plugins"] = {"lr_finder": {}}
    raw["schedule"] = {"name": "cosine"}
    with pytest.raises(LauncherError, match="schedule.name=constant"):
        validate_recipe(raw)
