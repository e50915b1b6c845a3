"""One rank's bounded local cache of remote shards, filled in the order its epoch plan reads them.

The epoch plan says, before an epoch starts, which samples each of this rank's items (training
steps, evaluation batches) reads. From that, per shard: the first and the last item that need
it, and the byte range those samples span. A thread of the training process then fetches the
shards in order of first need, `prefetch_shards` beyond those needed now, into at most
`cache_limit` bytes, evicting shards whose last item has been consumed. Loader workers wait for
a shard's file to appear under its final name (fetches are atomic), so nothing partial is read.

  - Training starts when the first shards have arrived, not after the whole data set.
  - A resumed epoch fetches only the shards its remaining steps read, and of a shard only the
    byte range they need (a ranged read; the local file keeps the shard's offsets, the rest is
    a hole). So does a shard that two ranks share at the edge of their lanes.
  - Shards the rank keeps reading are kept: with cache_limit >= the data set, the second epoch
    downloads nothing.
  - Shards needed by the items the loader may be building are fetched even past cache_limit (a
    smaller limit could never finish); a warning says so once.

Written by hand: MosaicML Streaming and litdata do the same for their own formats only; WebDataset
streams each shard once, in an order that depends on the number of ranks and workers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.errors import LauncherError
from launcher.data.remote.store import Remote, kind

FAILED = "FAILED"  # a file in the cache folder: the fetcher stopped; its text is the error


@dataclass
class Need:
    shard: int
    first_item: int
    last_item: int
    start: int  # the byte range [start, end) of the shard that the items read
    end: int
    first_size: int = -1  # ranged: the size of the sample whose tar header starts the range

    @property
    def bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Decision:
    start: bool  # fetch the shard now
    evict: tuple[int, ...] = ()  # finished shards to delete first, to make room
    past_limit: bool = False  # started beyond cache_limit: the loader needs it now


def fetch_decision(need: Need, *, present: dict, in_flight: dict, needs: dict, consumed: int, lookahead: int,
                   prefetch_shards: int, cache_limit: Optional[int], last_used: dict) -> Decision:
    """The fetch policy, without side effects: whether to start fetching `need` now, and which
    shards to evict first. present: shard -> held byte range; in_flight: shard -> Need being
    fetched; needs: this pass's Need per shard; consumed: the last item the training process took;
    lookahead: items the loader may be building beyond it.
      - at most min(4, prefetch_shards) fetches at once;
      - a shard not needed by the items in reach waits while prefetch_shards such shards are held
        or coming;
      - under cache_limit, finished shards (no item of this pass reads them again) are evicted,
        least recently used first, until the new one fits;
      - a shard the items in reach need is fetched even past the limit (the loader could never
        finish otherwise)."""
    held = present.get(need.shard)
    if held is not None and held[0] <= need.start and held[1] >= need.end:
        return Decision(True)
    if len(in_flight) >= max(1, min(4, prefetch_shards)):
        return Decision(False)
    required = need.first_item <= consumed + lookahead
    ahead = sum(1 for s, n in needs.items() if n.first_item > consumed + lookahead and (s in present or s in in_flight))
    if not required and ahead >= prefetch_shards:
        return Decision(False)
    if cache_limit is None:
        return Decision(True)
    sizes = {s: end - start for s, (start, end) in present.items()}
    total = sum(sizes.values()) + sum(n.bytes for n in in_flight.values())
    finished = sorted((s for s in present if s not in needs or needs[s].last_item <= consumed),
                      key=lambda s: last_used.get(s, -1))
    evict = []
    for shard in finished:
        if total + need.bytes <= cache_limit:
            break
        evict.append(shard)
        total -= sizes[shard]
    if total + need.bytes <= cache_limit:
        return Decision(True, tuple(evict))
    return Decision(required, tuple(evict), past_limit=required)


class ShardCache:
    def __init__(self, urls: list[str], shard_bytes: list[int], sha256: list[str], key: str, remote: Remote,
                 cache_dir: Path, cache_limit: Optional[int], prefetch_shards: int):
        self.urls, self.shard_bytes, self.sha256, self.key = urls, shard_bytes, sha256, key
        self.remote, self.cache_limit, self.prefetch_shards = remote, cache_limit, prefetch_shards
        self.owner = os.getpid()
        self.ranged = all(kind(u) != "pipe" for u in urls)  # pipe: shards can only be fetched whole
        root = Path(cache_dir) / "stream"
        _remove_folders_of_dead_processes(root)
        self.dir = root / f"{socket.gethostname()}-{os.getpid()}-{key.replace('.', '_')}-{id(self):x}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        atexit.register(self.close)
        self.present: dict[int, tuple[int, int]] = {}  # shard -> byte range held locally
        self.last_used: dict[int, int] = {}  # shard -> order of last need (eviction: oldest first)
        self.bytes_fetched = 0  # since creation (benchmarks read it)
        self.peak_bytes = 0  # most bytes held at once
        self._cond = threading.Condition()
        self._count_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._needs: dict[int, Need] = {}
        self._order: list[Need] = []
        self._consumed = -1  # the last item the training process has taken
        self._in_flight: dict[int, Need] = {}
        self._error: Optional[str] = None
        self._stopping = False
        self._warned = False
        self._epoch_counter = 0

    def path(self, shard: int) -> Path:
        return self.dir / f"{shard:06d}.tar"

    # ------------------------------------------------------------ the training process

    def prepare(self, needs: list[Need], in_flight_items: int) -> None:
        """Before the loader's workers start: what this pass reads. Held files that lack a needed
        range are deleted now, so a worker never opens a file that lacks its samples."""
        self.stop()
        self._epoch_counter += 1
        with self._cond:
            self._needs = {n.shard: n for n in needs}
            self._order = sorted(needs, key=lambda n: (n.first_item, n.shard))
            self._consumed, self._lookahead = -1, max(1, in_flight_items)
            self._error, self._stopping = None, False
            (self.dir / FAILED).unlink(missing_ok=True)
            for shard in list(self.present):
                need = self._needs.get(shard)
                if need is not None and not self._holds(shard, need):
                    self._evict(shard)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shard-fetcher", daemon=True)
        self._thread.start()

    def item_done(self, item: int) -> None:
        """The training process has taken `item`: shards only earlier items needed may go."""
        with self._cond:
            self._consumed = max(self._consumed, item)
            self._cond.notify_all()
        if self._error:
            raise LauncherError(self._error)

    def stop(self) -> None:
        """Stop fetching (end of the pass, or the run is stopping); downloads in progress end."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.remote.cancelled.set()
        self._thread.join()
        self.remote.cancelled.clear()
        self._thread = None

    def close(self) -> None:
        if os.getpid() == self.owner:
            self.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    def held_bytes(self) -> int:
        return sum(end - start for start, end in self.present.values())

    def _holds(self, shard: int, need: Need) -> bool:
        held = self.present.get(shard)
        return held is not None and held[0] <= need.start and held[1] >= need.end

    def _evict(self, shard: int) -> None:
        self.path(shard).unlink(missing_ok=True)
        self.present.pop(shard, None)

    def _run(self) -> None:
        """The fetch loop: start the next fetches the rules allow, wait for a change, repeat."""
        pool = ThreadPoolExecutor(max(1, min(4, self.prefetch_shards)), thread_name_prefix="shard-fetch")
        next_up = 0
        try:
            with self._cond:
                while not self._stopping and self._error is None:
                    while next_up < len(self._order) and self._may_start(self._order[next_up]):
                        need = self._order[next_up]
                        next_up += 1
                        if self._holds(need.shard, need):
                            continue
                        self._in_flight[need.shard] = need
                        pool.submit(self._fetch, need)
                    if next_up >= len(self._order) and not self._in_flight:
                        break  # everything this pass needs is here
                    self._cond.wait(timeout=1.0)
        except BaseException as err:  # noqa: BLE001  (a bug here must not leave workers waiting)
            self._fail(f"{self.key}: the shard fetcher stopped: {type(err).__name__}: {err}")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _may_start(self, need: Need) -> bool:
        """Called with the lock held: fetch_decision's answer, its evictions made, its warning said."""
        decision = fetch_decision(need, present=self.present, in_flight=self._in_flight, needs=self._needs,
                                  consumed=self._consumed, lookahead=self._lookahead,
                                  prefetch_shards=self.prefetch_shards, cache_limit=self.cache_limit,
                                  last_used=self.last_used)
        for shard in decision.evict:
            self._evict(shard)
        if decision.past_limit and not self._warned:
            self._warned = True
            print(f"warning: {self.key}: data.cache_limit ({self.cache_limit} bytes) is smaller than the shards the "
                  f"loader is reading at once; fetching past it (raise data.cache_limit or lower "
                  "data.num_workers/data.streams)", file=sys.stderr)
        return decision.start

    def _fetch(self, need: Need) -> None:
        shard, url = need.shard, self.urls[need.shard]
        size = self.shard_bytes[shard]
        whole = need.start == 0 and need.end == size
        try:
            self.remote.fetch(url, self.path(shard), self.key, start=need.start, end=need.end, shard_bytes=size,
                              sha256=self.sha256[shard] if whole else "", on_bytes=self._count)
            if not whole:
                self._check_range(need)
            ok = True
        except LauncherError as err:
            ok = False
            self._fail(str(err))
        except BaseException as err:  # noqa: BLE001  (cancelled, or a bug: never leave a worker waiting)
            ok = False
            if not self.remote.cancelled.is_set():
                self._fail(f"{self.key}: fetching '{url}' failed: {type(err).__name__}: {err}")
        with self._cond:
            self._in_flight.pop(shard, None)
            if ok:
                self.present[shard] = (need.start, need.end)
                self.last_used[shard] = self._epoch_counter * 10**9 + need.last_item
                self.peak_bytes = max(self.peak_bytes, self.held_bytes())
            self._cond.notify_all()

    def _check_range(self, need: Need) -> None:
        """A ranged read is not covered by the shard's SHA-256: check that it starts with the tar
        header of the sample the index puts there."""
        import tarfile

        with open(self.path(need.shard), "rb") as f:
            f.seek(need.start)
            try:
                header = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
                problem = "" if header.size == need.first_size else \
                    f"the member at byte {need.start} has {header.size} bytes, the index says {need.first_size}"
            except tarfile.TarError as err:
                problem = f"no tar header at byte {need.start} ({err})"
        if problem:
            self._evict(need.shard)
            raise LauncherError(
                f"{self.key}: shard '{self.urls[need.shard]}' no longer matches its index: {problem}. It was "
                f"rewritten after it was indexed; write the index again (python -m launcher.shards index "
                f"'{self.urls[need.shard]}'), then relaunch.")

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_fetched += n

    def _fail(self, message: str) -> None:
        with self._cond:
            if self._error is None:
                self._error = message
                try:  # written then renamed: a worker that sees the file reads the whole message
                    tmp = self.dir / f".{FAILED}.tmp{os.getpid()}"
                    tmp.write_text(message)
                    os.replace(tmp, self.dir / FAILED)
                except OSError:
                    pass
            self._cond.notify_all()

    # ------------------------------------------------------------ any process (loader workers)

    def wait_for(self, shard: int) -> Path:
        """The local file of `shard` once it is there (whole, or with the range this pass reads).
        Outside a pass (a tool reading samples directly) the owner fetches it whole, now."""
        path = self.path(shard)
        if os.getpid() == self.owner and self._thread is None and self.present.get(shard) != (0, self.shard_bytes[shard]):
            self.remote.fetch(self.urls[shard], path, f"{self.key}: shard {shard}", shard_bytes=self.shard_bytes[shard],
                              sha256=self.sha256[shard], on_bytes=self._count)
            self.present[shard] = (0, self.shard_bytes[shard])
            return path
        parent, delay = os.getppid(), 0.001
        while not path.exists():
            failed = self.dir / FAILED
            if failed.exists():
                raise LauncherError(failed.read_text() or f"{self.key}: fetching shards failed")
            if os.getpid() != self.owner and os.getppid() != parent:
                raise SystemExit(1)  # the training process is gone
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        return path


