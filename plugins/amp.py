"""amp: automatic mixed precision through Accelerate (Micikevicius et al. 2018).

bf16 runs on GPUs and on the CPU (torch.autocast). fp16 needs a GPU: Accelerate's
GradScaler scales the loss, the loop unscales the gradients before the
before_optimizer_step hooks, and a step whose gradients overflowed is skipped by the
scaler; skipped steps are counted and logged as `train/skipped_steps`. Weights, optimizer
state and the loss stay in float32.

Hooks: accelerator_options (sets mixed_precision), after_optimizer_step (counts skips),
log_row. State: the skip count (the scaler's own state is Accelerate's).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from launcher.errors import LauncherError
from launcher.registry import Plugin, PluginOptions, register


@register("amp")
class MixedPrecision(Plugin):
    """Mixed precision (bf16 or fp16 with loss scaling) through Accelerate."""

    class Options(PluginOptions):
        dtype: Literal["bf16", "fp16"] = Field("bf16", description="bf16 (GPU or CPU) or fp16 (GPU, loss scaling)")

    skipped = 0

    def accelerator_options(self, ctx, options: dict) -> dict:
        if self.options.dtype == "fp16" and not torch.cuda.is_available():
            raise LauncherError("plugins.amp.dtype=fp16 needs a CUDA GPU (Accelerate has no fp16 loss scaling on "
                                "the CPU); use dtype: bf16 there.")
        return {**options, "mixed_precision": self.options.dtype}

    def after_optimizer_step(self, ctx) -> None:
        if getattr(ctx.optimizer, "step_was_skipped", False):
            self.skipped += 1

    def log_row(self, ctx, row: dict) -> dict:
        if self.options.dtype == "fp16" and "train/loss" in row:
            row["train/skipped_steps"] = self.skipped
        return row

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]
