"""layer_lr: discriminative LRs scale each layer block's SGD update exactly by its LR;
blocks follow timm's layer groups; a frozen backbone stays bit-identical and the optimizer
never steps it, then trains after unfreezing."""

from __future__ import annotations

import pytest
import timm
import torch
from accelerate.utils import set_seed

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.models.factory import create_model
from launcher.config.load import validate_recipe
from launcher.plugins.layer_lr import layer_blocks
from tests.conftest import small_recipe


def test_blocks_follow_timm_layer_groups_early_to_late():
    model = timm.create_model("resnet18", num_classes=10)
    blocks = layer_blocks(model, 3)
    assert "conv1.weight" in blocks[0] and "fc.weight" in blocks[-1] and "layer4.1.conv2.weight" in blocks[-1]
    assert sorted(n for b in blocks for n in b) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="only 5 layer groups"):
        layer_blocks(timm.create_model("wrn10_1", num_classes=10), 6)


def one_sgd_step(digits, run_dir, **plugins):
    """Weights before and after one plain SGD step (no momentum, no weight decay)."""
    raw = small_recipe(digits, run_dir, train={"epochs": 1, "max_steps": 1}, data={"val": None},
                       optimizer={"name": "momentum", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
                       schedule={"name": "constant", "warmup_epochs": 0}, plugins=plugins)
    recipe = validate_recipe(raw)
    set_seed(recipe.seed)
    before = {n: p.detach().clone() for n, p in create_model(recipe.model).named_parameters()}
    ctx = train(recipe)
    after = dict(ctx.accelerator.unwrap_model(ctx.model).named_parameters())
    return before, after, ctx


def test_each_block_moves_by_its_own_lr(digits, tmp_path):
    """SGD is linear in the LR: with lrs [0.001, 0.01, 0.1] each block's update is lr/0.1 times
    the update of a plain run at 0.1 on the same batch."""
    before, plain, _ = one_sgd_step(digits, tmp_path / "plain")
    _, disc, ctx = one_sgd_step(digits, tmp_path / "disc", layer_lr={"lrs": [0.001, 0.01, 0.1]})
    blocks = layer_blocks(ctx.accelerator.unwrap_model(ctx.model), 3)
    assert sorted({g["lr"] for g in ctx.optimizer.param_groups}) == [0.001, 0.01, 0.1]
    for block, lr in zip(blocks, (0.001, 0.01, 0.1)):
        for name in block:
            expected = (plain[name] - before[name]) * (lr / 0.1)
            assert torch.allclose(disc[name] - before[name], expected, atol=1e-7, rtol=1e-4), name


def test_the_schedule_scales_every_block_alike(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 12}, data={"val": None},
                       schedule={"name": "cosine", "warmup_epochs": 0}, plugins={"layer_lr": {"lrs": [0.01, 0.1]}})
    ctx = train(validate_recipe(raw))
    factors = {round(g["lr"] / (0.01 if g["layer_block"] == 0 else 0.1), 12) for g in ctx.optimizer.param_groups}
    assert len(factors) == 1 and 0 < factors.pop() < 1  # cosine at step 12 of 45: one factor for all


def test_frozen_backbone_is_bit_identical_and_never_stepped_then_trains(digits, tmp_path):
    plugins = {"layer_lr": {"freeze_epochs": 1}}
    # 10 steps of the frozen first epoch, with momentum and weight decay
    raw = small_recipe(digits, tmp_path / "frozen", train={"epochs": 2, "max_steps": 10}, data={"val": None},
                       plugins=plugins)
    recipe = validate_recipe(raw)
    set_seed(recipe.seed)
    before = {n: p.detach().clone() for n, p in create_model(recipe.model).named_parameters()}
    ctx = train(recipe)
    model = ctx.accelerator.unwrap_model(ctx.model)
    head = {n for n, _ in model.get_classifier().named_parameters(prefix="fc")}
    stepped = {id(p) for p in ctx.optimizer.optimizer.state}
    for name, p in model.named_parameters():
        if name in head:
            assert not torch.equal(p, before[name]) and id(p) in stepped, name
        else:
            assert torch.equal(p, before[name]) and id(p) not in stepped, name
    # Second epoch: unfrozen, everything trains.
    raw = small_recipe(digits, tmp_path / "unfrozen", train={"epochs": 2}, data={"val": None, "batch_size": 256},
                       plugins=plugins)
    ctx = train(validate_recipe(raw))
    model = ctx.accelerator.unwrap_model(ctx.model)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_bad_options_are_refused(digits, tmp_path):
    with pytest.raises(LauncherError, match="freezes the whole run"):
        validate_recipe(small_recipe(digits, tmp_path, plugins={"layer_lr": {"freeze_epochs": 1}}))
    with pytest.raises(LauncherError, match="only 5 layer groups"):
        train(validate_recipe(small_recipe(digits, tmp_path, plugins={"layer_lr": {"lrs": [0.1] * 6}})))
