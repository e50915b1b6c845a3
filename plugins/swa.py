"""swa: Stochastic Weight Averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider
Optima and Better Generalization"), with torch.optim.swa_utils.

From epoch `start` (a fraction of train.epochs when below 1, else an epoch number; 0 is the
first), the weights at the end of every epoch (or every `every_steps` steps) join an equal
average (torch's AveragedModel). With `swa_lr`, the LR anneals from the schedule's value to
swa_lr over `anneal_epochs` averaging updates and stays there (torch's SWALR, stepped at each
update as in torch's example); without it the recipe's schedule goes on. At the end, BatchNorm
statistics are recomputed for the averaged weights over the training images (torch's
update_bn; without augmentation, each rank over its share, rank 0's kept as for the model),
the average is evaluated as `val_swa/*` (the final evaluation only: before update_bn its
statistics are the first model's) and exported as `final/swa.safetensors`
(`python -m launcher.evaluate RUN_DIR --weights swa`).

Hooks: setup (the average's copy), on_epoch_start (SWALR from the start epoch),
after_optimizer_step (hold SWALR's LR against the schedule; update at epoch ends),
eval_models (update_bn, then val_swa), on_train_end (export). State: the average, its count,
SWALR's position. Under DDP every rank keeps the same average; DeepSpeed and FSDP are refused
(their optimizers and sharded weights are not what swa_utils drives).
"""

from __future__ import annotations

import sys
from typing import Literal, Optional

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import final_weights, save_weights

torch = lazy("torch")


@register("swa")
class StochasticWeightAveraging(Plugin):
    """Stochastic Weight Averaging (torch's swa_utils), evaluated as val_swa."""

    class Options(PluginOptions):
        start: float = Field(0.75, ge=0.0, description="first averaged epoch: a fraction of train.epochs (< 1) or an "
                                                       "epoch number (0 = the first)")
        every_steps: Optional[int] = Field(None, ge=1, description="average every N steps instead of at epoch ends")
        swa_lr: Optional[float] = Field(None, gt=0.0, description="anneal the LR to this and hold it (SWALR); none: "
                                                                  "keep the recipe's schedule")
        anneal_epochs: int = Field(1, ge=0, description="averaging updates over which the LR anneals to swa_lr")
        anneal_strategy: Literal["cos", "linear"] = Field("cos")

    refused_under = {"deepspeed": "DeepSpeed's optimizer and fp32 master weights are not what swa_utils averages",
                     "fsdp": "FSDP's sharded weights are not what swa_utils averages"}

    averaged = None
    swalr = None
    saved_swalr: Optional[dict] = None
    statistics_updated = False

    def start_epoch(self, ctx) -> int:
        start = self.options.start
        return int(ctx.recipe.train.epochs * start) if start < 1 else int(start)

    def setup(self, ctx) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.averaged = AveragedModel(ctx.model)

    def _in_swa(self, ctx) -> bool:
        return ctx.epoch >= self.start_epoch(ctx)

    def on_epoch_start(self, ctx) -> None:
        if self.options.swa_lr is None or self.swalr is not None or not self._in_swa(ctx):
            return
        from torch.optim.swa_utils import SWALR

        o = self.options
        self.swalr = SWALR(ctx.optimizer, swa_lr=o.swa_lr, anneal_epochs=o.anneal_epochs,
                           anneal_strategy=o.anneal_strategy)
        if self.saved_swalr is not None:  # a resume: where SWALR was
            self.swalr.load_state_dict(self.saved_swalr)
        self._hold_lr(ctx)

    def _hold_lr(self, ctx) -> None:
        # The recipe's schedule sets the LR after every step; in SWA's phase it is SWALR's.
        for group, lr in zip(ctx.optimizer.param_groups, self.swalr.get_last_lr()):
            group["lr"] = lr

    def after_optimizer_step(self, ctx) -> None:
        if self.swalr is not None:
            self._hold_lr(ctx)
        if not self._in_swa(ctx):
            return
        every = self.options.every_steps
        if (ctx.step % every == 0) if every else ctx.step_in_epoch >= ctx.steps_per_epoch:
            self.averaged.update_parameters(ctx.strategy.unwrap(ctx.model))
            if self.swalr is not None:
                self.swalr.step()

    def eval_models(self, ctx, models: dict) -> dict:
        final = ctx.step >= ctx.total_steps or ctx.stop_training
        if not final or int(self.averaged.n_averaged) == 0:
            return models
        if not self.statistics_updated:
            self._update_batchnorm(ctx)
            self.statistics_updated = True
        return {**models, "val_swa": self.averaged.module}

    def _update_batchnorm(self, ctx) -> None:
        from launcher.data.loader import recompute_batchnorm

        recompute_batchnorm(self.averaged.module, ctx.train_index, ctx.recipe.data, ctx.recipe.model.in_chans,
                            ctx.accelerator.device, ctx.memory_format, ctx.rank, ctx.world_size)

    def on_train_end(self, ctx) -> None:
        if int(self.averaged.n_averaged) == 0:
            if ctx.is_main:
                print(f"warning: swa averaged nothing: it starts at epoch {self.start_epoch(ctx)} and the run ended "
                      f"in epoch {ctx.epoch} (step {ctx.step}). Lower plugins.swa.start.", file=sys.stderr, flush=True)
            return
        if not self.statistics_updated:  # a run without validation data
            self._update_batchnorm(ctx)
            self.statistics_updated = True
        if ctx.is_main:
            save_weights(self.averaged.module, final_weights(ctx.run_dir, "swa"))

    def state_dict(self) -> dict:
        state = {"averaged": self.averaged.state_dict()}
        if self.swalr is not None:
            saved = self.swalr.state_dict()
            state["swalr"] = {key: saved[key] for key in ("_step_count", "last_epoch", "_last_lr")}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.saved_swalr = state.get("swalr")
