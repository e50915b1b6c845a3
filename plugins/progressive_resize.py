"""progressive_resize: train on small images first and grow them at given epochs
(fastai's progressive resizing; Touvron et al. 2019 "FixRes" and FFCV's ResNet recipes
show the speed-up, and that training ending at the test size keeps the accuracy).

    plugins:
      progressive_resize: {sizes: [16, 24, 32], epochs: [0, 4, 8]}

trains epochs 0-3 at 16 px, 4-7 at 24 px and the rest at 32 px. The last size must be
data.image_size, which evaluation always uses. The data pipeline resizes each sample to the
epoch's size before augmenting (random crops are taken at that size).

Hooks: on_epoch_start (sets ctx.image_size). No state: the size follows from the epoch,
so a resume continues at the right size.
"""

from __future__ import annotations

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register


def size_for_epoch(sizes: list[int], epochs: list[int], epoch: int) -> int:
    return next(size for size, start in zip(reversed(sizes), reversed(epochs)) if epoch >= start)


@register("progressive_resize")
class ProgressiveResize(Plugin):
    """Train at growing image sizes, switching at given epochs; evaluate at data.image_size."""

    class Options(PluginOptions):
        sizes: list[int] = Field(min_length=1, description="training image sizes, in order")
        epochs: list[int] = Field(min_length=1, description="the epoch each size starts at (the first is 0)")

    @classmethod
    def check_recipe(cls, recipe, options):
        o = options
        if len(o.sizes) != len(o.epochs):
            return f"sizes {o.sizes} and epochs {o.epochs} need the same length (one start epoch per size)"
        if o.epochs[0] != 0 or any(b <= a for a, b in zip(o.epochs, o.epochs[1:])):
            return f"epochs {o.epochs} must start at 0 and increase"
        if any(s <= 0 for s in o.sizes):
            return f"sizes {o.sizes} must be positive"
        if o.sizes[-1] != recipe.data.image_size:
            return (f"the last size ({o.sizes[-1]}) must be data.image_size ({recipe.data.image_size}), the size "
                    "evaluation uses; training should end at the test resolution")
        return None

    def on_epoch_start(self, ctx) -> None:
        ctx.image_size = size_for_epoch(self.options.sizes, self.options.epochs, ctx.epoch)
