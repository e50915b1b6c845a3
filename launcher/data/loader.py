"""Loader workers and the device: batches() runs a stream in DataLoader worker processes (per
pass or persistent), on_device() copies batches to the GPU one step ahead; the workers stop
however a pass ends.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import sys
import weakref
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from launcher.data.stream import Batch, _ShardReader
from launcher.errors import LauncherError
from launcher.data.remote.cache import needs_of


def batches(stream: _ShardReader, num_workers: int, pin_memory: bool = False,
            workers: Optional["PersistentWorkers"] = None) -> Iterator[Batch]:
    """Iterate a stream through a DataLoader. Workers hand back whole batches in turn, so the
    order is the step order. With no workers, loading runs here, and the per-sample seeding
    must not disturb the training process's own RNG (dropout, plugins). `workers`: reuse those
    persistent workers (local shards only) instead of forking new ones for this pass."""
    loader, cache, index = None, stream.index.cache, stream.index
    if cache is not None:  # remote shards: what this pass reads, before the workers start
        cache.prepare(needs_of(stream.items(), index.shard_of, index.offsets, index.sizes, index.shard_starts(),
                               cache.shard_bytes, ranged=cache.ranged), in_flight_items=max(1, 2 * num_workers))
    if num_workers == 0:
        iterator = _rng_preserving(iter(stream))
    elif workers is not None and cache is None:
        iterator = workers.iterate(stream)
    else:
        with _forking_workers():
            iterator = loader = iter(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                                prefetch_factor=2, worker_init_fn=_prepare_worker))
        _running_loaders.add(loader)
    if cache is not None:
        cache.start()  # after the workers are forked: no fetch thread is copied into them
    try:
        for item_number, item in enumerate(iterator):
            if cache is not None:
                cache.item_done(item_number)  # its samples are here: shards only it read may go
            yield Batch(**item)
    except LauncherError as err:
        # A loader worker's LauncherError arrives wrapped with the worker's traceback: keep the message.
        raise LauncherError(str(err).rsplit("LauncherError: ", 1)[-1].strip()) from None
    finally:
        if loader is not None:
            _stop_workers(loader)
        if cache is not None:
            cache.stop()


class PersistentWorkers:
    """Loader workers forked once and kept for the following passes (torch's persistent_workers),
    so an epoch does not start with a fork and an empty pipeline. Each pass's stream reaches the
    workers as its job() numbers (epoch, first step, image size), written to shared memory before
    the pass; the workers' copy of the stream takes them when torch restarts their iteration.
    Batches do not depend on which process loads them (per-sample seeding), so they are the
    per-pass workers' batches exactly. A stream that does not continue the first one (another plan,
    index or transform) gets new workers. Not for remote shards: their cache stops between passes,
    and a worker still loading a stale prefetched batch would wait for a shard that never comes."""

    def __init__(self, num_workers: int, pin_memory: bool):
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.job = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.template: Optional[_ShardReader] = None
        self.loader = self.iterator = None
        self.forks = 0  # how many times workers were started (tests read it)

    def iterate(self, stream: _ShardReader):
        if self.template is None or not stream.continues(self.template):
            self.close()
            self.template, self.forks = stream, self.forks + 1
            self.loader = DataLoader(_Relay(stream, self.job), batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory, prefetch_factor=2, persistent_workers=True,
                                     worker_init_fn=_prepare_worker)
        self.job.copy_(torch.tensor(stream.job(), dtype=torch.int64))
        # The first iter() forks the workers; later ones restart them (torch drops the batches a
        # cut-short pass had prefetched) and they read the new job.
        with _forking_workers():
            self.iterator = iter(self.loader)
        _running_loaders.add(self.iterator)
        return self.iterator

    def close(self) -> None:
        if self.iterator is not None:
            _stop_workers(self.iterator)
        self.template = self.loader = self.iterator = None


class _Relay(IterableDataset):
    """What persistent workers iterate: their stream, set to the pass's job."""

    def __init__(self, stream: _ShardReader, job: torch.Tensor):
        self.stream, self.job = stream, job

    def __iter__(self):
        self.stream.take_job([int(v) for v in self.job])
        return iter(self.stream)


