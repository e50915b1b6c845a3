"""grad_accum: k micro-batches of b give the update of one batch of k*b; a short last batch
is handled; mode auto recovers from an injected out-of-memory error, records the
micro-batch that fit, and then trains exactly like a fixed run with that k."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from launcher.data import Batch
from launcher.errors import LauncherError
from launcher.loop import RunContext, train
from launcher.config.load import validate_recipe
from launcher.registry import Plugin, PluginOptions, PluginSet, register
from launcher.plugins.grad_accum import GradientAccumulation
from tests.conftest import small_recipe


def test_split_batch_keeps_order_and_handles_short_batches():
    batch = Batch(images=torch.arange(7.0)[:, None], targets=torch.arange(7), ids=torch.arange(7), global_count=7)
    parts = batch.split(3)
    assert [p.targets.tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [len(p.targets) for p in batch.split(10)] == [1] * 7  # never an empty micro-batch
    assert all(p.global_count == 7 for p in parts)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


def sgd_steps(k, batches, momentum=0.9):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    model = mlp()
    import types

    from launcher.strategies.base import DataParallel

    accelerator = Accelerator(cpu=True)
    ddp = types.SimpleNamespace(distributed=types.SimpleNamespace(strategy="ddp", stage=None))
    plugins = [GradientAccumulation(GradientAccumulation.Options(micro_batches=k))] if k > 1 else []
    ctx = RunContext(recipe=ddp, accelerator=accelerator, strategy=DataParallel(accelerator), model=model,
                     plugins=PluginSet(plugins))
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for x, y in batches:
        ctx.batch = Batch(images=x, targets=y, ids=torch.arange(len(y)), global_count=len(y))
        ctx.micro_batch_count = ctx.plugins.chain("micro_batches", ctx, 1)  # as the loop does
        ctx.train_step.run(ctx.batch)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("k", [2, 4, 5])
def test_k_micro_batches_equal_one_big_batch(k):
    torch.manual_seed(1)
    batches = [(torch.randn(n, 6), torch.randint(0, 4, (n,))) for n in (40, 40, 40, 13)]  # short last batch
    one, accumulated = sgd_steps(1, batches), sgd_steps(k, batches)
    for a, b in zip(one.parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@register("test_oom_above")
class OutOfMemoryAbove(Plugin):
    """Test helper: training passes raise torch.OutOfMemoryError on batches above `limit`."""

    class Options(PluginOptions):
        limit: int = 8

    def setup(self, ctx):
        forward, limit = ctx.model.forward, self.options.limit

        def guarded(x):
            if torch.is_grad_enabled() and x.shape[0] > limit:  # training passes only
                raise torch.OutOfMemoryError(f"fake: {x.shape[0]} > {limit}")
            return forward(x)

        ctx.model.forward = guarded


def test_auto_mode_recovers_from_out_of_memory_like_a_fixed_run(digits, tmp_path):
    auto = small_recipe(digits, tmp_path / "auto", train={"epochs": 1, "max_steps": 6},
                        plugins={"test_oom_above": {"limit": 8}, "grad_accum": {"micro_batches": 1, "mode": "auto"}})
    ctx = train(validate_recipe(auto))
    assert json.loads((tmp_path / "auto" / "grad_accum.json").read_text()) == {"micro_batches": 4,
                                                                               "micro_batch_size": 8}
    state = next(p for p in ctx.plugins if p.name == "grad_accum").state_dict()
    assert state == {"micro_batches": 4, "settled": True}
    fixed = small_recipe(digits, tmp_path / "fixed", train={"epochs": 1, "max_steps": 6},
                         plugins={"grad_accum": {"micro_batches": 4}})
    train(validate_recipe(fixed))
    a = load_file(tmp_path / "auto" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fixed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same data order, same BN statistics, same weights


def test_auto_mode_gives_up_at_the_floor_with_advice(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 2},
                       plugins={"test_oom_above": {"limit": 3},
                                "grad_accum": {"micro_batches": 1, "mode": "auto", "min_micro_batch": 8}})
    with pytest.raises(LauncherError, match="Out of memory even with micro-batches of 8 samples"):
        train(validate_recipe(raw))


def test_fixed_mode_out_of_memory_names_the_setting_to_change(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 2},
                       plugins={"test_oom_above": {"limit": 8}, "grad_accum": {"micro_batches": 2}})
    with pytest.raises(LauncherError, match="Set plugins.grad_accum.micro_batches=4"):
        train(validate_recipe(raw))


def test_more_micro_batches_than_samples_is_refused(digits, tmp_path):
    with pytest.raises(LauncherError, match="micro_batches=64 is more than data.batch_size=32"):
        validate_recipe(small_recipe(digits, tmp_path, plugins={"grad_accum": {"micro_batches": 64}}))
