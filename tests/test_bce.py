"""bce: the loop's training loss equals timm's BinaryCrossEntropy (and the formula) on hard,
smoothed and mixed targets, with its options; the combinations that would drop a loss are refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy

from launcher.config.load import validate_recipe
from launcher.errors import LauncherError
from launcher.loop import train
from launcher.registry import build_plugins
from tests.conftest import small_recipe
from tests.test_mixup import mix


def criterion(digits, tmp_path, **plugins):
    """The training loss the loop builds from these plugins (in this order)."""
    recipe = validate_recipe(small_recipe(digits, tmp_path / "run", plugins=plugins))
    return build_plugins(recipe).chain("criterion", None, F.cross_entropy)


def test_hard_and_smoothed_targets_equal_timm_and_the_formula(digits, tmp_path):
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    plain = criterion(digits, tmp_path, bce={})
    expected = -(F.one_hot(y, 10) * F.logsigmoid(logits) + (1 - F.one_hot(y, 10)) * F.logsigmoid(-logits)).mean()
    assert torch.allclose(plain(logits, y), expected, atol=1e-6)
    assert torch.allclose(plain(logits, y), BinaryCrossEntropy(smoothing=0.0)(logits, y), atol=1e-6)
    # label_smoothing after bce is timm's BCE smoothing (on 1 - eps + eps/C, off eps/C).
    smoothed = criterion(digits, tmp_path, bce={}, label_smoothing={"smoothing": 0.1})
    assert torch.allclose(smoothed(logits, y), BinaryCrossEntropy(smoothing=0.1)(logits, y), atol=1e-6)
    assert not torch.allclose(smoothed(logits, y), plain(logits, y), atol=1e-3)


def test_threshold_pos_weight_and_sum_over_classes_equal_timm_and_the_formula(digits, tmp_path):
    torch.manual_seed(1)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    options = {"target_threshold": 0.2, "pos_weight": 3.0, "sum_classes": True}
    loss = criterion(digits, tmp_path, bce=options, label_smoothing={"smoothing": 0.1})(logits, y)
    assert torch.allclose(loss, BinaryCrossEntropy(smoothing=0.1, **options)(logits, y), atol=1e-5)
    t = F.one_hot(y, 10).float()  # smoothed targets are 0.91 / 0.01: the threshold 0.2 gives back 1 / 0
    by_hand = -(3.0 * t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits)).sum(-1).mean()
    assert torch.allclose(loss, by_hand, atol=1e-5)


def test_mixed_targets_equal_timms_mixup_then_bce(digits, tmp_path):
    """mixup, then bce with label_smoothing: timm's train.py with --bce-loss (Mixup smoothing the
    mixed one-hot targets, BinaryCrossEntropy taking them as they are)."""
    x, y, out = mix(n=8, mixup_alpha=0.4, cutmix_alpha=0.0)
    lam = out.targets[0, y[0]].item()
    torch.manual_seed(2)
    logits = torch.randn(8, 9)
    loss = criterion(digits, tmp_path, bce={}, label_smoothing={"smoothing": 0.1})(logits, out.targets)
    reference = BinaryCrossEntropy()(logits, mixup_target(y, 9, lam, smoothing=0.1))
    assert torch.allclose(loss, reference, atol=1e-6)


def test_the_loop_trains_with_it(digits, tmp_path):
    """The first logged training loss is a binary cross-entropy (about ln 2 per class at the start),
    not the softmax cross-entropy (about ln 10)."""
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10}, run={
        "dir": str(tmp_path / "run"), "log_every": 1, "progress": False}, plugins={"bce": {}})
    train(validate_recipe(raw))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert abs(losses[0] - 0.69) < 0.15 and losses[-1] < losses[0], losses


def test_combinations_that_would_drop_a_loss_are_refused(digits, tmp_path):
    with pytest.raises(LauncherError, match="List 'bce' before 'label_smoothing'"):
        criterion(digits, tmp_path, label_smoothing={"smoothing": 0.1}, bce={})
    for order in (["bce", "focal_loss"], ["focal_loss", "bce"]):
        with pytest.raises(LauncherError, match="'bce' and 'focal_loss' cannot run together|'focal_loss' and 'bce'"):
            criterion(digits, tmp_path, **{name: {} for name in order})
