"""What the main process prints while it trains.

On a terminal with run.progress (the default): tqdm's live progress bar. Anywhere else (a
Slurm log, nohup, a pipe), or with run.progress=false: one plain line per logged row, and
never a carriage return, so log files stay readable and grep-able:

    [train] step 25/90 (28%) epoch 0 | loss 2.1234 | lr 0.0477 | 1,234 samples/s | ETA 0:01:23
    [eval] step 45 epoch 1: val/loss=0.4102, val/top1=0.8861
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Console:
    def __init__(self, ctx, enabled: bool, live_bar: bool):
        self.enabled = enabled
        self.total = ctx.total_steps
        self.bar = None
        if enabled and live_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=ctx.total_steps, initial=ctx.step, desc=f"{ctx.recipe.name}", unit="step",
                            dynamic_ncols=True, mininterval=1.0)
        self.window_start, self.window_samples, self.window_steps = time.perf_counter(), 0, 0

    @classmethod
    def for_run(cls, ctx) -> "Console":
        live = ctx.recipe.run.progress and sys.stdout.isatty()
        return cls(ctx, enabled=ctx.is_main, live_bar=live)

    def step_done(self, samples: int) -> None:
        """One optimizer step over `samples` samples (the global batch)."""
        self.window_samples += samples
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def samples_per_second(self) -> float:
        """Training samples (all ranks) per second since the last logged row."""
        elapsed = time.perf_counter() - self.window_start
        return round(self.window_samples / elapsed, 1) if elapsed > 0 else 0.0

    def row(self, row: dict) -> None:
        """A training row was logged: the bar's postfix, or one plain line."""
        elapsed = time.perf_counter() - self.window_start
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
        elif self.enabled and self.window_steps:
            step = row["step"]
            rate = row["train/samples_per_s"]
            eta = (self.total - step) * elapsed / self.window_steps
            print(f"[train] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) epoch {row['epoch']} | "
                  f"loss {row['train/loss']:.4f} | lr {row['train/lr']:.4g} | {rate:,.0f} samples/s | "
                  f"ETA {_duration(eta)}", flush=True)
        self.window_start, self.window_samples, self.window_steps = time.perf_counter(), 0, 0

    def evaluation(self, step: int, epoch: int, metrics: dict) -> None:
        if self.enabled:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(("top1", "loss")))
            after_bar = "\n" if self.bar is not None else ""  # off the progress bar's line
            print(f"{after_bar}[eval] step {step} epoch {epoch}: {shown}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