def on_device(stream_batches: Iterator[Batch], device: torch.device, memory_format: torch.memory_format,
              finish: Callable[..., torch.Tensor]) -> Iterator[Batch]:
    """The batches on the device, in `memory_format`, finished (ImageTransform.finish normalises
    uint8 batches there). On CUDA the next batch is copied from pinned memory and finished on a side
    stream while the current step runs (timm's PrefetchLoader does the same); elsewhere each batch
    is moved when it is taken. One batch ahead: what a step reads does not change."""
    if device.type != "cuda":
        for batch in stream_batches:
            batch.to(device, memory_format)
            batch.images = finish(batch.images, batch.augment)
            yield batch
        return
    side = _side_stream(device)
    pending = None
    for batch in stream_batches:
        with torch.cuda.stream(side):
            batch.to(device, memory_format)
            batch.images = finish(batch.images, batch.augment)
            copied = torch.cuda.Event()
            copied.record(side)
        if pending is not None:
            yield _arrived(*pending)
        pending = batch, copied
    if pending is not None:
        yield _arrived(*pending)


_side_streams: dict = {}


def _side_stream(device: torch.device):
    """One copy stream per device for the process's lifetime: the caching allocator pools blocks
    per stream, so a new stream per epoch would strand the last one's cached blocks."""
    key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(key)
    return _side_streams[key]


def _arrived(batch: Batch, copied) -> Batch:
    """The batch, once its copy is done, made safe to use (and free) on the compute stream."""
    main = torch.cuda.current_stream()
    main.wait_event(copied)
    batch.images.record_stream(main)
    batch.targets.record_stream(main)
    return batch


# DataLoader iterators whose workers may still run. The workers ignore SIGTERM (_prepare_worker),
# so they must be asked to stop: multiprocessing's exit handler would terminate them with SIGTERM
# and then wait for them forever. That happened to a process that kept a training error (and so
# the suspended loader) until it exited, as a test runner does.
_running_loaders: "weakref.WeakSet" = weakref.WeakSet()


def _stop_workers(loader) -> None:
    """torch's own orderly shutdown of a DataLoader iterator's workers (done event, a wake-up for
    each, join); private, as torch has no public way to close an iterator. Idempotent."""
    shutdown = getattr(loader, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@atexit.register  # registered after multiprocessing's exit handler (torch imports it), so it runs first
def _stop_leftover_workers() -> None:
    for loader in list(_running_loaders):
        _stop_workers(loader)


@contextlib.contextmanager
def _forking_workers():
    """Fork the loader workers with every object of this process frozen (gc.freeze, as Python's
    docs advise before a fork without exec): a worker's garbage collection then never finalises
    this process's garbage, whose C++ side may own threads that exist only here. Seen: a
    torch.distributed gloo process group left in a reference cycle (a one-process FSDP run that
    destroyed its group) was collected in a worker, and its destructor deadlocked it or aborted it
    (std::system_error, Invalid argument). Frozen objects are also not written to by the worker's
    collections, so their pages stay shared. This process unfreezes them once the workers exist."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _prepare_worker(worker_id: int) -> None:
    """Ctrl-C reaches the loader workers too (one process group), and Slurm signals every process
    of a job step (scancel, the time-limit warning): a worker killed by it would fail the step that
    the training process is finishing before it checkpoints. Workers stop when it tells them."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    sys.excepthook = _quiet_about_abandoned_handovers


def _quiet_about_abandoned_handovers(kind, value, traceback) -> None:
    """A worker hands each batch's tensors over through a file descriptor served by a thread of
    multiprocessing's resource sharer. When the training process stops in the middle of taking one
    (Ctrl-C without the checkpoint plugin raises KeyboardInterrupt anywhere), that thread's accept()
    fails and multiprocessing prints a traceback through sys.excepthook, in a worker that is about
    to be stopped anyway. The batch was never used, so nothing is lost: say nothing. Any other
    error is printed as usual."""
    if issubclass(kind, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(kind, value, traceback)


def _rng_preserving(iterator: Iterator) -> Iterator:
    while True:
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                item = next(iterator)
            except StopIteration:
                return
        random.setstate(py_state)
        np.random.set_state(np_state)
        yield item


def recompute_batchnorm(model: torch.nn.Module, index, data, in_chans: int, device: torch.device,
                        memory_format: torch.memory_format = torch.contiguous_format, rank: int = 0,
                        world_size: int = 1) -> None:
    """torch's update_bn for averaged weights (swa, launcher.average): BatchNorm statistics over
    this rank's share of the training images `index`, as they are evaluated (no augmentation)."""
    from torch.optim.swa_utils import update_bn

    from launcher.data.stream import EvalStream
    from launcher.data.transforms import ImageTransform

    transform = ImageTransform(data, in_chans, train=False, normalize_on_device=device.type == "cuda")
    stream = EvalStream(index, transform, data.eval_batch_size or 2 * data.batch_size, rank, world_size)
    update_bn((batch.images for batch in on_device(batches(stream, 0), device, memory_format, transform.finish)), model)
