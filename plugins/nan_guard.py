"""nan_guard: catch non-finite gradients before they reach the weights.

Before each optimizer step the gradients (complete, all-reduced, so every rank sees the
same) are checked. `skip`: the step is dropped (gradients set to None, so the optimizer
leaves the weights and its momentum alone) and counted as `train/nan_skipped_steps`.
`stop`: the run stops with a message naming the step, the learning rate and the batch's
sample ids, and the usual causes. Under fp16, overflows are the loss scaler's business and
are left to it.

Hooks: before_optimizer_step, log_row. State: the count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from launcher.errors import LauncherError
from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

torch = lazy("torch")


def gradients_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for g in grads])).all())


@register("nan_guard")
class NanGuard(Plugin):
    """Skip (or stop at) optimizer steps whose gradients are NaN or infinite."""

    class Options(PluginOptions):
        action: Literal["skip", "stop"] = Field("skip", description="skip the step, or stop the run with a diagnosis")

    refused_under = {"deepspeed": "it checks the gradients between backward and the optimizer step, and DeepSpeed's "
                                  "engine steps inside its backward (DeepSpeed's fp16 skips overflowing steps itself)"}

    skipped = 0

    def before_optimizer_step(self, ctx) -> None:
        if ctx.accelerator.scaler is not None:
            return  # fp16: the GradScaler already skips overflowed steps
        params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        if gradients_finite(params):
            return
        if self.options.action == "stop":
            lr = ctx.optimizer.param_groups[0]["lr"]
            ids = ctx.batch.ids[:8].tolist() if ctx.batch is not None else []
            raise LauncherError(
                f"Non-finite gradients at step {ctx.step + 1} (epoch {ctx.epoch}, lr {lr:.3g}, first sample ids "
                f"{ids}). Likely causes: a learning rate too high (lower optimizer.lr or add warmup), an fp16 "
                "overflow (use bf16 or plugins.amp with loss scaling), or a bad sample (inspect those ids).")
        for p in params:
            p.grad = None  # optimizers skip parameters without gradients: no update, no momentum change
        self.skipped += 1

    def log_row(self, ctx, row: dict) -> dict:
        if "train/loss" in row:
            row["train/nan_skipped_steps"] = self.skipped
        return row

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]
