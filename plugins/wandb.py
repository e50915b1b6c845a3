"""wandb: log every metrics.jsonl row to Weights & Biases.

Offline by default, so it never needs a network or an API key; `wandb sync` uploads later.
A resumed run continues the same wandb run: its id is kept in <run dir>/wandb_run_id and
wandb.init gets resume="allow" (rows after the checkpoint's step are logged again, as
metrics.jsonl rewrites them).

Hooks: on_epoch_start (the first one starts or continues the run: a resume has set ctx.step
by then), on_log, on_train_end.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import atomic_write_text


@register("wandb")
class WandbLogger(Plugin):
    """Log metrics to Weights & Biases (offline by default)."""

    reports_only = True

    class Options(PluginOptions):
        project: str = Field("launcher", description="wandb project name")
        mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline needs no network")
        name: Optional[str] = Field(None, description="run name; default: the recipe name")
        entity: Optional[str] = Field(None, description="wandb entity (user or team); default: yours")
        group: Optional[str] = Field(None, description="group runs together, e.g. a sweep")
        tags: list[str] = Field(default_factory=list)

    run = None

    def on_epoch_start(self, ctx) -> None:
        if self.run is not None or not ctx.is_main:
            return
        import secrets

        import wandb

        id_file = ctx.run_dir / "wandb_run_id"
        resumed = ctx.step > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)  # wandb's id alphabet
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(id_file, run_id + "\n")
        # A trial of an experiment (launcher.experiment): grouped by experiment, typed by rung.
        trial = ctx.recipe.run.experiment or {}
        config = ctx.recipe.to_dict()
        if trial:
            config.update(experiment=trial.get("name"), rung=trial.get("rung"), trial=trial.get("trial"))
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            project=self.options.project,
            entity=self.options.entity,
            group=self.options.group or trial.get("name"),
            job_type=trial.get("rung"),
            mode=self.options.mode,
            name=self.options.name or (f"{trial['name']}/{trial['trial']}" if trial else ctx.recipe.name),
            tags=self.options.tags,
            dir=str(ctx.run_dir),
            config=config,
        )

    def on_log(self, ctx, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=row["step"])

    def on_train_end(self, ctx) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
