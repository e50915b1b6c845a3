"""Where a run's time goes, for every logged row: the share of step time spent waiting for the
next batch (train/data_wait), the peak memory (train/peak_memory_gb: CUDA's max allocated
on the device, or the process's peak resident set size on the CPU), and on a CUDA device whose
peak is known, the model FLOPs utilisation (train/mfu: training FLOPs per sample, counted by
torch.utils.flop_counter on a meta-device copy, x samples/s, over the devices' dense bf16 peak).
Rank 0's figures.

A step is timed from asking the loader for its batch to the end of its optimizer step, so the
evaluations, checkpoints and logging between steps count in neither part. The first batch of
each pass over the data waits for the loader to start (workers forking, shards opening): it is
in the row's figure but not in the starved-loader warning, which no number of workers fixes.
Written here because no library measures it inside our own loop (Composer's SpeedMonitor and
Lightning's profilers are tied to their trainers).
"""

from __future__ import annotations

import collections
import resource
import sys
import time
from typing import Iterable, Iterator, Optional


class DataWait:
    """Times each wait for a batch. `warn_share` over the last `window` steps (epoch starts
    left out) makes one warning per run, with the fix."""

    def __init__(self, window: int = 50, warn_share: float = 0.2):
        self.warn_share = warn_share
        self.recent: collections.deque = collections.deque(maxlen=window)  # (waited, step seconds)
        self.row_waited = self.row_seconds = 0.0
        self.warned = False
        self._asked: Optional[float] = None  # when the current step asked for its batch
        self._waited = 0.0
        self._first_of_pass = False

    def batches(self, iterable: Iterable) -> Iterator:
        """The batches of one pass, each wait timed."""
        iterator, first = iter(iterable), True
        while True:
            asked = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._asked, self._waited, self._first_of_pass = asked, time.perf_counter() - asked, first
            first = False
            yield item

    def step_done(self) -> None:
        if self._asked is None:
            return
        seconds = time.perf_counter() - self._asked
        self.row_waited += self._waited
        self.row_seconds += seconds
        if not self._first_of_pass:
            self.recent.append((self._waited, seconds))
        self._asked = None

    def row_share(self) -> float:
        """The share of step time spent waiting since the last row; starts the next row."""
        share = self.row_waited / self.row_seconds if self.row_seconds > 0 else 0.0
        self.row_waited = self.row_seconds = 0.0
        return round(share, 4)

    def starved_share(self) -> Optional[float]:
        """The waiting share over the last `window` steps, once per run when it passes warn_share."""
        if self.warned or len(self.recent) < self.recent.maxlen:
            return None
        waited, seconds = (sum(column) for column in zip(*self.recent))
        if seconds <= 0 or waited / seconds <= self.warn_share:
            return None
        self.warned = True
        return waited / seconds


def starved_loader_warning(share: float, steps: int, num_workers: int, augment_on: str) -> str:
    fixes = [f"more data.num_workers (now {num_workers})"]
    if augment_on != "device":
        fixes.append("data.augment_on: device (augmentation as batched ops after the transfer)")
    fixes.append("shards on faster storage, or a local data.cache_dir for remote ones")
    return (f"warning: the training loop waited for data {100 * share:.0f}% of the time over the last {steps} steps: "
            f"the loader holds the steps back. Try {', or '.join(fixes)}.")


def peak_memory_gb(device) -> float:
    """CUDA's max allocated on `device`, else this process's peak resident set size."""
    if device.type == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched
# against torch.cuda.get_device_name() in this order (first match wins).
PEAK_TFLOPS = [("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
               ("A10G", 125.0), ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
               ("A6000", 155.0), ("V100", 125.0), ("T4", 65.0)]


def peak_tflops(device) -> Optional[float]:
    """The device's dense bf16 peak, None for the CPU or a GPU not in PEAK_TFLOPS."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS if key in name), None)


def training_flops_per_sample(make_model, image_size: int, in_chans: int) -> float:
    """Forward + backward FLOPs of one sample (matmuls and convolutions), counted on a copy of the
    model built on the meta device: no memory, no weights touched, no random draws consumed."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = make_model()
        images = torch.zeros(2, in_chans, image_size, image_size)
        targets = torch.zeros(2, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter:
            F.cross_entropy(model(images), targets).backward()
    return counter.get_total_flops() / 2
