"""ema: an exponential moving average of the weights (Polyak averaging; as used by e.g.
Tan & Le 2019), evaluated beside the raw model as `val_ema/*` and exported as
`final/ema.safetensors`.

The average is timm's ModelEmaV3 (foreach lerp over parameters and buffers): the first
update copies the weights, later ones do ema = decay * ema + (1 - decay) * w. With warmup,
decay_t = min(decay, 1 - (1 + t / gamma) ^ -power), so early averages forget faster.

Hooks: setup (copy the model), after_optimizer_step (update every `every` steps),
eval_models (add "val_ema"), on_train_end (export). State: the averaged weights. The EMA
keeps its own copy; nothing swaps weights in place.

The average is taken of the full fp32 weights from the strategy (ctx.strategy.
full_state_dict): under DDP the model's own tensors; under DeepSpeed with bf16/fp16 the fp32
master weights, and under ZeRO-3 and FSDP those gathered from their shards on every rank (one
all-gather of the model per update: raise `every` to amortise it). Every rank keeps the
full average, as under DDP.
"""

from __future__ import annotations

from pydantic import Field

from launcher.runlog import final_weights, save_weights
from launcher.registry import Plugin, PluginOptions, register


@register("ema")
class ExponentialMovingAverage(Plugin):
    """Exponential moving average of the weights, evaluated as val_ema."""

    class Options(PluginOptions):
        decay: float = Field(0.9998, gt=0.0, lt=1.0, description="weight of the old average per update")
        warmup: bool = Field(False, description="ramp the decay up: min(decay, 1 - (1 + t/gamma)^-power)")
        warmup_gamma: float = Field(1.0, gt=0.0)
        warmup_power: float = Field(2 / 3, gt=0.0)
        every: int = Field(1, ge=1, description="update every N optimizer steps")

    notes_under = {"zero3": "gathers the sharded fp32 weights at each update (one all-gather of the model)",
                   "fsdp": "gathers the sharded fp32 weights at each update (one all-gather of the model)"}

    ema = None

    def setup(self, ctx) -> None:
        from timm.utils import ModelEmaV3

        o = self.options
        self.ema = ModelEmaV3(ctx.model, decay=o.decay, use_warmup=o.warmup, warmup_gamma=o.warmup_gamma,
                              warmup_power=o.warmup_power, foreach=True)

    def after_optimizer_step(self, ctx) -> None:
        if ctx.step % self.options.every == 0:
            weights = ctx.strategy.full_state_dict(ctx.model)  # a collective under ZeRO: every rank is here
            self.ema.update(_StateDictView(weights), step=ctx.step // self.options.every)

    def eval_models(self, ctx, models: dict) -> dict:
        return {**models, "val_ema": self.ema.module}

    def on_train_end(self, ctx) -> None:
        if ctx.is_main:
            save_weights(self.ema.module, final_weights(ctx.run_dir, "ema"))

    def state_dict(self) -> dict:
        return {"module": self.ema.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state["module"])


class _StateDictView:
    """What timm's ModelEmaV3.update reads from a model: its state_dict(), in the model's order."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state
