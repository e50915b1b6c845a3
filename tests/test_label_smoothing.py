"""label_smoothing against torch's own label_smoothing, for hard and soft targets."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from launcher.loop import RunContext, cross_entropy, train
from launcher.config.load import validate_recipe
from launcher.plugins.label_smoothing import LabelSmoothing, smooth_targets
from tests.conftest import small_recipe


def smoothed_criterion(eps):
    return LabelSmoothing(LabelSmoothing.Options(smoothing=eps)).criterion(RunContext(recipe=None), cross_entropy)


def test_equals_torch_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 10), torch.randint(0, 10, (16,))
    for eps in (0.0, 0.1, 0.3):
        ours = smoothed_criterion(eps)(logits, targets)
        assert torch.allclose(ours, F.cross_entropy(logits, targets, label_smoothing=eps), atol=1e-6)


def test_soft_targets_are_smoothed_like_timm_mixup_does():
    from timm.data.mixup import mixup_target

    torch.manual_seed(0)
    a, lam, eps = torch.randint(0, 10, (8,)), 0.7, 0.1
    b = a.flip(0)  # timm mixes each sample with the batch flipped
    mixed = lam * F.one_hot(a, 10).float() + (1 - lam) * F.one_hot(b, 10).float()
    assert torch.allclose(smooth_targets(mixed, 10, eps), mixup_target(a, 10, lam, eps), atol=1e-6)
    logits = torch.randn(8, 10)
    expected = -(mixup_target(a, 10, lam, eps) * F.log_softmax(logits, -1)).sum(-1).mean()
    assert torch.allclose(smoothed_criterion(eps)(logits, mixed), expected, atol=1e-6)


def test_in_a_run_the_training_loss_is_smoothed_and_evaluation_is_not(digits, tmp_path):
    """The smoothed loss can never fall below the entropy of the smoothed target (1.68 nats
    for eps=0.5 over 10 classes); the plain evaluation loss of a trained model does."""
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1}, run={"log_every": 1},
                       plugins={"label_smoothing": {"smoothing": 0.5}})
    ctx = train(validate_recipe(raw))
    assert ctx.criterion is not cross_entropy
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    entropy = -(0.55 * torch.log(torch.tensor(0.55)) + 9 * 0.05 * torch.log(torch.tensor(0.05))).item()
    assert all(r["train/loss"] >= entropy for r in rows if "train/loss" in r)
    assert rows[-1]["val/loss"] < entropy  # plain cross-entropy at evaluation
