"""balanced_sampling: the plan draws each sample floor/ceil of N w_i / sum(w) times (systematic
resampling), the epoch keeps N samples, classes get equal (power 1) or square-root (power 0.5)
shares, copies are augmented apart, and a training run on imbalanced shards sees balanced batches."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.data import EpochPlan
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.balanced_sampling import class_sampling_weights
from tests.conftest import small_recipe, write_shards

COUNTS = (600, 60, 20)


def labels_for(counts=COUNTS) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


def plan(weights, seed=0) -> EpochPlan:
    n = len(weights)
    return EpochPlan(shard_sizes=(n // 2, n - n // 2), global_batch=32, streams=2, world_size=1, seed=seed,
                     sample_weights=weights)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_each_sample_is_drawn_floor_or_ceil_of_its_expected_count(power):
    labels = labels_for()
    weights = class_sampling_weights(labels, 3, power)
    assert np.allclose(weights, np.array(COUNTS, dtype=float)[labels] ** -power)
    expected = len(labels) * weights / weights.sum()
    for epoch in range(3):
        counts = plan(weights).repeat_counts(epoch)
        assert counts.sum() == len(labels)
        assert np.all((counts == np.floor(expected)) | (counts == np.ceil(expected)))
        shares = np.bincount(labels, weights=counts) / len(labels)
        reference = np.array(COUNTS, dtype=float) ** (1 - power)
        assert np.allclose(shares, reference / reference.sum(), atol=0.01)


def test_the_epoch_keeps_its_length_and_copies_get_their_own_ids():
    labels = labels_for()
    p = plan(class_sampling_weights(labels, 3, 1.0))
    lanes = p.lanes(0)
    ids = np.concatenate(lanes)
    n = len(labels)
    assert len(ids) == n and len(set(ids.tolist())) == n  # every draw has its own id (seeds apart)
    assert np.array_equal(np.bincount(ids % n, minlength=n), p.repeat_counts(0))
    # the same plan on 2 ranks: the same global draws
    p2 = EpochPlan(shard_sizes=p.shard_sizes, global_batch=32, streams=2, world_size=2,
                   sample_weights=p.sample_weights)
    assert np.array_equal(np.sort(np.concatenate([p2.rank_ids(0, s, r) for s in range(p2.steps_per_epoch())
                                                  for r in range(2)])), np.sort(ids))
    assert not np.array_equal(p.repeat_counts(0), p.repeat_counts(1))  # fresh draws per epoch


def test_training_on_imbalanced_shards_sees_balanced_batches(tmp_path):
    labels = labels_for()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(len(labels), 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "arrays.npz", x_train=images, y_train=labels, x_val=images[:30], y_val=labels[:30])
    info = write_shards(tmp_path / "shards", "npz", "--src", str(tmp_path / "arrays.npz"), "--shard-size", "200")
    raw = small_recipe(info, tmp_path / "run", model={"name": "wrn10_1", "num_classes": 3, "in_chans": 1},
                       data={"image_size": 8, "mean": [0.5], "std": [0.5], "val": None},
                       plugins={"balanced_sampling": {"power": 1.0}, "recorder": {"trace": False}})
    ctx = train(validate_recipe(raw))
    recorder = next(p for p in ctx.plugins if p.name == "recorder")
    seen = np.concatenate([s["ids"] for s in recorder.steps])
    assert len(seen) == len(labels)
    shares = np.bincount(labels[seen], minlength=3) / len(seen)
    assert np.allclose(shares, 1 / 3, atol=0.01), shares
