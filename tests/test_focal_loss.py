"""focal_loss: equals Lin et al.'s formula; gamma 0 with weights equals torch's weighted
cross-entropy per sample; balanced weights come from the shards' class counts."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.focal_loss import balanced_weights, focal_loss
from tests.conftest import small_recipe


def test_equals_the_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(12, 5), torch.randint(0, 5, (12,))
    p_t = F.softmax(logits, -1)[torch.arange(12), y]
    for gamma in (0.5, 2.0):
        expected = (-(1 - p_t) ** gamma * p_t.log()).mean()
        assert torch.allclose(focal_loss(logits, y, gamma), expected, atol=1e-6)
    # Easy examples are down-weighted relative to cross-entropy.
    assert focal_loss(logits, y, 2.0) < F.cross_entropy(logits, y)


def test_gamma_zero_with_weights_is_weighted_cross_entropy():
    torch.manual_seed(1)
    logits, y, w = torch.randn(10, 4), torch.randint(0, 4, (10,)), torch.tensor([0.5, 1.0, 2.0, 4.0])
    expected = F.cross_entropy(logits, y, weight=w, reduction="none").mean()
    assert torch.allclose(focal_loss(logits, y, 0.0, w), expected, atol=1e-6)
    assert torch.allclose(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y), atol=1e-6)


def test_balanced_weights_from_counts():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert torch.allclose(balanced_weights(labels, 3), torch.tensor([10 / 18, 10 / 9, 10 / 3]))


def test_runs_with_balanced_weights(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10},
                       plugins={"focal_loss": {"gamma": 2.0, "class_weights": "balanced"}})
    ctx = train(validate_recipe(raw))
    plugin = next(p for p in ctx.plugins if p.name == "focal_loss")
    counts = np.bincount(ctx.train_index.labels, minlength=10)
    assert torch.allclose(plugin.weights * torch.tensor(counts, dtype=torch.float32),
                          torch.full((10,), 1437 / 10), rtol=1e-5)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val/samples"] == 360 and np.isfinite(row["val/loss"])


def test_focal_then_label_smoothing_compose_and_the_other_order_is_refused(digits, tmp_path):
    """[focal_loss, label_smoothing]: the loop's loss is focal loss against smoothed targets,
    computed here by hand. [label_smoothing, focal_loss] would drop the smoothing: refused."""
    import pytest

    from launcher.errors import LauncherError
    from launcher.registry import build_plugins

    def recipe(order):
        options = {"focal_loss": {"gamma": 2.0}, "label_smoothing": {"smoothing": 0.2}}
        return validate_recipe(small_recipe(digits, tmp_path / "run", plugins={n: options[n] for n in order}))

    composed = recipe(["focal_loss", "label_smoothing"])
    criterion = build_plugins(composed).chain("criterion", None, F.cross_entropy)
    torch.manual_seed(2)
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    smoothed = F.one_hot(y, 10).float() * 0.8 + 0.02
    p = F.softmax(logits, -1)
    expected = (-(smoothed * (1 - p) ** 2 * p.log()).sum(-1)).mean()
    assert torch.allclose(criterion(logits, y), expected, atol=1e-6)
    assert not torch.allclose(criterion(logits, y), focal_loss(logits, y, 2.0), atol=1e-3)  # the smoothing acts

    with pytest.raises(LauncherError, match="List 'focal_loss' before 'label_smoothing'"):
        recipe(["label_smoothing", "focal_loss"])
