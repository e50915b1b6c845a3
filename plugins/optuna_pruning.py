"""optuna_pruning: report each evaluation to an Optuna trial and stop the run when the study's
pruner prunes it. `python -m launcher.experiment` adds it to a search's trials (it decides their
parameters before any process starts, so every rank trains the same values); it is not meant to
be written into a recipe by hand.

After each evaluation (metrics already reduced over ranks), rank 0 reports the metric at this step
and asks the pruner; its answer is broadcast, so every rank stops together. A pruned run ends as a
stopped run does: final weights, a last checkpoint, and status.json says "pruned". A run resumed
after a kill reports to the same Optuna trial (a step reported before is ignored by Optuna).

Hooks: on_evaluate.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from launcher.errors import LauncherError
from launcher.registry import Plugin, PluginOptions, register


@register("optuna_pruning")
class OptunaPruning(Plugin):
    """Report evaluations to an Optuna trial; stop on every rank when it is pruned (a search's trials)."""

    class Options(PluginOptions):
        storage: str = Field(description="the study's storage: sqlite:///PATH or journal:PATH")
        study: str = Field(description="the study's name")
        trial: int = Field(ge=0, description="the Optuna trial's number")
        metric: str = Field("val/top1", description="the evaluation key reported, or shipped: the first of "
                                                    "val_ema_tta/top1, val_ema/top1, val_tta/top1, val/top1")
        # Optuna keeps no pruner in the storage: the search's, built here the same way.
        pruner: Literal["median", "successive_halving", "none"] = "median"
        startup_trials: int = Field(5, ge=0, description="median pruner: trials never pruned")

    @classmethod
    def check_recipe(cls, recipe, options):
        if recipe.data.val is None:
            return "pruning reports evaluations, and the recipe sets no data.val"
        return None

    def __init__(self, options):
        super().__init__(options)
        self._trial = None

    def _optuna_trial(self):
        if self._trial is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            from launcher.experiment.search import make_pruner, open_storage

            study = optuna.load_study(study_name=self.options.study, storage=open_storage(self.options.storage),
                                      pruner=make_pruner(self.options.pruner, self.options.startup_trials))
            # Optuna hands out Trial objects only from ask(); a trial asked by the driver is reopened by
            # its id (FrozenTrial._trial_id: Optuna has no public way to do it).
            frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == self.options.trial)
            self._trial = optuna.trial.Trial(study, frozen._trial_id)
        return self._trial

    def on_evaluate(self, ctx, metrics: dict) -> None:
        from launcher.experiment.spec import SHIPPED

        key = next((k for k in SHIPPED if k in metrics), None) if self.options.metric == "shipped" \
            else self.options.metric
        if key not in metrics:
            raise LauncherError(f"plugins.optuna_pruning.metric: the evaluation reports no '{self.options.metric}'; "
                                f"it reports {', '.join(sorted(metrics))}.")
        prune = [False]
        if ctx.is_main:
            trial = self._optuna_trial()
            trial.report(float(metrics[key]), ctx.step)
            prune = [bool(trial.should_prune())]
        if ctx.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(prune)  # rank 0's answer on every rank: they stop together
        if prune[0] and not ctx.stop_training:
            ctx.stop_training, ctx.end_state = True, "pruned"
            ctx.stop_reason = f"pruned by the search at step {ctx.step} ({key} {metrics[key]:.4f})"
            if ctx.is_main:
                print(f"\n[optuna_pruning] {ctx.stop_reason}", flush=True)
