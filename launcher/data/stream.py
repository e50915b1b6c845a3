"""Streams of samples: decoding an image's bytes, seeding each sample's augmentation, and the
training and evaluation streams that turn the epoch plan into batches.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launcher.data.index import ShardIndex
from launcher.data.plan import EpochPlan
from launcher.errors import LauncherError

_NPY_UINT8 = re.compile(r"^\{'descr': '\|u1', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}\s*$")


def _read_npy(data: bytes) -> np.ndarray:
    """Written by hand for the common case (uint8, C order, format 1.0): np.load parses the
    header with ast.literal_eval, which costs 10x more than a small image's pixels."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        header_len = int.from_bytes(data[8:10], "little")
        match = _NPY_UINT8.match(data[10:10 + header_len].decode("latin1"))
        shape = tuple(int(x) for x in match.group(1).split(",") if x.strip()) if match else ()
        if len(shape) in (2, 3):
            return np.frombuffer(data, dtype=np.uint8, offset=10 + header_len).reshape(shape)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"a .npy image must be a uint8 HxW or HxWxC array; this one is {array.dtype} with shape "
                         f"{array.shape} (scale it to 0..255 and convert with .astype(np.uint8))")
    return array


def decode_image(data: bytes, ext: str, as_pil: bool = False):
    """Image bytes -> uint8 tensor (C, H, W). `.npy` holds a raw uint8 HxW or HxWxC array.
    as_pil: encoded images come back as the decoded PIL image (L or RGB), for PIL transforms."""
    if ext == "npy":
        array = _read_npy(data)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            if as_pil:
                img.load()
                return img
            array = np.asarray(img)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # writable, contiguous CHW


# ---------------------------------------------------------------- datasets


@dataclass
class Batch:
    """What one rank trains on in one step. Plugins may replace `targets` by soft targets
    (N, classes), e.g. mixup."""

    images: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor  # sample ids (positions in the shard index)
    global_count: int  # samples in the global batch across all ranks
    step_in_epoch: int = 0
    # data.augment_on: device: each sample's augmentation parameters, applied where the batch lands
    augment: Optional[dict] = None

    def split(self, parts: int) -> list["Batch"]:
        """At most `parts` non-empty micro-batches, in order (a short last batch gives fewer)."""
        from dataclasses import replace

        n = len(self.targets)
        chunks = [c for c in torch.arange(n).tensor_split(min(parts, n)) if len(c)]
        def part(c):
            return slice(int(c[0]), int(c[-1]) + 1)

        return [replace(self, images=self.images[part(c)], targets=self.targets[part(c)], ids=self.ids[part(c)],
                        augment=None if self.augment is None else {k: v[part(c)] for k, v in self.augment.items()})
                for c in chunks]

    def to(self, device, memory_format=torch.contiguous_format) -> "Batch":
        self.images = self.images.to(device, non_blocking=True, memory_format=memory_format)
        self.targets = self.targets.to(device, non_blocking=True)
        if self.augment is not None:
            self.augment = {k: v.to(device, non_blocking=True) for k, v in self.augment.items()}
        return self


_MASK64 = (1 << 64) - 1


