"""overfit_batch: the first debugging step practitioners take (Karpathy's "Recipe for
training neural networks": overfit a single batch). Every step trains on the same first
batch; a model and loss that are wired correctly drive its loss towards zero.

The run stops when the loss reaches `threshold` (or at train.max_steps / the epochs), then
writes <run dir>/overfit_batch.json with the loss curve and a verdict, and prints it:

- reached:     the loss fell below the threshold (the pipeline can learn);
- exploding:   the loss became non-finite or grew far above its start (LR too high, missing
               normalisation, fp16 overflow);
- rising:      the loss ended above where it started (LR too high, wrong sign, labels shuffled
               against images);
- oscillating: the loss alternates up and down with large swings (LR too high, too little
               momentum damping);
- plateau:     the loss barely moved (LR too low, frozen or detached parameters, a dead
               ReLU / saturated output, the labels not reaching the loss);
- slow:        it falls steadily but did not reach the threshold (more steps or a higher LR).

Hooks: transform_batch, after_optimizer_step, on_train_end. State: the batch and the curve.
"""

from __future__ import annotations

import json
import math

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import atomic_write_text

HINTS = {
    "reached": "the model can fit one batch: the data, labels, model and loss are connected.",
    "exploding": "non-finite or exploding loss: lower the LR, check input normalisation, use bf16 or grad_clip.",
    "rising": "the loss went up: lower the LR; check the labels match the images and the loss's sign.",
    "oscillating": "the loss swings up and down: lower the LR (or raise momentum damping / use warmup).",
    "plateau": "the loss barely moved: raise the LR; check that parameters are trainable (not frozen/detached) "
               "and that the targets reach the loss.",
    "slow": "the loss falls but slowly: train more steps or raise the LR.",
}


def diagnose(losses: list[float], threshold: float) -> str:
    """One word for a loss curve on a fixed batch (see the module docstring)."""
    if not losses:
        return "plateau"
    if any(not math.isfinite(x) for x in losses):
        return "exploding"
    first, last = losses[0], losses[-1]
    if min(losses) <= threshold:
        return "reached"
    if max(losses) > 10 * max(first, 1e-8):
        return "exploding"
    if last > first * 1.05:
        return "rising"
    diffs = [b - a for a, b in zip(losses, losses[1:])]
    ups = sum(d > 0 for d in diffs)
    swing = sum(abs(d) for d in diffs)
    if len(diffs) >= 4 and ups >= 0.3 * len(diffs) and swing > 3 * max(first - last, 1e-12):
        return "oscillating"  # mostly motion, little progress
    if first - last < 0.1 * first:
        return "plateau"
    return "slow"


@register("overfit_batch")
class OverfitBatch(Plugin):
    """Debug mode: train on one fixed batch and diagnose the loss curve."""

    class Options(PluginOptions):
        threshold: float = Field(0.01, ge=0.0, description="stop when the loss on the batch reaches this")

    def __init__(self, options):
        super().__init__(options)
        self.batch, self.losses = None, []

    def transform_batch(self, ctx, batch):
        if self.batch is None:
            self.batch = batch
        if self.batch.images.device != batch.images.device:  # restored from a checkpoint
            self.batch.to(batch.images.device)
        return self.batch

    def after_optimizer_step(self, ctx) -> None:
        # The global-batch loss (ranks sum their shares); one sync per step is fine in a debug run.
        loss = ctx.accelerator.reduce(ctx.loss.detach().clone(), "sum").item() / ctx.world_size
        self.losses.append(loss)
        if loss <= self.options.threshold or not math.isfinite(loss):
            ctx.stop_training = True
            ctx.stop_reason = f"overfit_batch: loss {loss:.4g} at step {ctx.step}"

    def on_train_end(self, ctx) -> None:
        verdict = diagnose(self.losses, self.options.threshold)
        report = {"verdict": verdict, "hint": HINTS[verdict], "threshold": self.options.threshold,
                  "steps": len(self.losses), "first_loss": self.losses[0] if self.losses else None,
                  "last_loss": self.losses[-1] if self.losses else None, "losses": self.losses}
        if ctx.is_main:
            atomic_write_text(ctx.run_dir / "overfit_batch.json", json.dumps(report, indent=1) + "\n")
            print(f"\n[overfit_batch] {verdict}: {HINTS[verdict]} (loss {report['first_loss']:.4g} -> "
                  f"{report['last_loss']:.4g} in {len(self.losses)} steps)", flush=True)

    def state_dict(self) -> dict:
        batch = None
        if self.batch is not None:
            batch = {"images": self.batch.images.cpu(), "targets": self.batch.targets.cpu(),
                     "ids": self.batch.ids, "global_count": self.batch.global_count}
        return {"batch": batch, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        from launcher.data import Batch

        self.losses = list(state["losses"])
        if state["batch"] is not None:
            self.batch = Batch(**state["batch"])
