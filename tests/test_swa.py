"""swa: the average, the LR and the BatchNorm statistics are torch's swa_utils driven by hand on
the same steps; val_swa is the exported weights' evaluation. (Resume: test_checkpoint.py's
every-plugin test; 2 processes: test_multiprocess.py's saved-weights test.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from launcher.commands.evaluate import main as evaluate
from launcher.config.load import validate_recipe
from launcher.data import EvalStream, batches, on_device
from launcher.data.transforms import ImageTransform
from launcher.loop import train
from launcher.optim import create_schedule
from launcher.registry import Plugin, register
from tests.conftest import small_recipe


@register("test_swa_probe")
class SwaProbe(Plugin):
    """Test helper: the LR of every step, and the weights at every epoch's end."""

    def setup(self, ctx):
        self.lrs, self.snapshots, self.initial = {}, [], copy.deepcopy(ctx.model)

    def before_optimizer_step(self, ctx):
        self.lrs[ctx.step + 1] = ctx.optimizer.param_groups[0]["lr"]

    def after_optimizer_step(self, ctx):
        if ctx.step_in_epoch >= ctx.steps_per_epoch:
            self.snapshots.append((ctx.epoch, copy.deepcopy(ctx.accelerator.unwrap_model(ctx.model).state_dict())))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)` before")  # the reference optimizer never steps
def test_average_lr_and_statistics_are_torchs_swa_utils(digits, tmp_path, capsys):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 4},
                       plugins={"swa": {"start": 0.5, "swa_lr": 0.02, "anneal_epochs": 1}, "test_swa_probe": {}})
    ctx = train(validate_recipe(raw))
    probe = next(p for p in ctx.plugins if p.name == "test_swa_probe")
    steps = ctx.steps_per_epoch  # 45: epochs 2 and 3 (from 0.5 x 4) are averaged at their ends

    # The average: torch's AveragedModel fed the weights at the ends of epochs 2 and 3.
    reference = AveragedModel(probe.initial)
    for epoch, state in probe.snapshots:
        if epoch >= 2:
            model = copy.deepcopy(probe.initial)
            model.load_state_dict(state)
            reference.update_parameters(model)
    assert int(reference.n_averaged) == 2
    exported = load_file(tmp_path / "run" / "final" / "swa.safetensors")
    for name, value in reference.module.named_parameters():
        assert torch.equal(exported[name], value.detach()), name

    # The LR: the schedule's until epoch 2; then SWALR, created at its start from the schedule's
    # value and stepped at each averaging update.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    schedule = create_schedule(ctx.recipe.schedule, optimizer, 4, steps)
    expected = {}
    for step in range(1, 2 * steps + 1):
        schedule.step_update(step - 1)
        expected[step] = optimizer.param_groups[0]["lr"]
    schedule.step_update(2 * steps)  # the loop's update after step 90, which SWALR starts from
    swalr = SWALR(optimizer, swa_lr=0.02, anneal_epochs=1, anneal_strategy="cos")
    for epoch in (2, 3):
        for step in range(epoch * steps + 1, (epoch + 1) * steps + 1):
            expected[step] = swalr.get_last_lr()[0]
        swalr.step()
    assert probe.lrs.keys() == expected.keys()
    for step in expected:
        assert probe.lrs[step] == pytest.approx(expected[step], rel=1e-12), step
    assert expected[2 * steps + 1] != expected[2 * steps] and expected[4 * steps] == pytest.approx(0.02)

    # BatchNorm statistics: update_bn over the training images, as evaluated.
    model = copy.deepcopy(reference.module)
    transform = ImageTransform(ctx.recipe.data, 3, train=False)
    stream = EvalStream(ctx.train_index, transform, 64, 0, 1)
    update_bn((b.images for b in on_device(batches(stream, 0), torch.device("cpu"), torch.contiguous_format,
                                           transform.finish)), model)
    for name, value in model.named_buffers():
        assert torch.equal(exported[name], value), name
    assert not torch.equal(exported["norm.running_mean"], probe.initial.state_dict()["norm.running_mean"])

    # val_swa in the last row is what `evaluate --weights swa` computes from the exported file.
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert all(f"val_swa/{k}" in final for k in ("loss", "top1")) and final["step"] == 4 * steps
    capsys.readouterr()
    assert evaluate([str(tmp_path / "run"), "--weights", "swa"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["val_swa/top1"] == final["val_swa/top1"]
    assert scored["val_swa/loss"] == pytest.approx(final["val_swa/loss"], rel=1e-6)


def test_a_run_that_ends_before_the_start_averages_nothing_and_says_so(digits, tmp_path, capsys):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 4, "max_steps": 10}, plugins={"swa": {}})
    train(validate_recipe(raw))
    assert not (tmp_path / "run" / "final" / "swa.safetensors").exists()
    assert "swa averaged nothing: it starts at epoch 3" in capsys.readouterr().err