def _mix64(*values: int) -> int:
    """A splitmix64-style hash of integers (SeedSequence would do, at 6x the cost per sample)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h


def seed_for_sample(seed: int, epoch: int, sample_id: int) -> None:
    """Seed every CPU RNG the transforms may use (torch, random, numpy) for this one sample.
    torch.default_generator, not torch.manual_seed: the latter also seeds every GPU (100x slower)."""
    h = _mix64(seed, epoch, int(sample_id))
    torch.default_generator.manual_seed(h >> 1)
    random.seed(h)
    np.random.seed(h & 0xFFFFFFFF)


def _same_transform(a, b) -> bool:
    same = getattr(a, "same_settings", None)
    return a is b or (same is not None and same(b))


class _ShardReader(IterableDataset):
    """Shared by the training and evaluation streams: load, decode, seed, transform."""

    def __init__(self, index: ShardIndex, transform: Callable, seed: int, epoch: int):
        self.index, self.transform, self.seed, self.epoch = index, transform, seed, epoch

    def _load(self, ids: np.ndarray, files: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[dict]]:
        """ids may be resampling copies (id + k * N): read sample id % N, seed with the copy's id.
        With a batched augmentation (data.augment_on: device) the samples are only decoded here,
        and the third value holds each sample's augmentation parameters, drawn from its key."""
        batched = getattr(self.transform, "batch_augment", None) is not None
        images = []
        for sample_id in ids:
            i = int(sample_id) % len(self.index)
            try:
                raw, ext = self.index.read_image(i, files)
                if len(raw) != self.index.sizes[i]:
                    raise EOFError(f"read {len(raw)} of its {self.index.sizes[i]} bytes")
                image = decode_image(raw, ext, as_pil=getattr(self.transform, "takes_pil", False))
            except LauncherError:
                raise  # a remote shard that could not be fetched: its own message
            except Exception as err:  # noqa: BLE001  (any decoder error: name the file and sample)
                raise LauncherError(self.index.describe_bad_sample(i, err)) from None
            if not batched:  # the batched path draws no random number per sample here
                seed_for_sample(self.seed, self.epoch, int(sample_id))
            images.append(self.transform(image))
        if batched and len({image.shape for image in images}) > 1:
            shapes = sorted({tuple(image.shape) for image in images})
            raise LauncherError(
                f"data.augment_on=device with data.augment.random_resized_crop needs images of one size to make a "
                f"batch of, but these differ ({shapes[0]} and {shapes[-1]} in shard "
                f"'{self.index.shard_name(int(self.index.shard_of[int(ids[0]) % len(self.index)]))}'). Set "
                "data.augment_on=loader: the crops are then cut per sample in the loader workers.")
        images = torch.stack(images)
        params = None
        if batched:
            from launcher.data.augment import sample_keys

            params = self.transform.batch_params(sample_keys(self.seed, self.epoch, ids), *images.shape[-2:])
        return images, torch.from_numpy(self.index.labels[ids % len(self.index)]), params

    def items(self) -> list[np.ndarray]:
        """The sample ids of each item (batch) this stream yields, in order."""
        raise NotImplementedError

    # Persistent loader workers (PersistentWorkers) hold a copy of the stream they were forked with.
    # A later stream that `continues` it differs only in its `job()` numbers, which reach the workers
    # through shared memory; any other difference needs new workers.
    def continues(self, other: "_ShardReader") -> bool:
        raise NotImplementedError

    def job(self) -> list[int]:
        return [0, 0, 0]

    def take_job(self, job: list[int]) -> None:
        pass

    def _my_share(self, items: list) -> Iterator:
        """This data-loader worker's items (every nw-th), and a per-worker file cache. Remote
        shards' files are closed after each item: the shard cache may evict them, and an open
        file keeps its disk space."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        files: dict = {}
        try:
            for item in items[worker::workers]:
                yield item, files
                if self.index.cache is not None:
                    for handle in files.values():
                        handle.close()
                    files.clear()
        finally:
            for handle in files.values():
                handle.close()


class TrainStream(_ShardReader):
    """The training batches of one rank for one epoch, from `start_step` on."""

    def __init__(self, index: ShardIndex, plan: EpochPlan, transform: Callable, epoch: int, rank: int,
                 start_step: int = 0):
        super().__init__(index, transform, plan.seed, epoch)
        self.plan, self.rank, self.start_step = plan, rank, start_step

    def __len__(self) -> int:
        return max(0, self.plan.steps_per_epoch() - self.start_step)

    def continues(self, other) -> bool:
        return (type(other) is TrainStream and other.index is self.index and other.plan is self.plan
                and other.rank == self.rank and _same_transform(other.transform, self.transform))

    def job(self) -> list[int]:
        return [self.epoch, self.start_step, getattr(self.transform, "size", 0)]

    def take_job(self, job: list[int]) -> None:
        self.epoch, self.start_step, size = job
        if size != getattr(self.transform, "size", 0):
            self.transform = self.transform.with_size(size)

    def items(self) -> list[np.ndarray]:
        return [self.plan.rank_ids(self.epoch, step, self.rank) % len(self.index)
                for step in range(self.start_step, self.plan.steps_per_epoch())]

    def __iter__(self):
        steps = list(range(self.start_step, self.plan.steps_per_epoch()))
        for step, files in self._my_share(steps):
            ids = self.plan.rank_ids(self.epoch, step, self.rank)
            images, targets, params = self._load(ids, files)
            yield {"images": images, "targets": targets, "ids": torch.from_numpy(ids % len(self.index)),
                   "global_count": self.plan.global_count(self.epoch, step), "step_in_epoch": step, "augment": params}


class EvalStream(_ShardReader):
    """Every validation sample exactly once: rank r takes its contiguous share, no padding."""

    def __init__(self, index: ShardIndex, transform: Callable, batch_size: int, rank: int, world_size: int):
        super().__init__(index, transform, seed=0, epoch=0)
        self.shape = (batch_size, rank, world_size)
        n = len(index)
        ids = np.arange((rank * n) // world_size, ((rank + 1) * n) // world_size)
        self.batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def continues(self, other) -> bool:
        return (type(other) is EvalStream and other.index is self.index and other.shape == self.shape
                and _same_transform(other.transform, self.transform))

    def items(self) -> list[np.ndarray]:
        return self.batches

    def __iter__(self):
        for ids, files in self._my_share(self.batches):
            images, targets, _ = self._load(ids, files)
            yield {"images": images, "targets": targets, "ids": torch.from_numpy(ids),
                   "global_count": len(ids), "step_in_epoch": 0}


