"""Shipped recipes run end to end, shortened, on the CPU."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_cli, write_shards

pytestmark = pytest.mark.slow


def test_wrn_recipe_runs_with_every_plugin_it_names(tmp_path):
    """recipes/wrn.yaml (WRN-40-10, SAM, label smoothing, TTA, AutoAugment, random erasing)
    shortened: WRN-16-4 on synthetic CIFAR-100-shaped shards, 3 steps."""
    info = write_shards(tmp_path / "cifar", "synthetic", "--num-classes", "100", "--train", "256", "--val", "128")
    result = run_cli([sys.executable, "-m", "launcher", str(REPO / "recipes" / "wrn.yaml"),
                      "model.name=wrn16_4", "train.max_steps=3", "data.batch_size=16", "data.num_workers=2",
                      f"data.train={info['train']}", f"data.val={info['val']}", f"run.dir={tmp_path / 'run'}",
                      "run.progress=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "sam:" in recipe and "label_smoothing:" in recipe and "tta:" in recipe
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["val/samples"] == 128 and "val_tta/top1" in last
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
