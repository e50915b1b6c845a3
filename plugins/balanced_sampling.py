"""balanced_sampling: class-balanced (or square-root) sampling for imbalanced data.

Each sample of class c is drawn with weight count_c^(-power), counts taken once from the
training shards' labels (the shard index holds them): power 1 gives every class the same
expected share of each epoch (class-balanced sampling), power 0.5 square-root sampling
(Mahajan et al. 2018; Kang et al. 2020 compare the two), 0 the data as it is.

An epoch keeps its length (N draws, so schedules and checkpoints do not change) and stays
deterministic in (seed, epoch): the data plan draws the epoch's samples by systematic
resampling (launcher/data/plan.py EpochPlan.repeat_counts), so frequent classes are subsampled
and rare ones repeated, each repeat with its own augmentation. For class-weighted loss
instead of sampling, use focal_loss with class_weights: balanced.

Hooks: setup (sets ctx.sample_weights and rebuilds the plan). No state.
"""

from __future__ import annotations

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

np = lazy("numpy")


def class_sampling_weights(labels: np.ndarray, num_classes: int, power: float) -> np.ndarray:
    """Per-sample weight count_{label}^-power."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    per_class = np.where(counts > 0, np.maximum(counts, 1.0) ** -power, 0.0)
    return per_class[labels]


@register("balanced_sampling")
class BalancedSampling(Plugin):
    """Draw each epoch with class weights count^-power (1: balanced, 0.5: square-root sampling)."""

    class Options(PluginOptions):
        power: float = Field(1.0, ge=0.0, le=1.0, description="1: class-balanced, 0.5: square-root, 0: off")

    @classmethod
    def check_recipe(cls, recipe, options):
        if recipe.data.aug_repeats > 1:
            return ("data.aug_repeats also decides how often each sample is drawn in an epoch; keep one of "
                    "the two (data.aug_repeats=1, or no balanced_sampling)")
        return None

    def setup(self, ctx) -> None:
        ctx.sample_weights = class_sampling_weights(ctx.train_index.labels, ctx.recipe.model.num_classes,
                                                    self.options.power)
        ctx.make_plan()
