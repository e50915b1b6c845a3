"""tensorboard: every metrics.jsonl row as TensorBoard scalars, in <run dir>/tensorboard/.

    tensorboard --logdir runs/

The writer is torch's SummaryWriter (torch.utils.tensorboard). A resumed run starts its
writer with purge_step = the checkpoint's step + 1 (1 when it restarts without one), so TensorBoard drops the earlier attempt's
points after that step (metrics.jsonl does the same with its rows) and every curve shows
one point per step. Main process only; events are flushed at every row, so a killed run
keeps its curves.

Hooks: setup (refuses a file where its folder goes), on_epoch_start (the first one opens the
writer: a resume has set ctx.step by then), on_log, on_train_end.
"""

from __future__ import annotations

import math

from launcher.errors import LauncherError
from launcher.registry import Plugin, register


@register("tensorboard")
class TensorBoardLogger(Plugin):
    """Log every metrics row as TensorBoard scalars (<run dir>/tensorboard)."""

    reports_only = True

    writer = None

    @classmethod
    def check_recipe(cls, recipe, options):
        try:
            import tensorboard  # noqa: F401  torch's SummaryWriter needs the package
        except ImportError:
            return "the tensorboard package is not installed: pip install tensorboard (or launcher[tensorboard])"
        return None

    def setup(self, ctx) -> None:
        folder = ctx.run_dir / "tensorboard"
        if folder.exists() and not folder.is_dir():
            raise LauncherError(f"plugins.tensorboard writes into '{folder}', which is a file: move it away.")

    def on_epoch_start(self, ctx) -> None:
        if self.writer is None and ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # Points after the checkpoint's step come again; those at it were logged before it was saved.
            # Also from step 1 when there is no checkpoint: a run killed before its first one left points.
            self.writer = SummaryWriter(log_dir=str(ctx.run_dir / "tensorboard"), purge_step=ctx.step + 1)

    def on_log(self, ctx, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in ("step", "epoch", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.add_scalar("epoch", row["epoch"], global_step=row["step"])
        self.writer.flush()

    def on_train_end(self, ctx) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
