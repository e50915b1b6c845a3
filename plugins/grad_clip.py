"""grad_clip: gradient clipping by global norm (Pascanu et al. 2013) or by value.

Runs before the optimizer step, on complete, unscaled gradients (the loop unscales fp16
gradients first), through Accelerate's clip_grad_norm_ / clip_grad_value_, which know
about DDP and sharded models. The global norm before clipping is logged as
`train/grad_norm` (the value at the logged step). With SAM, recipe order decides which
gradient is clipped: list grad_clip after sam to clip the gradient the optimizer uses.

Under DeepSpeed the engine clips inside its step: max_norm becomes DeepSpeed's
`gradient_clipping` (2-norm); value clipping and other norms have no DeepSpeed equivalent
and are refused when the recipe loads.

Hooks: accelerator_options (DeepSpeed), before_optimizer_step, log_row. No state.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register


@register("grad_clip")
class GradientClipping(Plugin):
    """Clip gradients by global norm or by value before each optimizer step."""

    class Options(PluginOptions):
        max_norm: Optional[float] = Field(1.0, gt=0.0, description="clip the global gradient norm to this")
        norm_type: float = Field(2.0, gt=0.0, description="the p of the p-norm")
        value: Optional[float] = Field(None, gt=0.0, description="clip each gradient entry to [-value, value]")

    notes_under = {"deepspeed": "max_norm (2-norm) only, as DeepSpeed's gradient_clipping",
                   "fsdp": "max_norm (2-norm) only, over the sharded gradients"}

    @classmethod
    def check_recipe(cls, recipe, options):
        if options.max_norm is None and options.value is None:
            return "set max_norm or value (or both)"
        if recipe.distributed.strategy == "deepspeed" and (options.value is not None or options.norm_type != 2.0):
            return ("under DeepSpeed only 2-norm clipping (max_norm, norm_type 2) exists, as DeepSpeed's "
                    "gradient_clipping; remove value / norm_type")
        if recipe.distributed.strategy == "fsdp" and (options.value is not None or options.norm_type != 2.0):
            return ("under FSDP only 2-norm clipping (max_norm, norm_type 2) is tested so far (over the sharded "
                    "gradients); remove value / norm_type, or train with ddp")
        return None

    last_norm = None

    @classmethod
    def clipping_norm(cls, options) -> Optional[float]:
        return options.max_norm  # DeepSpeed's gradient_clipping (2-norm only there)

    def before_optimizer_step(self, ctx) -> None:
        if ctx.recipe.distributed.strategy == "deepspeed":
            self.last_norm = ctx.model.get_global_grad_norm()  # the engine clipped inside its step
            return
        params = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.options.value is not None:
            ctx.accelerator.clip_grad_value_(params, self.options.value)
        if self.options.max_norm is not None:
            self.last_norm = ctx.accelerator.clip_grad_norm_(params, self.options.max_norm, self.options.norm_type)

    def log_row(self, ctx, row: dict) -> dict:
        if self.last_norm is not None and "train/loss" in row:
            row["train/grad_norm"] = float(self.last_norm)
        return row
