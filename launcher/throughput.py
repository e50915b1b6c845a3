"""Where a run's time goes, for every logged row: the share of step time spent waiting for the
next batch (train/data_wait), and the peak memory (train/peak_memory_gb: CUDA's max allocated
on the device, or the process's peak resident set size on the CPU). Rank 0's figures.

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
