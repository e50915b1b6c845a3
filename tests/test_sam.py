"""sam: one step equals a direct implementation of the paper's two-step update; ASAM
likewise; BatchNorm statistics are updated once; the loop runs two passes per step."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from launcher.data import Batch
from launcher.loop import RunContext, train
from launcher.config.load import validate_recipe
from launcher.registry import PluginSet
from launcher.plugins.sam import SharpnessAwareMinimization
from tests.conftest import small_recipe


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def reference_sam_step(model, x, y, lr, rho, adaptive=False, eta=0.01):
    """Foret et al. 2021, Algorithm 1 (ASAM: Kwon et al. 2021, eq. 7), written out directly."""
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    bn_after_first = [b.clone() for b in model[1].buffers()]
    with torch.no_grad():
        t = [(p.abs() + eta) if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
        eps = [rho * ti * ti * g / norm for ti, g in zip(t, grads)]
        perturbed = copy.deepcopy(model)
        for p, e in zip(perturbed.parameters(), eps):
            p.add_(e)
    loss2 = F.cross_entropy(perturbed(x), y)
    grads2 = torch.autograd.grad(loss2, list(perturbed.parameters()))
    with torch.no_grad():
        for p, g in zip(params, grads2):
            p.sub_(lr * g)
    return bn_after_first


def launcher_sam_step(model, x, y, lr, **options):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    from launcher.strategies.base import DataParallel

    accelerator = Accelerator(cpu=True)
    ctx = RunContext(recipe=None, accelerator=accelerator, strategy=DataParallel(accelerator), model=model,
                     plugins=PluginSet([]))
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ctx.batch = Batch(images=x, targets=y, ids=torch.arange(len(x)), global_count=len(x))
    ctx.train_step.run(ctx.batch)
    SharpnessAwareMinimization(SharpnessAwareMinimization.Options(**options)).before_optimizer_step(ctx)
    ctx.optimizer.step()


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (False, 0.5), (True, 1.0)])
def test_a_sam_step_equals_the_papers_update(adaptive, rho):
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    ours, ref = tiny_model(), tiny_model()
    bn_expected = reference_sam_step(ref, x, y, lr=0.1, rho=rho, adaptive=adaptive)
    launcher_sam_step(ours, x, y, lr=0.1, rho=rho, adaptive=adaptive)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # BatchNorm running statistics come from the first pass only.
    for a, b in zip(ours[1].buffers(), bn_expected):
        assert torch.equal(a, b)
    # ...and the update is not plain SGD.
    plain = tiny_model()
    loss = F.cross_entropy(plain(x), y)
    loss.backward()
    assert not torch.allclose(plain[0].weight - 0.1 * plain[0].weight.grad, ours[0].weight, atol=1e-6)


def test_the_loop_runs_two_passes_per_step_on_the_same_batch(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 4},
                       plugins={"recorder": {}, "sam": {"rho": 0.05}})  # recipe order = hook order
    train(validate_recipe(raw))
    hooks = json.loads((tmp_path / "run" / "recorder-rank0.json").read_text())["hooks"]
    step = ["transform_batch", "micro_batches", "transform_loss", "before_optimizer_step", "transform_loss",
            "after_optimizer_step"]
    first = hooks.index("transform_batch")
    assert hooks[first:first + 6] == step and hooks.count("transform_loss") == 8


def test_non_finite_gradients_are_not_used_to_perturb():
    """Under fp16 an overflowed first pass must leave the step to the loss scaler to skip."""
    model = tiny_model()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    ctx = RunContext(recipe=None, model=model, plugins=PluginSet([]))
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx.train_step = types.SimpleNamespace(recompute_gradients=lambda: calls.append(1))
    SharpnessAwareMinimization(SharpnessAwareMinimization.Options()).before_optimizer_step(ctx)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isinf(p.grad).all() for p in model.parameters())
