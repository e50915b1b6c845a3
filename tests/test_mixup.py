"""mixup / cutmix: the mixed images and soft targets follow the papers' definitions for the
lam that was drawn; odd batches and the switch-off epoch; composition with label smoothing."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.data import Batch
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.mixup import MixupCutmix
from tests.conftest import small_recipe


def mix(n=8, epoch=0, seed=0, **options):
    plugin = MixupCutmix(MixupCutmix.Options(**options))
    ctx = types.SimpleNamespace(recipe=types.SimpleNamespace(model=types.SimpleNamespace(num_classes=n + 1)),
                                epoch=epoch)
    plugin.setup(ctx)
    torch.manual_seed(seed)
    np.random.seed(seed)
    x = torch.rand(n, 3, 16, 16)
    y = torch.arange(n)  # every sample differs from its partner (the batch reversed)
    out = plugin.transform_batch(ctx, Batch(images=x.clone(), targets=y.clone(), ids=y.clone(), global_count=n))
    return x, y, out


def test_mixup_is_a_convex_combination_with_the_reversed_batch():
    x, y, out = mix(mixup_alpha=0.4, cutmix_alpha=0.0)
    lam = out.targets[0, y[0]].item()
    assert 0.0 < lam < 1.0
    assert torch.allclose(out.images, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    expected = lam * F.one_hot(y, 9).float() + (1 - lam) * F.one_hot(y.flip(0), 9).float()
    assert torch.allclose(out.targets, expected, atol=1e-6)


def test_cutmix_pastes_a_box_whose_area_matches_the_target_weights():
    for seed in range(5):
        x, y, out = mix(seed=seed, mixup_alpha=0.0, cutmix_alpha=1.0)
        lam = out.targets[0, y[0]].item()
        from_partner = (out.images == x.flip(0)).all(dim=1)  # (n, H, W): pixels taken from the partner
        from_self = (out.images == x).all(dim=1)
        assert torch.all(from_partner | from_self)
        assert from_partner[0].float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
        rows, cols = torch.nonzero(from_partner[0], as_tuple=True)
        if len(rows):  # the pasted region is one rectangle
            box = from_partner[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()


def test_an_odd_batch_mixes_all_but_its_last_sample():
    x, y, out = mix(n=7, mixup_alpha=0.4, cutmix_alpha=0.0)
    assert torch.equal(out.images[6], x[6]) and torch.equal(out.targets[6], F.one_hot(y[6], 8).float())
    assert not torch.equal(out.images[0], x[0])


def test_mixing_stops_at_off_epoch():
    x, y, out = mix(epoch=3, off_epoch=3)
    assert torch.equal(out.images, x) and torch.equal(out.targets, y)


def test_runs_with_label_smoothing_on_soft_targets(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10},
                       plugins={"mixup": {}, "label_smoothing": {"smoothing": 0.1}})
    train(validate_recipe(raw))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r) and rows[-1]["val/samples"] == 360
