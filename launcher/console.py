"""What the main process prints while it trains.

On a terminal with run.progress (the default): tqdm's live progress bar. Anywhere else (a
Slurm log, nohup, a pipe), or with run.progress=false: one plain line per logged row, and
never a carriage return, so log files stay readable and grep-able:

    [train] step 25/90 (28%) epoch 0 | loss 2.1234 | lr 0.0477 | 1,234 samples/s | ETA 0:01:23 | data wait 3% | peak 0.41 GB
    [eval] step 45 epoch 1: val/loss=0.4102, val/top1=0.8861
"""

from __future__ import annotations

import sys
import time
from typing import Optional


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
        # The first step of a process compiles (train.compile), autotunes (cuDNN) and waits for the
        # loader's first batches: it is timed on its own, so that samples/s and the ETA are the
        # steady state's ("5 samples/s | ETA 0:03:20" while compiling helps nobody).
        self.first_step: Optional[tuple[int, float]] = None  # (samples, seconds), until its row is shown
        self.first_step_seen = False

    @classmethod
    def for_run(cls, ctx) -> "Console":
        live = ctx.recipe.run.progress and sys.stdout.isatty()
        return cls(ctx, enabled=ctx.is_main, live_bar=live)

    def step_done(self, samples: int) -> None:
        """One optimizer step over `samples` samples (the global batch)."""
        if self.bar is not None:
            self.bar.update(1)
        if not self.first_step_seen:
            now = time.perf_counter()
            self.first_step, self.first_step_seen = (samples, now - self.window_start), True
            self.window_start = now  # the steady state starts after it
            return
        self.window_samples += samples
        self.window_steps += 1

    def samples_per_second(self) -> float:
        """Training samples (all ranks) per second since the last logged row, the first step left
        out (when it is all there is, its own rate)."""
        elapsed = time.perf_counter() - self.window_start
        if self.window_steps == 0 and self.first_step is not None:
            samples, seconds = self.first_step
            return round(samples / seconds, 1) if seconds > 0 else 0.0
        return round(self.window_samples / elapsed, 1) if elapsed > 0 else 0.0

    def row(self, row: dict) -> None:
        """A training row was logged: the bar's postfix, or one plain line."""
        elapsed = time.perf_counter() - self.window_start
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
        elif self.enabled:
            step = row["step"]
            line = (f"[train] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) epoch {row['epoch']} | "
                    f"loss {row['train/loss']:.4f} | lr {row['train/lr']:.4g}")
            if self.window_steps:
                eta = (self.total - step) * elapsed / self.window_steps
                line += f" | {row['train/samples_per_s']:,.0f} samples/s | ETA {_duration(eta)}"
            if "train/data_wait" in row:
                line += f" | data wait {100 * row['train/data_wait']:.0f}% | peak {row['train/peak_memory_gb']:.2f} GB"
            if "train/mfu" in row:
                line += f" | MFU {100 * row['train/mfu']:.0f}%"
            if self.first_step is not None:
                line += f" | first step {self.first_step[1]:.1f} s (compilation, warm-up: not in samples/s or the ETA)"
            print(line, flush=True)
        self.first_step = None
        self.window_start, self.window_samples, self.window_steps = time.perf_counter(), 0, 0

    def evaluation(self, step: int, epoch: int, metrics: dict, seconds: float = 0.0) -> None:
        """An evaluation took `seconds`: printed, and left out of the training speed."""
        self.window_start += seconds
        if self.enabled:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(("top1", "loss")))
            after_bar = "\n" if self.bar is not None else ""  # off the progress bar's line
            print(f"{after_bar}[eval] step {step} epoch {epoch}: {shown}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
