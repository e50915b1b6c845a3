"""The optimizer, its parameter groups and the LR schedule, built from the recipe's
`optimizer:` and `schedule:` sections with timm's factories.

The schedule is stepped per optimizer step (`step_update(step)`), and its value is a function
of the recipe and the step only, so a resume rebuilds it instead of restoring it.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from launcher.errors import LauncherError, did_you_mean


def default_param_groups(model: nn.Module, section) -> list[dict]:
    """timm's grouping: with weight decay, biases and norm weights (1-d parameters, and the
    model's no_weight_decay() names) go to a group without decay."""
    from timm.optim import param_groups_weight_decay

    if section.weight_decay and not section.decay_bias_and_norm:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        try:
            groups = param_groups_weight_decay(model, section.weight_decay, no_weight_decay_list=skip,
                                               weight_decay_exclude_1d=True)
        except TypeError:  # timm before the exclude_1d switch always excluded 1-d parameters
            groups = param_groups_weight_decay(model, section.weight_decay, no_weight_decay_list=skip)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return [g for g in groups if g["params"]]


def create_optimizer(section, groups: list[dict], fused: bool = False) -> torch.optim.Optimizer:
    """timm's optimizer factory over parameter groups (plugins may have set per-group lr).
    fused: use torch's fused (one-kernel) implementation where the optimizer has one."""
    from timm.optim import create_optimizer_v2, list_optimizers

    if section.name not in list_optimizers():
        raise LauncherError(f"Unknown optimizer '{section.name}' (optimizer.name)."
                            f"{did_you_mean(section.name, list_optimizers())}")
    kwargs = {**fused_kwargs(section.name), **section.kwargs} if fused else dict(section.kwargs)
    if section.name in ("sgd", "momentum", "nesterov", "rmsprop", "lars", "nlars"):
        kwargs.setdefault("momentum", section.momentum)
    try:
        return create_optimizer_v2(groups, opt=section.name, lr=section.lr, weight_decay=section.weight_decay,
                                   **kwargs)
    except TypeError as err:
        raise LauncherError(f"optimizer options do not fit '{section.name}': {err}") from None


def fused_kwargs(name: str) -> dict:
    """{"fused": True} where timm's `name` is a torch optimizer with a fused CUDA kernel (SGD, Adam,
    AdamW, Adagrad...): the whole update in one kernel instead of one per tensor group (foreach,
    torch's CUDA default, which timm's own optimizers use). Both are deterministic."""
    import inspect

    from timm.optim import get_optimizer_class

    cls = get_optimizer_class(name, bind_defaults=False)
    torch_fused = cls.__module__.startswith("torch.optim") and "fused" in inspect.signature(cls).parameters
    return {"fused": True} if torch_fused else {}


def create_schedule(section, optimizer, epochs: int, steps_per_epoch: int):
    """timm's scheduler, stepped per optimizer step (so warmup is smooth, not per epoch)."""
    from timm.scheduler import create_scheduler_v2

    if section.name == "constant" and not section.warmup_epochs:
        return None
    if section.name == "onecycle":
        return OneCycleSchedule(optimizer, section, max(1, round(epochs * steps_per_epoch)))
    # Warmup comes first, then the decay runs over the remaining steps (timm's warmup_prefix);
    # with restarts, the first cycle's length is chosen so that all cycles fill those steps.
    decay_epochs = max(epochs - section.warmup_epochs, 1.0 / steps_per_epoch)
    cycle_total = sum(section.cycle_mul ** i for i in range(section.cycles))
    first_cycle = decay_epochs / cycle_total if section.name == "cosine" else decay_epochs
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=section.name,
        num_epochs=max(1, round(first_cycle * steps_per_epoch)) / steps_per_epoch,
        warmup_epochs=section.warmup_epochs,
        warmup_prefix=True,
        warmup_lr=section.warmup_lr,
        min_lr=section.min_lr,
        cycle_limit=section.cycles,
        cycle_mul=section.cycle_mul,
        cycle_decay=section.cycle_decay,
        decay_epochs=section.decay_epochs,
        decay_milestones=section.decay_milestones,
        decay_rate=section.decay_rate,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


class OneCycleSchedule:
    """The one-cycle policy (Smith & Topin 2017) as torch's OneCycleLR, driven like timm's
    schedulers: step_update(n) sets the LR (and momentum) of optimizer step n. OneCycleLR's
    value depends only on its step counter, so setting the counter makes it stateless (what a
    resume needs). Each parameter group peaks at its own initial LR."""

    def __init__(self, optimizer, section, total_steps: int):
        from torch.optim.lr_scheduler import OneCycleLR

        momentum = section.cycle_momentum and ("momentum" in optimizer.defaults or "betas" in optimizer.defaults)
        if momentum and optimizer.defaults.get("momentum", 1.0) == 0:
            momentum = False  # plain SGD has no momentum to cycle
        self.total_steps = total_steps
        self.schedule = OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                   total_steps=total_steps, pct_start=section.pct_start,
                                   div_factor=section.div_factor, final_div_factor=section.final_div_factor,
                                   cycle_momentum=momentum)

    def step_update(self, num_updates: int) -> None:
        import warnings

        self.schedule.last_epoch = min(num_updates, self.total_steps - 1) - 1
        with warnings.catch_warnings():  # "step() before optimizer.step()": we set the step directly
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.schedule.step()

    def state_dict(self) -> dict:
        return {}  # nothing: the values follow from the step count

    def load_state_dict(self, state: dict) -> None:
        pass
