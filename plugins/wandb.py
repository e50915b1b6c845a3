"""wandb: log every metrics.jsonl row to Weights & Biases.

Hooks: after_prepare (start the run on the main process), on_log, on_train_end.
Offline by default, so it never needs a network or an API key; `wandb sync` uploads later.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register


@register("wandb")
class WandbLogger(Plugin):
    """Log metrics to Weights & Biases (offline by default)."""

    class Options(PluginOptions):
        project: str = Field("launcher", description="wandb project name")
        mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline needs no network")
        name: Optional[str] = Field(None, description="run name; default: the recipe name")
        tags: list[str] = Field(default_factory=list)

    run = None

    def after_prepare(self, ctx) -> None:
        if not ctx.is_main:
            return
        import wandb

        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.options.project,
            mode=self.options.mode,
            name=self.options.name or ctx.recipe.name,
            tags=self.options.tags,
            dir=str(ctx.run_dir),
            config=ctx.recipe.to_dict(),
        )

    def on_log(self, ctx, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def on_train_end(self, ctx) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
