"""Rank-failure watchdog: when one rank dies or raises, every other rank stops within
`distributed.failure_timeout` seconds (default 60) instead of hanging in a collective,
and each says which rank failed first. Relaunching the same command then resumes from
the last checkpoint.

Written by hand because nothing below us does this: torch elastic (`accelerate launch`)
stops the other workers of the *same* launcher when one exits, but not those started by
the launchers of other machines; they wait in their next collective until the process
group's timeout (30 minutes by default) and then report a timeout that names no rank.

How: each rank runs a daemon thread that talks to the rendezvous store torchrun already
runs at MASTER_ADDR:MASTER_PORT (hosted by machine 0's launcher, not by a worker, so it
outlives a dead worker):
- every `interval` seconds the thread increments the counter `beat/<rank>`;
- a rank whose training raises records `failed = "<rank>\\t<error>"` before the exception
  propagates; compare-and-set, so the first failure wins;
- each thread watches the `failed` key and the heartbeat of the next rank in a ring
  (O(world) store traffic, however many ranks): a recorded failure, or a neighbour whose
  counter has not moved for timeout/2 seconds (killed, machine lost), or a store that has
  been unreachable for timeout/2 seconds (machine 0's launcher is gone), ends this process
  with os._exit: its main thread may be blocked inside a collective, in C++.
- a rank that finishes (or checkpoints and exits on a signal) records `done/<rank>`, so its
  silence afterwards is not taken for a failure.
A rank whose collective fails *because* a peer died (gloo notices a closed connection at
once) does not claim to be the first failure: it waits for the watchdog's verdict.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

EXIT_PEER_FAILED = 1


def _is_communication_error(exc: BaseException) -> bool:
    """An error raised in this rank because the collective's other side went away."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out"))


class RankWatchdog:
    def __init__(self, rank: int, world_size: int, timeout: float, store=None, namespace: str = "",
                 exit=os._exit):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.exit = exit  # tests pass a recorder instead of ending the process
        self.interval = max(0.05, min(1.0, timeout / 20))
        self.stale_after = timeout / 2
        self.store = store
        self.prefix = f"launcher-watchdog/{namespace}/"
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.verdict: Optional[str] = None
        # Called with the verdict just before the watchdog ends the process (the loop records it
        # in status.json: the main thread may be stuck in a collective and never get to).
        self.on_abort: Optional[Callable[[str], None]] = None

    @classmethod
    def start_for(cls, world_size: int, rank: int, timeout: float) -> Optional["RankWatchdog"]:
        """A running watchdog for this rank, or None on one process / without torchrun's store."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size < 2 or not host or not port:
            return None
        import torch.distributed as dist

        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=max(5.0, timeout / 4)),
                              wait_for_workers=False)
        namespace = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        watchdog = cls(rank, world_size, timeout, store, namespace)
        watchdog.start()
        return watchdog

    def start(self) -> None:
        self._op(lambda s: s.add(self._key(f"beat/{self.rank}"), 1))
        self.thread = threading.Thread(target=self._run, name="rank-watchdog", daemon=True)
        self.thread.start()

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _op(self, fn):
        with self.lock:
            return fn(self.store)

    # ------------------------------------------------------------ the main thread's side

    def finished(self) -> None:
        """This rank ends normally (or checkpointed on a signal): its silence is not a failure."""
        try:
            self._op(lambda s: s.set(self._key(f"done/{self.rank}"), "1"))
        except Exception:
            pass
        self.stopped.set()

    def report_failure(self, exc: BaseException) -> None:
        """Called with this rank's exception before it propagates."""
        if _is_communication_error(exc):
            # A peer probably died first: let the watchdog name it (it ends the process).
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and self.thread is not None and self.thread.is_alive():
                time.sleep(self.interval)
        self.stopped.set()
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        try:
            first = self._op(lambda s: s.compare_set(self._key("failed"), "", f"{self.rank}\t{message}"))
            first_rank, _, first_error = first.decode().partition("\t")
            if int(first_rank) != self.rank:
                self.verdict = f"rank {first_rank} failed first: {first_error}"
                self._say(f"rank {first_rank} failed first ({first_error}); this rank then failed with {message}")
                return
        except Exception:
            pass
        self._say(f"rank {self.rank} failed: {message}; the other ranks stop within "
                  f"{self.timeout:.0f} s (distributed.failure_timeout)")

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        neighbour = (self.rank + 1) % self.world_size
        last_count, last_change = -1, time.monotonic()
        unreachable_since: Optional[float] = None
        while not self.stopped.wait(self.interval):
            try:
                self._op(lambda s: s.add(self._key(f"beat/{self.rank}"), 1))
                failed = self._op(lambda s: s.check([self._key("failed")]) and s.get(self._key("failed")))
                neighbour_done = self._op(lambda s: s.check([self._key(f"done/{neighbour}")]))
                count = self._op(lambda s: s.add(self._key(f"beat/{neighbour}"), 0))
                unreachable_since = None
            except Exception as err:  # the store's host went away
                if self.stopped.is_set():
                    return
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > self.stale_after:
                    self._abort(f"lost contact with the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                                f"{os.environ.get('MASTER_PORT')} for {self.stale_after:.0f} s ({err}): the launcher "
                                "of machine 0 is gone, so a rank there failed first")
                    return
                continue
            if self.stopped.is_set():
                return
            if failed:
                first_rank, _, error = failed.decode().partition("\t")
                self._abort(f"rank {first_rank} failed first: {error}")
                return
            if neighbour_done:
                continue
            now = time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change > self.stale_after:
                reason = (f"no heartbeat for {self.stale_after:.0f} s (killed, out of memory, or its machine "
                          "was lost)")
                try:
                    self._op(lambda s: s.compare_set(self._key("failed"), "", f"{neighbour}\t{reason}"))
                    failed = self._op(lambda s: s.get(self._key("failed")))
                    first_rank, _, error = failed.decode().partition("\t")
                except Exception:
                    first_rank, error = str(neighbour), reason
                self._abort(f"rank {first_rank} failed first: {error}")
                return

    def _abort(self, why: str) -> None:
        self.verdict = why
        self._say(f"{why}. Stopping rank {self.rank} instead of waiting in a collective; relaunch the same "
                  "command to resume from the last checkpoint.")
        self.stopped.set()
        if self.on_abort is not None:
            try:
                self.on_abort(why)
            except Exception:
                pass  # stopping matters more
        self.exit(EXIT_PEER_FAILED)

    def _say(self, text: str) -> None:
        print(f"\n[launcher] error on rank {self.rank}: {text}", file=sys.stderr, flush=True)
