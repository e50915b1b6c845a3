"""tta: test-time augmentation at evaluation. The softmax of the original view, the
horizontally flipped view and (optionally) four shifted crops are averaged; reported as
`<prefix>_tta/*` beside the plain metrics (`val_tta/top1`, and `val_ema_tta/top1` with EMA).

Hook: eval_logits. Its output is log(mean softmax), so the evaluation's cross-entropy of
it is the negative log of the averaged probability, and top-k ranks by the averaged
probability.
"""

from __future__ import annotations

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

torch = lazy("torch")
F = lazy("torch.nn.functional")


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The image translated by (dx, dy) pixels, zero-filled: a crop of the padded image."""
    s = max(abs(dx), abs(dy))
    padded = F.pad(images, (s, s, s, s))
    h, w = images.shape[-2:]
    return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]


def tta_views(images: torch.Tensor, flip: bool, shift: int) -> list[torch.Tensor]:
    """The extra views (the original is evaluated by the loop already)."""
    views = [images.flip(-1)] if flip else []
    if shift:
        views += [shifted(images, dx, dy) for dx, dy in ((shift, shift), (shift, -shift), (-shift, shift),
                                                          (-shift, -shift))]
    return views


def average_log_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    probs = torch.stack([F.softmax(x.float(), dim=-1) for x in logits]).mean(0)
    return probs.clamp_min(1e-12).log()


@register("tta")
class TestTimeAugmentation(Plugin):
    """Evaluate the mean softmax over flipped (and shifted) views as <prefix>_tta."""

    class Options(PluginOptions):
        flip: bool = Field(True, description="add the horizontally flipped view")
        shift: int = Field(0, ge=0, description="add 4 views shifted diagonally by this many pixels (0: off)")

    @classmethod
    def check_recipe(cls, recipe, options):
        if recipe.data.val is None:
            return "test-time augmentation evaluates on data.val, which the recipe does not set"
        if not options.flip and not options.shift:
            return "no views to add: set flip: true or shift > 0"
        return None

    def eval_logits(self, ctx, outputs: dict, images: torch.Tensor, model, prefix: str) -> dict:
        views = tta_views(images, self.options.flip, self.options.shift)
        outputs[f"{prefix}_tta"] = average_log_probs([outputs[prefix]] + [model(v) for v in views])
        return outputs
