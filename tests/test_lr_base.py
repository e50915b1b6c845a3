"""optimizer.lr_base: lr from the global batch by timm's rule; --check says how it was reached;
the resolved recipe records it and reloads; lr and lr_base together are refused. (1 process
against 2 with the same global batch, the same lr: tests/test_distributed.py::test_one_process_two...)"""

from __future__ import annotations

import math

import pytest
import yaml

from launcher.__main__ import main
from launcher.config.load import resolve_lr, validate_recipe
from launcher.errors import LauncherError
from launcher.loop import train
from tests.conftest import small_recipe


def timm_lr(lr_base, batch_size, world_size, lr_base_size, opt, lr_base_scale=""):
    """timm's train.py (1.0), the lines that set args.lr when --lr is not given (grad_accum_steps 1:
    this launcher's batch_size is the whole per-process batch, which grad_accum splits)."""
    global_batch_size = batch_size * world_size * 1
    batch_ratio = global_batch_size / lr_base_size
    if not lr_base_scale:
        on = opt.lower()
        lr_base_scale = 'sqrt' if any([o in on for o in ('ada', 'lamb')]) else 'linear'
    if lr_base_scale == 'sqrt':
        batch_ratio = batch_ratio ** 0.5
    return lr_base * batch_ratio


def recipe_with(digits, tmp_path, batch_size=32, **optimizer):
    raw = small_recipe(digits, tmp_path / "run", data={"batch_size": batch_size})
    raw["optimizer"] = {"weight_decay": 5e-4, **optimizer}
    return validate_recipe(raw)


@pytest.mark.parametrize("name, scale", [("momentum", None), ("adamw", None), ("lamb", None), ("adamw", "linear"),
                                         ("sgd", "sqrt")])
def test_lr_follows_timms_rule(digits, tmp_path, name, scale):
    for world_size, batch_size in ((1, 32), (4, 96), (16, 128)):
        options = {"name": name, "lr_base": 0.1, "lr_base_size": 512, **({"lr_base_scale": scale} if scale else {})}
        recipe = recipe_with(digits, tmp_path, batch_size, **options)
        how = resolve_lr(recipe, world_size)
        expected = timm_lr(0.1, batch_size, world_size, 512, name, scale or "")
        assert math.isclose(recipe.optimizer.lr, expected, rel_tol=1e-12), (name, world_size, how)
        assert recipe.optimizer.lr_base_global_batch == batch_size * world_size
        assert f"global batch {batch_size * world_size} = data.batch_size {batch_size} x {world_size} process" in how


def test_check_prints_the_resolved_lr_and_how(digits, tmp_path, monkeypatch, capsys):
    path = tmp_path / "recipe.yaml"
    raw = small_recipe(digits, tmp_path / "run")
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--check", str(path), "~optimizer.lr", "optimizer.lr_base=0.1"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)["optimizer"]
    assert printed["lr"] == pytest.approx(0.05) and printed["lr_base_global_batch"] == 128  # 0.1 x 32 x 4 / 256
    assert "# optimizer.lr 0.05 = lr_base 0.1 x 128 / 256 (linear, timm's default for momentum); global batch 128 = " \
           "data.batch_size 32 x 4 processes" in out


def test_lr_and_lr_base_together_are_refused_and_a_resolved_recipe_reloads(digits, tmp_path):
    with pytest.raises(LauncherError, match="optimizer.lr and optimizer.lr_base are both given"):
        recipe_with(digits, tmp_path, name="momentum", lr=0.05, lr_base=0.1)
    ctx = train(validate_recipe({**small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 2}),
                                 "optimizer": {"name": "momentum", "lr_base": 0.4}}))
    assert ctx.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.4 * 32 / 256)  # what the run trained with
    recorded = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert recorded["optimizer"]["lr"] == pytest.approx(0.05) and recorded["optimizer"]["lr_base_global_batch"] == 32
    assert validate_recipe(recorded).optimizer.lr == pytest.approx(0.05)  # a run's recipe.yaml loads again
    recorded["optimizer"]["lr"] = 0.3  # edited: not what lr_base gives at the recorded batch
    with pytest.raises(LauncherError, match="is not what lr_base 0.4 gives at the recorded global batch 32"):
        validate_recipe(recorded)
