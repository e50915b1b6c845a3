"""mixup: mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) on each training batch,
with timm's Mixup.

mixup blends each image with its partner (the batch reversed): x' = lam * x + (1 - lam) * x_flip.
cutmix pastes a box of the partner over the image, covering a (1 - lam) share of it. The
targets become lam * one_hot(y) + (1 - lam) * one_hot(y_flip). Label smoothing is left to the
label_smoothing plugin, which smooths these soft targets; this is the same as timm's Mixup
with label_smoothing. Mixing stops from epoch `off_epoch` on (the common "no mixup for the
last epochs" recipe). A batch of odd size mixes all but its last sample (timm needs pairs).

Hooks: transform_batch. Randomness: the global numpy RNG, which checkpoints save per rank.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

torch = lazy("torch")
F = lazy("torch.nn.functional")


@register("mixup")
class MixupCutmix(Plugin):
    """mixup and/or cutmix on training batches (timm), with soft targets."""

    class Options(PluginOptions):
        mixup_alpha: float = Field(0.8, ge=0.0, description="Beta(alpha, alpha) for mixup's lam (0: off)")
        cutmix_alpha: float = Field(1.0, ge=0.0, description="Beta(alpha, alpha) for cutmix's lam (0: off)")
        prob: float = Field(1.0, ge=0.0, le=1.0, description="probability of mixing a batch",
                            json_schema_extra={"example": "0.5 mixes half the batches"})
        switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="with both on: chance of cutmix over mixup")
        mode: Literal["batch", "pair", "elem"] = Field("batch", description="one lam per batch, pair or sample")
        off_epoch: Optional[int] = Field(None, ge=0, description="stop mixing from this epoch on")

    @classmethod
    def check_recipe(cls, recipe, options):
        if options.mixup_alpha == 0 and options.cutmix_alpha == 0:
            return "both mixup_alpha and cutmix_alpha are 0, so nothing would be mixed"
        return None

    def setup(self, ctx) -> None:
        from timm.data import Mixup

        o = self.options
        self.mixer = Mixup(mixup_alpha=o.mixup_alpha, cutmix_alpha=o.cutmix_alpha, prob=o.prob,
                           switch_prob=o.switch_prob, mode=o.mode, label_smoothing=0.0,
                           num_classes=ctx.recipe.model.num_classes)

    def transform_batch(self, ctx, batch):
        if self.options.off_epoch is not None and ctx.epoch >= self.options.off_epoch:
            return batch
        n = len(batch.targets) - len(batch.targets) % 2
        if n < 2:
            return batch
        images, targets = batch.images, batch.targets
        mixed_images, mixed_targets = self.mixer(images[:n].clone(), targets[:n])
        if n < len(targets):  # the odd sample out keeps its image and its one-hot target
            mixed_images = torch.cat([mixed_images, images[n:]])
            one_hot = F.one_hot(targets[n:], mixed_targets.shape[1]).to(mixed_targets.dtype)
            mixed_targets = torch.cat([mixed_targets, one_hot])
        batch.images, batch.targets = mixed_images, mixed_targets
        return batch
