"""early_stopping: stop training when a validation metric has stopped improving
(Prechelt 1998, "Early stopping - but when?").

After each evaluation, the monitored metric (already reduced over ranks, so every rank
decides alike) counts as an improvement if it beats the best so far by more than
min_delta; after `patience` evaluations without one, the run stops, evaluates, and writes
its final weights as usual. The decision is written to <run dir>/early_stopping.json.

Hooks: on_evaluate. State: best value, its step, evaluations without improvement.
"""

from __future__ import annotations

import json
import math
from typing import Literal, Optional

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import atomic_write_text


def improved(value: float, best: Optional[float], mode: str, min_delta: float) -> bool:
    if best is None:
        return not math.isnan(value)
    return value > best + min_delta if mode == "max" else value < best - min_delta


@register("early_stopping")
class EarlyStopping(Plugin):
    """Stop when a validation metric has not improved for `patience` evaluations."""

    class Options(PluginOptions):
        monitor: str = Field("val/top1", description="a metric of the evaluation rows, e.g. val/loss, val_ema/top1")
        mode: Literal["max", "min"] = Field("max", description="whether larger is better")
        patience: int = Field(5, ge=1, description="evaluations without improvement before stopping")
        min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as an improvement")

    @classmethod
    def check_recipe(cls, recipe, options):
        if recipe.data.val is None:
            return "early stopping watches evaluation metrics, and the recipe sets no data.val"
        return None

    def __init__(self, options):
        super().__init__(options)
        self.best, self.best_step, self.bad = None, None, 0

    def on_evaluate(self, ctx, metrics: dict) -> None:
        o = self.options
        if o.monitor not in metrics:
            from launcher.errors import LauncherError

            raise LauncherError(f"plugins.early_stopping.monitor: the evaluation reports no '{o.monitor}'; it "
                                f"reports {', '.join(sorted(metrics))}.")
        value = metrics[o.monitor]
        if improved(value, self.best, o.mode, o.min_delta):
            self.best, self.best_step, self.bad = value, ctx.step, 0
            return
        self.bad += 1
        if self.bad >= o.patience and not ctx.stop_training:
            ctx.stop_training = True
            ctx.stop_reason = (f"early stopping: {o.monitor} has not improved for {self.bad} evaluations "
                               f"(best {self.best:.6g} at step {self.best_step})")
            if ctx.is_main:
                atomic_write_text(ctx.run_dir / "early_stopping.json", json.dumps(
                    {"stopped_at_step": ctx.step, "monitor": o.monitor, "best": self.best,
                     "best_step": self.best_step, "evaluations_without_improvement": self.bad}, indent=1) + "\n")
                print(f"\n[early_stopping] {ctx.stop_reason}", flush=True)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]
