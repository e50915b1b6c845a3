"""amp: automatic mixed precision through Accelerate (Micikevicius et al. 2018).

bf16 and fp16 both run on GPUs and on the CPU (torch.autocast). With fp16 a GradScaler
scales the loss, the loop unscales the gradients before the before_optimizer_step hooks,
and a step whose gradients overflowed is skipped by the scaler; skipped steps are counted
and logged as `train/skipped_steps`. Weights, optimizer state and the loss stay in float32.
On the CPU both are emulated on most processors (slow): meant for GPUs, and for checking a
GPU recipe on a laptop.

Under DeepSpeed the precision maps to DeepSpeed's bf16/fp16 sections instead (launcher/
deepspeed_zero.py): the engine keeps the weights in that dtype with fp32 master weights in the
optimizer, and does its own fp16 loss scaling (GPU only: DeepSpeed's CPU backend has none).

Hooks: accelerator_options (sets mixed_precision), setup (CPU fp16: the scaler),
after_optimizer_step (counts skips), log_row. State: the skip count (the scaler's state is
saved by the checkpoint with the trainer).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

torch = lazy("torch")


@register("amp")
class MixedPrecision(Plugin):
    """Mixed precision (bf16 or fp16 with loss scaling) through Accelerate."""

    class Options(PluginOptions):
        dtype: Literal["bf16", "fp16"] = Field("bf16", description="bf16, or fp16 with loss scaling")

    notes_under = {"deepspeed": "DeepSpeed's bf16/fp16 sections: weights in that dtype, fp32 master weights; "
                                "fp16 needs a GPU (DeepSpeed's CPU backend has no loss scaling)",
                  "fsdp": "bf16: FSDP2's MixedPrecisionPolicy (bf16 weights gathered, fp32 gradient reduction, "
                          "BatchNorm in fp32) plus autocast; distributed.fsdp_mixed_precision=autocast: autocast over "
                          "the fp32 shards, as under DDP"}
    refused_under = {"fsdp/fp16": "fp16's loss scaling over FSDP's sharded gradients is not tested yet; use bf16"}

    @classmethod
    def precision(cls, options) -> str:
        return options.dtype

    skipped = 0

    def accelerator_options(self, ctx, options: dict) -> dict:
        return {**options, "mixed_precision": self.options.dtype}

    def setup(self, ctx) -> None:
        accelerator = ctx.accelerator
        if (self.options.dtype == "fp16" and accelerator.scaler is None and accelerator.device.type == "cpu"
                and ctx.recipe.distributed.strategy == "ddp"):
            # Written by hand: Accelerate turns fp16 off on the CPU (no scaler, no autocast),
            # while torch has both. Set before prepare(), so the wrapped optimizer uses it.
            accelerator.scaler = torch.amp.GradScaler("cpu")
            accelerator.native_amp = True

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
