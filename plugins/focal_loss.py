"""focal_loss: focal loss (Lin et al. 2017) and class-weighted cross-entropy for imbalanced data.

    loss_i = -w_{y_i} * sum_c t_ic (1 - p_ic)^gamma log p_ic     (t: one-hot or soft targets)

gamma = 0 gives (weighted) cross-entropy. class_weights: none, or balanced, which is
N / (classes * count_c) with the counts taken once from the training shards' labels (the
index already holds them). The loss is the mean over the micro-batch of the weighted
per-sample losses, so the loop's global-batch normalisation stays exact.

Hooks: criterion (replaces the cross-entropy; list label_smoothing after it to smooth its targets:
the other order is refused when the recipe loads, since the smoothing would be dropped).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

np = lazy("numpy")
torch = lazy("torch")
F = lazy("torch.nn.functional")


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean focal loss over the batch; targets are class indices or soft (N, C) rows."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    soft = F.one_hot(targets, logits.shape[-1]).float() if targets.ndim == 1 else targets.float()
    per_class = -soft * (1.0 - log_p.exp()).pow(gamma) * log_p
    if weights is not None:
        per_class = per_class * weights
    return per_class.sum(-1).mean()


def balanced_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


@register("focal_loss")
class FocalLoss(Plugin):
    """Focal loss and/or class-balanced weights for imbalanced data."""

    class Options(PluginOptions):
        gamma: float = Field(2.0, ge=0.0, description="focusing parameter; 0 gives cross-entropy")
        class_weights: Literal["none", "balanced"] = Field("none", description="balanced: N / (C * count_c)")

    weights = None
    replaces_loss = True  # the cross-entropy it receives is replaced: list it before label_smoothing

    def criterion(self, ctx, inner):
        if self.options.class_weights == "balanced":
            self.weights = balanced_weights(ctx.train_index.labels, ctx.recipe.model.num_classes).to(
                ctx.accelerator.device)
        gamma, weights = self.options.gamma, self.weights
        return lambda logits, targets: focal_loss(logits, targets, gamma, weights)
