"""bce: binary cross-entropy on every class's logit instead of the softmax cross-entropy, as
timm's `--bce-loss` (the "ResNet strikes back" recipes, Wightman et al. 2021).

The loss is timm's BinaryCrossEntropy: class indices become one-hot targets, soft targets (from
mixup/cutmix, or label_smoothing listed after this plugin, which is timm's BCE smoothing:
on = 1 - eps + eps/C, off = eps/C) are taken as they are; target_threshold turns the targets into
0/1 above it (timm's --bce-target-thresh); pos_weight weighs every positive term
(--bce-pos-weight); sum_classes sums over the classes before the batch mean (--bce-sum), else
the mean is over batch and classes. Hook: criterion (replaces the cross-entropy, so it comes
before label_smoothing; focal_loss is another replacement: refused together). The evaluation
loss stays the cross-entropy of the logits; top-1/top-5 read the largest logits as before.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register


@register("bce")
class BinaryCrossEntropyLoss(Plugin):
    """Binary cross-entropy per class (timm's BinaryCrossEntropy), for soft and hard targets."""

    class Options(PluginOptions):
        target_threshold: Optional[float] = Field(
            None, ge=0.0, lt=1.0, description="targets above it become 1, the others 0 (timm's --bce-target-thresh)")
        pos_weight: Optional[float] = Field(None, gt=0.0, description="weight of every positive term (--bce-pos-weight)")
        sum_classes: bool = Field(False, description="sum over classes, then mean over the batch (--bce-sum)")

    replaces_loss = True  # the cross-entropy it receives is replaced: list it before label_smoothing
    incompatible = {"focal_loss": "both replace the training loss (focal loss is a softmax loss); keep one"}

    def criterion(self, ctx, inner):
        from timm.loss import BinaryCrossEntropy

        o = self.options
        loss = BinaryCrossEntropy(smoothing=0.0, target_threshold=o.target_threshold, pos_weight=o.pos_weight,
                                  sum_classes=o.sum_classes)

        def binary_cross_entropy(logits, targets):
            # In float32 like the other losses under autocast (timm computes in the logits' dtype).
            logits = logits.float()
            return loss.to(logits.device)(logits, targets.float() if targets.ndim == 2 else targets)

        return binary_cross_entropy
