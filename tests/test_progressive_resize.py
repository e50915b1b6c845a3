"""progressive_resize: each epoch trains at its size, evaluation stays at data.image_size,
and the recipe is checked (one start epoch per size, ending at the evaluation size)."""

from __future__ import annotations

import pytest

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.registry import Plugin, register
from launcher.plugins.progressive_resize import size_for_epoch
from tests.conftest import small_recipe


@register("test_shape_probe")
class ShapeProbe(Plugin):
    """Records the image sizes the loop trains and evaluates on."""

    def __init__(self, options):
        super().__init__(options)
        self.train_sizes, self.eval_sizes = {}, set()

    def transform_batch(self, ctx, batch):
        self.train_sizes.setdefault(ctx.epoch, set()).add(tuple(batch.images.shape[-2:]))
        return batch

    def eval_logits(self, ctx, outputs, images, model, prefix):
        self.eval_sizes.add(tuple(images.shape[-2:]))
        return outputs


def test_size_for_epoch():
    assert [size_for_epoch([8, 12, 16], [0, 2, 3], e) for e in range(5)] == [8, 8, 12, 16, 16]


def test_trains_at_each_epochs_size_and_evaluates_at_the_final_size(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 3}, data={"batch_size": 256},
                       plugins={"progressive_resize": {"sizes": [8, 12, 16], "epochs": [0, 1, 2]},
                                "test_shape_probe": {}})
    ctx = train(validate_recipe(raw))
    probe = next(p for p in ctx.plugins if p.name == "test_shape_probe")
    assert probe.train_sizes == {0: {(8, 8)}, 1: {(12, 12)}, 2: {(16, 16)}}
    assert probe.eval_sizes == {(16, 16)}


@pytest.mark.parametrize("options,message", [
    ({"sizes": [8, 16], "epochs": [0]}, "same length"),
    ({"sizes": [8, 16], "epochs": [1, 2]}, "must start at 0"),
    ({"sizes": [8, 12], "epochs": [0, 1]}, r"last size \(12\) must be data.image_size \(16\)"),
])
def test_bad_schedules_are_refused(digits, tmp_path, options, message):
    with pytest.raises(LauncherError, match=message):
        validate_recipe(small_recipe(digits, tmp_path, plugins={"progressive_resize": options}))
