"""data.aug_repeats (repeated augmentation): unshuffled, the lanes are exactly timm's
RepeatAugSampler's ranks; shuffled, each epoch draws N/k samples k times each, the copies side by
side on neighbouring lanes with their own augmentation, the same global batches on any number of
processes; a run resumes exactly; balanced_sampling with it is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data.distributed_sampler import RepeatAugSampler

from launcher.config.load import validate_recipe
from launcher.data import EpochPlan, TrainStream, index_shards
from launcher.data.transforms import ImageTransform
from launcher.errors import LauncherError
from launcher.loop import train
from tests.conftest import small_recipe
from tests.test_checkpoint import AUGMENT, same_run

N = 1200


def plan(world_size=1, shuffle=True, k=3, streams=6, seed=0):
    return EpochPlan(shard_sizes=(100,) * 12, global_batch=48, streams=streams, world_size=world_size, seed=seed,
                     shuffle=shuffle, aug_repeats=k)


def test_unshuffled_lanes_are_timms_repeat_aug_sampler_ranks():
    ours = plan(shuffle=False)
    for lane, ids in enumerate(ours.lanes(0)):
        timm_rank = list(RepeatAugSampler(list(range(N)), num_replicas=6, rank=lane, shuffle=False, num_repeats=3,
                                          selected_round=0))
        assert (ids % N).tolist() == timm_rank, lane


def test_each_epoch_draws_n_over_k_samples_k_times_side_by_side():
    ours = plan()
    for epoch in (0, 1):
        lanes = np.stack(ours.lanes(epoch))  # (lane, position)
        assert lanes.size == N and len(set(lanes.ravel().tolist())) == N  # every copy has its own id
        base, copy = lanes % N, lanes // N
        counts = np.bincount(base.ravel(), minlength=N)
        assert set(counts.tolist()) == {0, 3} and (counts == 3).sum() == N // 3
        for sample in np.flatnonzero(counts)[:50]:
            where = np.argwhere(base == sample)  # (lane, position) of its copies
            assert sorted(copy[tuple(where.T)].tolist()) == [0, 1, 2]
            assert len(set(where[:, 1].tolist())) == 1 and len(set(where[:, 0].tolist())) == 3  # one step, 3 lanes
    chosen = [set((np.concatenate(ours.lanes(e)) % N).tolist()) for e in (0, 1)]
    assert chosen[0] != chosen[1]  # drawn afresh each epoch
    # The same global batches on 1, 2, 3 and 6 processes.
    for step in range(ours.steps_per_epoch()):
        one = sorted(ours.rank_ids(0, step, 0).tolist())
        for world in (2, 3, 6):
            spread = plan(world_size=world)
            assert sorted(np.concatenate([spread.rank_ids(0, step, r) for r in range(world)]).tolist()) == one


def test_the_copies_get_their_own_augmentation(digits):
    index = index_shards(digits["train"], "data.train")
    recipe_ = validate_recipe(small_recipe(digits, "unused", data={"aug_repeats": 2, "streams": 2, "augment": {
        "crop_padding": 2, "hflip": 0.5}}))
    transform = ImageTransform(recipe_.data, 3, train=True, batched=False)
    lanes_plan = EpochPlan(tuple(int(n) for n in index.shard_sizes), global_batch=32, streams=2, world_size=1, seed=0,
                           aug_repeats=2)
    batch = next(iter(TrainStream(index, lanes_plan, transform, 0, 0, 0)))
    ids, images = batch["ids"], batch["images"]
    first, second = ids[:16], ids[16:]  # lane 0 then lane 1: the two copies of each sample, side by side
    assert torch.equal(first, second)
    assert sum(not torch.equal(a, b) for a, b in zip(images[:16], images[16:])) >= 12


def test_a_run_resumes_exactly_and_balanced_sampling_is_refused(digits, tmp_path):
    for run, stops in (("straight", (20,)), ("resumed", (10, 20))):
        for stop in stops:
            raw = small_recipe(digits, tmp_path / run, train={"epochs": 2, "max_steps": stop},
                               data={"aug_repeats": 2, "num_workers": 2, "augment": AUGMENT},
                               plugins={"checkpoint": {"every_steps": 10}})
            train(validate_recipe(raw))
    same_run(tmp_path / "straight", tmp_path / "resumed")
    with pytest.raises(LauncherError, match="data.aug_repeats also decides how often each sample is drawn"):
        validate_recipe(small_recipe(digits, tmp_path / "x", data={"aug_repeats": 2},
                                     plugins={"balanced_sampling": {}}))
