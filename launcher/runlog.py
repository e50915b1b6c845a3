"""The run directory: resolved recipe, manifest, metrics.jsonl, final weights.

    runs/<name>/
      recipe.yaml        the resolved recipe (after overrides)
      manifest.json      versions, git commit, host, world size, seed, start time, command
      metrics.jsonl      one JSON object per logged training step and per evaluation (strict
                         JSON: a non-finite value, e.g. a diverged loss, is written as null)
      status.json        running, interrupted, failed (with the error) or finished
      final/model.safetensors   (and final/ema.safetensors with the ema plugin)
      checkpoints/       plugins.checkpoint: step-NNNNNNNN/ folders
      report/            plugins.report / python -m launcher.report
      .lock              held by every process of the run while it runs (RunDirLock)

The functions below name these paths once; everything else asks them. Only the main
process writes. Files are written to a temporary name and renamed, so a crash never
leaves a half-written file under a real name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from launcher.errors import LauncherError


def recipe_file(run_dir: Path) -> Path:
    return Path(run_dir) / "recipe.yaml"


def manifest_file(run_dir: Path) -> Path:
    return Path(run_dir) / "manifest.json"


def metrics_file(run_dir: Path) -> Path:
    return Path(run_dir) / "metrics.jsonl"


def status_file(run_dir: Path) -> Path:
    return Path(run_dir) / "status.json"


def final_weights(run_dir: Path, name: str = "model") -> Path:
    """final/model.safetensors, or final/<name>.safetensors (e.g. "ema")."""
    return Path(run_dir) / "final" / f"{name}.safetensors"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def report_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "report"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name next to `path` to write to; renamed onto `path` when the block ends
    without an error, removed when it fails (a half-written file never takes the real name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks (checkpoint files, shards)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_state_dict(state: dict, path: Path) -> None:
    """A state dict as safetensors (tensors copied to the CPU), written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def save_weights(model, path: Path) -> None:
    """A module's weights as safetensors (shared tensors stored once), written atomically."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: non-finite floats (a diverged loss) become null instead of
    Python's bare NaN/Infinity, which are not JSON."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def shard_info(pattern: Any) -> dict[str, Any]:
    """The info.json that `python -m launcher.shards` wrote next to a local shard pattern
    (num_classes, classes, counts), or {} when there is none."""
    if not isinstance(pattern, str) or pattern.startswith(("pipe:", "http://", "https://", "s3://")):
        return {}
    try:
        info = json.loads((Path(pattern.split("::")[0].split("{")[0]).parent / "info.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _class_names(recipe) -> list[str] | None:
    classes = shard_info(recipe.data.train).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def manifest(recipe, world_size: int, device: str, mixed_precision: str) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("launcher", "torch", "torchvision", "timm", "accelerate", "webdataset", "numpy", "deepspeed"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {
        "recipe": recipe.name,
        "recipe_digest": recipe.digest(),
        "versions": versions,
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device,
        "world_size": world_size,
        "mixed_precision": mixed_precision,
        "seed": recipe.seed,
        # The class names, when the shard writer recorded them (info.json next to the shards).
        "classes": _class_names(recipe),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
    }


def write_status(run_dir: Path, state: str, **facts: Any) -> None:
    """<run dir>/status.json: running, interrupted (stopped by a signal, checkpointed when the
    checkpoint plugin is on; relaunch to continue), failed (with the error) or finished. Job
    scripts (slurm/train.sbatch) decide on requeueing from it."""
    import time

    atomic_write_text(status_file(run_dir), json.dumps({"state": state, "time": time.time(), **facts}) + "\n")


def start_run_dir(run_dir: Path, recipe, info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recipe_file(run_dir), yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    atomic_write_text(manifest_file(run_dir), json.dumps(info, indent=2))


class MetricsLog:
    """Appends rows to metrics.jsonl (main process only; `None` path disables writing).

    A run that starts from a checkpoint keeps the first `keep_rows` rows (those written
    before the checkpoint) and drops the rest, so a resumed run replaces the rows written
    after its checkpoint instead of repeating them; a fresh run starts an empty file.
    """

    def __init__(self, path: Path | None, keep_rows: int = 0):
        self.path = path
        self._file = None
        self.rows = 0
        if path is None:
            return
        kept = []
        if keep_rows > 0 and path.exists():
            for line in path.read_text().splitlines()[:keep_rows]:
                try:
                    json.loads(line)
                except ValueError:
                    break  # a torn line from a crash: drop it and what follows
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self.rows = len(kept)
        self._file = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if self._file is not None:
            self._file.write(strict_json(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_writable_run_dir(run_dir: Path) -> None:
    """A run directory that cannot be written (a read-only mount, a file in its place, a folder
    without write permission) is refused before anything trains, naming it and the fix."""
    target = Path(run_dir)
    if target.exists() and not target.is_dir():
        raise LauncherError(f"run.dir '{run_dir}' is a file, not a folder: set run.dir to a folder for the run.")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == target else f" (its nearest existing folder '{existing}' is not writable)"
        raise LauncherError(f"run.dir '{run_dir}' cannot be written{where}: a read-only file system or no write "
                            "permission. Set run.dir to a writable folder (or copy the run there to resume it).")


class RunDirLock:
    """One run at a time in a run directory, across processes and nodes.

    Every process of a run holds a POSIX lock (fcntl.lockf, which NFS forwards to its lock
    manager) on byte `rank` of <run dir>/.lock. Rank 0 first locks the whole file, which fails
    while any process of another launch still holds its byte (an orphaned rank of a killed
    launch too), then keeps byte 0. The kernel drops the locks of a process that dies, so a
    lock is never stale; the file's text (host, pid, time of rank 0) only names the holder.
    Written by hand: filelock and friends lock a whole file for one process, not one byte per rank.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._file = None

    def acquire_main(self) -> str | None:
        """Rank 0, before the other ranks: None when acquired, else why the run cannot start."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)  # the whole file
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                return self._unsupported(err)
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown process"
            self.release()
            return (f"run directory '{self.path.parent}' is in use by another run ({holder}; a process of "
                    f"that launch still holds {self.path}, `fuser -v {self.path}` lists them on that host). "
                    "Wait for it to end or stop it, or give this run another run.dir.")
        fcntl.lockf(self._file, fcntl.LOCK_UN, 0, 1)  # keep byte 0; the other ranks take theirs
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._file.flush()
        return None

    def acquire_rank(self, rank: int) -> str | None:
        """Ranks > 0, after rank 0 acquired: lock this rank's byte."""
        self._file = open(self.path, "a+")
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, rank)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                return self._unsupported(err)
            self.release()
            return (f"run directory '{self.path.parent}': rank {rank} of another launch still runs in it "
                    f"(`fuser -v {self.path}` lists it). Stop it, then relaunch.")
        return None

    def _unsupported(self, err: OSError) -> str | None:
        import warnings

        warnings.warn(f"run.dir is on a file system without POSIX locks ({err.strerror}): two runs started "
                      "in the same run directory would not be detected.", stacklevel=3)
        self.release()
        return None

    @staticmethod
    def held(run_dir: Path) -> bool:
        """Whether a process (of any launch) holds the run directory's lock now. Asked by processes
        that hold no lock on it themselves (closing the probe would drop theirs: POSIX locks)."""
        path = run_dir / ".lock"
        if not path.exists():
            return False
        with open(path, "a+") as probe:
            try:
                fcntl.lockf(probe, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
            except OSError as err:
                return err.errno in (errno.EACCES, errno.EAGAIN)
            fcntl.lockf(probe, fcntl.LOCK_UN, 0, 0)
        return False

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops this process's locks
            self._file = None