def needs_of(items: list[np.ndarray], shard_of: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
             shard_first: np.ndarray, shard_bytes: list[int], ranged: bool = True) -> list[Need]:
    """Per shard that `items` (sample-id arrays, in reading order) read: first and last item, and
    the byte range of those samples (from the tar header before the first to the end of the last;
    the whole file when every sample of the shard is read, or when `ranged` reads are impossible)."""
    if not items:
        return []
    ids = np.concatenate(items)
    item_of = np.repeat(np.arange(len(items)), [len(i) for i in items])
    shard = shard_of[ids]
    n = len(shard_bytes)
    first = np.full(n, np.iinfo(np.int64).max)
    last = np.full(n, -1)
    start = np.full(n, np.iinfo(np.int64).max)
    end = np.zeros(n, dtype=np.int64)
    np.minimum.at(first, shard, item_of)
    np.maximum.at(last, shard, item_of)
    np.minimum.at(start, shard, offsets[ids] - 512)  # the member's tar header (error messages read it)
    np.maximum.at(end, shard, offsets[ids] + sizes[ids])
    needs = []
    # Resampling may read a sample twice: the distinct samples per shard, from a mask over all
    # samples (np.unique sorts or hashes: 0.6 s at 1.28M ids, this is 20 ms).
    read = np.zeros(len(shard_of), dtype=bool)
    read[ids] = True
    distinct = np.bincount(shard_of[read], minlength=n)
    # Per shard, the sample read with the lowest offset (its tar header starts a ranged read): the
    # one whose header is where `start` is (offsets are distinct within a shard).
    lowest = offsets[ids] - 512 == start[shard]
    earliest = np.zeros(n, dtype=np.int64)
    earliest[shard[lowest]] = ids[lowest]
    for s in np.flatnonzero(last >= 0):
        whole = not ranged or distinct[s] >= _samples_in(shard_first, s, len(shard_of))
        lo, hi = (0, shard_bytes[s]) if whole else (int(start[s]), int(end[s]))
        first_size = -1 if whole else int(sizes[earliest[s]])
        needs.append(Need(int(s), int(first[s]), int(last[s]), lo, hi, first_size))
    return needs


def _samples_in(shard_first: np.ndarray, s: int, total: int) -> int:
    return int((shard_first[s + 1] if s + 1 < len(shard_first) else total) - shard_first[s])


def _remove_folders_of_dead_processes(root: Path) -> None:
    """Folders left by processes of this machine that were killed (kill -9 runs no clean-up)."""
    host = socket.gethostname()
    for folder in root.glob(f"{host}-*"):
        try:
            pid = int(folder.name[len(host) + 1:].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
