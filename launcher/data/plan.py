"""The epoch plan: which samples every step of an epoch reads, on every rank (see the package
docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from launcher.errors import LauncherError

# ---------------------------------------------------------------- the epoch plan


@dataclass(frozen=True)
class EpochPlan:
    """Which samples every step of an epoch uses (see the module docstring).

    Deterministic in (seed, epoch, shard sizes, global_batch, streams, shuffle, window);
    `world_size` only decides which lanes each rank owns, and whether a tiny last step is
    merged into the one before it (so that no rank gets fewer than `min_rank_samples`,
    which BatchNorm needs in training).
    """

    shard_sizes: tuple[int, ...]
    global_batch: int
    streams: int
    world_size: int
    seed: int = 0
    shuffle: bool = True
    window: int = 1000
    min_rank_samples: int = 2
    # Relative sampling weight per sample (index order); None: every sample once per epoch.
    sample_weights: Optional[np.ndarray] = field(default=None, compare=False, hash=False, repr=False)
    # Repeated augmentation (data.aug_repeats): each epoch, N/k samples k times each (see _repeated).
    aug_repeats: int = 1
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.streams % self.world_size or self.global_batch % self.streams:
            raise LauncherError(
                f"data.streams={self.streams} must be a multiple of the number of processes ({self.world_size}) "
                f"and divide the global batch ({self.global_batch} = data.batch_size x processes)."
            )
        if self.aug_repeats > 1 and self.sample_weights is not None:
            raise LauncherError("data.aug_repeats and balanced_sampling both decide how often each sample is drawn "
                                "in an epoch: use one of them.")
        # Lane lengths (near-equal cuts of the stream) and the step count do not depend on the
        # epoch: computed once here, not on every step in every loader worker.
        n, L = self.num_samples, self.streams
        if self.aug_repeats > 1:  # dealt round-robin: every lane as long, the epoch cut to a multiple of L
            object.__setattr__(self, "lane_lengths", [n // L] * L)
        else:
            object.__setattr__(self, "lane_lengths", [((lane + 1) * n) // L - (lane * n) // L for lane in range(L)])
        steps = max(1, math.ceil(max(self.lane_lengths) / self.per_lane))
        if steps > 1 and self._smallest_rank_share(steps - 1) < self.min_rank_samples:
            steps -= 1  # the tiny tail is merged into the step before
        object.__setattr__(self, "_steps", steps)

    @property
    def num_samples(self) -> int:
        return int(sum(self.shard_sizes))

    def lanes(self, epoch: int) -> list[np.ndarray]:
        """The epoch's sample ids, as `streams` shuffled lanes."""
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = self._make_lanes(epoch)
        return self._cache[epoch]

    def _make_lanes(self, epoch: int) -> list[np.ndarray]:
        starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        order = np.arange(len(self.shard_sizes))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(order)
        stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order])
        if self.aug_repeats > 1:
            return self._repeated(stream, epoch)
        if self.sample_weights is not None:
            stream = self._resample(stream, epoch)
        bounds = np.concatenate([[0], np.cumsum(self.lane_lengths)])
        lanes = []
        for lane in range(self.streams):
            ids = stream[bounds[lane]:bounds[lane + 1]].copy()
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, 2, lane])
                for w in range(0, len(ids), self.window):
                    ids[w:w + self.window] = rng.permutation(ids[w:w + self.window])
            lanes.append(ids)
        return lanes

    def _repeated(self, stream: np.ndarray, epoch: int) -> list[np.ndarray]:
        """Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler, timm's RepeatAugSampler):
        the epoch keeps timm's length (the data set's size, here cut to a multiple of the lanes),
        made of ceil(N / k) samples drawn afresh each epoch (kept in stream order, for shard
        locality), each k times; copy c of sample i has the id i + c * N, so each copy gets its own
        augmentation. The copies are dealt round-robin to the lanes, so the k copies of a sample
        sit on k neighbouring lanes at the same step (across a step boundary when data.streams is
        not a multiple of k): on different ranks when each rank holds one lane, as timm's sampler
        puts them on different GPUs. The window shuffle moves every lane's positions alike, so the
        copies stay side by side; nothing depends on the number of processes."""
        n, k, lanes = self.num_samples, self.aug_repeats, self.streams
        length = (n // lanes) * lanes
        unique = -(-length // k)
        rng = np.random.default_rng([self.seed, epoch, 4])
        chosen = stream[np.sort(rng.choice(n, size=unique, replace=False))] if self.shuffle else stream[:unique]
        copies = (np.repeat(chosen, k) + np.tile(np.arange(k), unique) * n)[:length]
        dealt = copies.reshape(-1, lanes)  # row p: position p of every lane
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 2])
            for w in range(0, len(dealt), self.window):
                dealt[w:w + self.window] = dealt[w:w + self.window][rng.permutation(len(dealt[w:w + self.window]))]
        return [dealt[:, lane].copy() for lane in range(lanes)]

    def repeat_counts(self, epoch: int) -> np.ndarray:
        """How often each sample (index order) is drawn this epoch: systematic resampling
        (one uniform offset, N evenly spaced points through the cumulative weights), so the
        epoch keeps exactly N samples and each sample is drawn floor or ceil of N * w_i / sum(w)
        times; the lowest-variance unbiased scheme, written here because samplers in torch
        draw independently (multinomial) and need random access, which shards do not give."""
        w = np.asarray(self.sample_weights, dtype=np.float64)
        n = self.num_samples
        edges = np.concatenate([[0.0], np.cumsum(w / w.sum() * n)])
        edges[-1] = n  # exact, whatever the rounding
        u = np.random.default_rng([self.seed, epoch, 3]).random()
        hits = np.floor(edges - u).astype(np.int64)  # points u + k below each edge, minus one
        return np.diff(np.maximum(hits, -1))

    def _resample(self, stream: np.ndarray, epoch: int) -> np.ndarray:
        """The stream with each sample repeated as drawn. Repeats stay next to their shard
        (streaming locality; the window shuffle mixes them). The k-th copy of sample i gets the
        id i + k * N, so its augmentation is seeded apart; readers take the id modulo N."""
        counts = self.repeat_counts(epoch)[stream]
        repeated = np.repeat(stream, counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        copy = np.arange(len(repeated)) - first
        return repeated + copy * self.num_samples

    @property
    def per_lane(self) -> int:
        return self.global_batch // self.streams

    def steps_per_epoch(self) -> int:
        return self._steps

    def _lane_range(self, lane_len: int, step: int, steps: int) -> tuple[int, int]:
        start = step * self.per_lane
        end = lane_len if step == steps - 1 else min(lane_len, start + self.per_lane)
        return min(start, lane_len), end

    def _smallest_rank_share(self, step: int) -> int:
        """The fewest samples any rank would get at `step` if it were not merged."""
        per_rank, start = self.streams // self.world_size, step * self.per_lane
        return min(sum(max(0, min(length, start + self.per_lane) - start)
                       for length in self.lane_lengths[rank * per_rank:(rank + 1) * per_rank])
                   for rank in range(self.world_size))

    def rank_ids(self, epoch: int, step: int, rank: int) -> np.ndarray:
        """Sample ids that `rank` trains on at `step` of `epoch`."""
        per_rank = self.streams // self.world_size
        parts = []
        for lane_ids in self.lanes(epoch)[rank * per_rank:(rank + 1) * per_rank]:
            start, end = self._lane_range(len(lane_ids), step, self._steps)
            parts.append(lane_ids[start:end])
        return np.concatenate(parts)

    def global_count(self, epoch: int, step: int) -> int:
        """Samples in the whole global batch of `step` (the loss is normalised by it)."""
        ranges = [self._lane_range(length, step, self._steps) for length in self.lane_lengths]
        return int(sum(end - start for start, end in ranges))


