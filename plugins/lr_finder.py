"""lr_finder: the learning-rate range test (Smith 2017, "Cyclical learning rates", sec. 3.3;
popularised by fastai's lr_find).

A short run raises the LR exponentially from start_lr to end_lr over `steps` optimizer
steps and records the training loss; the run stops early once the smoothed loss exceeds
`diverge` times its minimum. The suggestion is the LR where the smoothed loss falls
fastest (the steepest negative slope against log LR), taken before the loss minimum;
`minimum / 10` (the LR of the lowest loss divided by 10) is reported too. Results go to
<run dir>/lr_find.json and lr_find.png (loss vs LR on a log axis, suggestion marked).

Run it as its own command, which sets up the short run from a recipe:

    python -m launcher.lr_find recipes/digits.yaml [key=value ...] [--start-lr 1e-6 --end-lr 10 --steps 100]

Hooks: setup, transform_batch (sets the LR of the step), after_optimizer_step (records the loss),
on_train_end (writes the results).
"""

from __future__ import annotations

import json
import math
from typing import Optional

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import atomic_write_text

np = lazy("numpy")


def range_test_lr(start_lr: float, end_lr: float, steps: int, i: int) -> float:
    return start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as fastai's recorder)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 3) -> dict:
    """{'steepest': LR of the most negative d loss / d log LR before the minimum,
    'minimum': LR of the lowest smoothed loss, 'minimum_div_10': that / 10}."""
    lrs_a, loss = np.asarray(lrs, dtype=np.float64), np.asarray(smoothed, dtype=np.float64)
    finite = np.isfinite(loss)
    lowest = int(np.nanargmin(np.where(finite, loss, np.nan)))
    result = {"minimum": float(lrs_a[lowest]), "minimum_div_10": float(lrs_a[lowest] / 10)}
    end = lowest + 1
    start = min(skip_start, max(end - 2, 0))
    if end - start < 2:
        result["steepest"] = result["minimum_div_10"]
        return result
    slope = np.gradient(loss[start:end], np.log(lrs_a[start:end]))
    result["steepest"] = float(lrs_a[start + int(np.argmin(slope))])
    return result


def plot(path, lrs: list[float], losses: list[float], smoothed: list[float], suggestion: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed loss")
    ax.axvline(suggestion["steepest"], color="C3", linestyle="--",
               label=f"suggested (steepest) {suggestion['steepest']:.2e}")
    ax.axvline(suggestion["minimum_div_10"], color="C2", linestyle=":",
               label=f"minimum / 10 {suggestion['minimum_div_10']:.2e}")
    ax.set_xscale("log")
    finite = [x for x in smoothed if math.isfinite(x)]
    if finite:
        ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), min(max(finite), 4 * min(finite) + 1e-3) * 1.05)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@register("lr_finder")
class LRFinder(Plugin):
    """LR range test: exponential LR sweep, loss recorded, suggestion written to lr_find.json/png."""

    class Options(PluginOptions):
        start_lr: float = Field(1e-6, gt=0.0)
        end_lr: float = Field(10.0, gt=0.0)
        steps: int = Field(100, ge=5, description="optimizer steps of the sweep (train.max_steps is set to it)")
        beta: float = Field(0.98, ge=0.0, lt=1.0, description="loss smoothing (exponential moving average)")
        diverge: float = Field(4.0, gt=1.0, description="stop once the smoothed loss exceeds this x its minimum")

    incompatible = {
        "checkpoint": "a range test is a throw-away run; resuming it would mix two sweeps",
        "early_stopping": "a range test has no evaluation",
    }

    @classmethod
    def check_recipe(cls, recipe, options):
        if options.end_lr <= options.start_lr:
            return f"end_lr ({options.end_lr}) must be above start_lr ({options.start_lr})"
        if recipe.schedule.name != "constant" or recipe.schedule.warmup_epochs:
            return "the range test sets the LR itself: use schedule.name=constant and no warmup " \
                   "(python -m launcher.lr_find does this)"
        return None

    def __init__(self, options):
        super().__init__(options)
        self.lrs, self.losses, self.ratios = [], [], []
        self.best: Optional[float] = None

    def setup(self, ctx) -> None:
        base = ctx.recipe.optimizer.lr  # discriminative groups keep their ratios during the sweep
        self.ratios = [g["lr"] / base for g in ctx.optimizer.param_groups]

    def transform_batch(self, ctx, batch):
        # The LR of the step about to run is set before its forward pass, not just before the
        # optimizer step: DeepSpeed's engine steps inside backward.
        o = self.options
        lr = range_test_lr(o.start_lr, o.end_lr, o.steps, ctx.step)
        for group, ratio in zip(ctx.optimizer.param_groups, self.ratios):
            group["lr"] = lr * ratio
        self.current_lr = lr
        return batch

    def after_optimizer_step(self, ctx) -> None:
        loss = ctx.accelerator.reduce(ctx.loss.detach().clone(), "sum").item() / ctx.world_size
        self.lrs.append(self.current_lr)
        self.losses.append(loss)
        smoothed = smooth(self.losses, self.options.beta)[-1]
        if math.isfinite(smoothed):
            self.best = smoothed if self.best is None else min(self.best, smoothed)
        if not math.isfinite(smoothed) or smoothed > self.options.diverge * self.best \
                or ctx.step >= self.options.steps:
            ctx.stop_training = True
            ctx.stop_reason = f"lr_finder: stopped at LR {self.current_lr:.3g}"

    def on_train_end(self, ctx) -> None:
        if not ctx.is_main or len(self.losses) < 2:
            return
        smoothed = smooth(self.losses, self.options.beta)
        suggestion = suggest(self.lrs, smoothed)
        result = {"suggested_lr": suggestion["steepest"], **suggestion, "lrs": self.lrs, "losses": self.losses,
                  "smoothed": smoothed, "options": self.options.model_dump()}
        atomic_write_text(ctx.run_dir / "lr_find.json", json.dumps(result, indent=1) + "\n")
        plot(ctx.run_dir / "lr_find.png", self.lrs, self.losses, smoothed, suggestion)
        print(f"\n[lr_finder] suggested LR {suggestion['steepest']:.3g} (steepest descent); "
              f"minimum/10 {suggestion['minimum_div_10']:.3g}. Plot: {ctx.run_dir / 'lr_find.png'}", flush=True)

    def state_dict(self) -> dict:
        return {"lrs": list(self.lrs), "losses": list(self.losses), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.lrs, self.losses, self.best = list(state["lrs"]), list(state["losses"]), state["best"]
