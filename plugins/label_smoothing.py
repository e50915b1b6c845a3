"""label_smoothing: cross-entropy against smoothed targets (Szegedy et al. 2016, "Rethinking
the Inception Architecture", section 7).

The target becomes (1 - eps) * one_hot + eps / classes. Soft targets from other plugins
(mixup, cutmix) are smoothed the same way, so the two compose exactly as timm's Mixup with
label_smoothing does. Hook: criterion (wraps the loss it receives: cross-entropy, or focal_loss
when that is listed before it). Evaluation loss stays unsmoothed.
"""

from __future__ import annotations

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

torch = lazy("torch")
F = lazy("torch.nn.functional")


def smooth_targets(targets: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """Class indices (N,) or soft targets (N, C) -> smoothed soft targets (N, C)."""
    if targets.ndim == 1:
        targets = F.one_hot(targets, num_classes)
    return targets.float() * (1.0 - eps) + eps / num_classes


@register("label_smoothing")
class LabelSmoothing(Plugin):
    """Label-smoothed cross-entropy (composes with soft targets from mixup/cutmix)."""

    class Options(PluginOptions):
        smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="eps: the probability mass spread over all classes")

    def criterion(self, ctx, inner):
        eps = self.options.smoothing

        def smoothed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return inner(logits, smooth_targets(targets, logits.shape[-1], eps))

        return smoothed
