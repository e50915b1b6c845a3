"""tta: the reported metrics equal a direct computation of the averaged softmax."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from launcher.data import EvalStream, batches, index_shards
from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.data.transforms import ImageTransform
from launcher.plugins.tta import shifted
from tests.conftest import small_recipe


def test_shifted_is_a_translation_with_zero_fill():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = shifted(x, 1, 0)  # content moves right by one pixel
    assert torch.equal(y[..., :, 1:], x[..., :, :3]) and torch.all(y[..., :, 0] == 0)
    y = shifted(x, 0, -1)  # content moves up by one pixel
    assert torch.equal(y[..., :3, :], x[..., 1:, :]) and torch.all(y[..., 3, :] == 0)


def test_val_tta_metrics_equal_the_mean_softmax_of_original_and_flipped(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 20},
                       plugins={"tta": {"flip": True, "shift": 1}})
    recipe = validate_recipe(raw)
    train(recipe)
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    model = timm.create_model("wrn10_1", num_classes=10)
    model.load_state_dict(load_file(tmp_path / "run" / "final" / "model.safetensors"))
    model.eval()
    index = index_shards(recipe.data.val, "v")
    hits = hits_tta = loss_tta = 0.0
    with torch.no_grad():
        for b in batches(EvalStream(index, ImageTransform(recipe.data, 3, train=False), 100, 0, 1), 0):
            x = b.images
            views = [x, x.flip(-1)] + [F.pad(x, (1, 1, 1, 1))[..., 1 - dy:1 - dy + 16, 1 - dx:1 - dx + 16]
                                       for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
            probs = torch.stack([F.softmax(model(v), -1) for v in views]).mean(0)
            hits += (model(x).argmax(-1) == b.targets).sum().item()
            hits_tta += (probs.argmax(-1) == b.targets).sum().item()
            loss_tta += -probs[torch.arange(len(x)), b.targets].log().sum().item()
    assert row["val/top1"] == pytest.approx(hits / 360)
    assert row["val_tta/top1"] == pytest.approx(hits_tta / 360)
    assert row["val_tta/loss"] == pytest.approx(loss_tta / 360, rel=1e-4)
    assert row["val_tta/samples"] == 360


def test_tta_needs_a_validation_set(digits, tmp_path):
    with pytest.raises(LauncherError, match="tta.*data.val"):
        validate_recipe(small_recipe(digits, tmp_path, data={"val": None}, plugins={"tta": {}}))
