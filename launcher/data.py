"""Data: WebDataset tar shards read through a deterministic epoch plan.

Why not WebDataset's own pipeline (split_by_node / split_by_worker / shuffle buffer)?
Its order depends on the number of ranks and workers and on buffer state, so it cannot
resume mid-epoch without replaying, and 1 and 2 processes see different batches. Here the
shards are still plain WebDataset tars (written with webdataset.ShardWriter, opened with
webdataset.gopen, brace patterns expanded by webdataset), but what each step reads is a pure
function of (seed, epoch, step):

  1. The shards are indexed: each sample's byte offset, size and label, read from the tar
     headers once and kept in an index file (see "index files" below), so that start-up
     reads ~1 KB per shard instead of scanning every header. Scanning also validates the
     shards (empty, truncated, corrupt shards and out-of-range labels fail before
     training, naming the file).
  2. Each epoch, the shard order is permuted and the concatenated sample stream is cut
     into `streams` contiguous lanes of near-equal length; each lane is shuffled inside
     windows of `shuffle_window` samples (a shuffle buffer that can be seeked).
  3. Global step s takes the next `global_batch / streams` samples of every lane. Rank r
     owns a contiguous block of lanes, so it reads its own part of the shard stream and
     its share of each global batch. Data-loader worker w builds the steps s = w mod W.
  4. Augmentation draws are seeded per sample from (seed, epoch, sample id), so they do
     not depend on which rank or worker loads the sample.

Consequences: every training sample is used exactly once per epoch across all ranks; a
run can start at any step of any epoch by seeking (no replay); with a fixed `streams`,
any process count that divides it trains on the same global batches. Remote shards
(`s3://`, `http(s)://`, `pipe:`) are indexed from the index files next to them in the
store, then fetched by each rank in the order its lanes read them, a few shards ahead,
into a bounded cache that drops a shard after its last use this epoch (shard_cache.py).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import math
import os
import random
import re
import sys
import tarfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher import remote
from launcher.errors import LauncherError
from launcher.remote import FetchOptions
from launcher.runlog import file_sha256
from launcher.shard_cache import ShardCache, needs_of

IMAGE_EXTS = ("npy", "png", "jpg", "jpeg", "webp", "ppm", "bmp")
LABEL_EXTS = ("cls", "cls.txt", "label", "target")
# WebDataset's rule: the key is the path up to the first dot of the file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# ---------------------------------------------------------------- shard lists


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (`data/train-{000000..000009}.tar`, `a.tar::b.tar`)."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


def is_local(url: str) -> bool:
    return remote.kind(url) == "local"


def default_cache_dir() -> Path:
    """Where streamed shards and shard indexes are cached without data.cache_dir:
    $LAUNCHER_CACHE_DIR, else $XDG_CACHE_HOME/launcher/shards, else ~/.cache/launcher/shards."""
    if os.environ.get("LAUNCHER_CACHE_DIR"):
        return Path(os.environ["LAUNCHER_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "launcher" / "shards"


def fetch_options(data) -> FetchOptions:
    """The recipe's data section -> how remote shards are fetched and cached."""
    return FetchOptions(s3_endpoint=data.s3_endpoint, retries=data.fetch_retries, retry_wait=data.fetch_retry_wait,
                        timeout=data.fetch_timeout, cache_limit=remote.parse_size(data.cache_limit),
                        prefetch_shards=data.prefetch_shards)


# ---------------------------------------------------------------- the index


@dataclass
class ShardIndex:
    """Where every sample of a shard set lives. Sample ids are positions in shard order.

    numpy arrays only (no Python object per sample): 1.28M samples take ~30 MB, and loader
    workers (forked) share the pages instead of copying them. Remote shards (s3://, http(s)://,
    pipe:) are read from `cache`, which fetches them as the epoch plan reads them."""

    paths: list[Path]  # local files; for remote shards, where the cache puts them
    shard_sizes: np.ndarray  # samples per shard
    shard_of: np.ndarray  # sample id -> shard number
    offsets: np.ndarray  # sample id -> byte offset of its image member
    sizes: np.ndarray  # sample id -> byte size of its image member
    ext_codes: np.ndarray  # sample id -> position of its image extension in IMAGE_EXTS
    labels: np.ndarray  # sample id -> class label
    urls: list[str] = field(default_factory=list)  # the shards as the pattern names them
    cache: Optional[ShardCache] = None  # remote shards only

    def __len__(self) -> int:
        return len(self.labels)

    def image_exts(self) -> set[str]:
        return {IMAGE_EXTS[int(c)] for c in np.unique(self.ext_codes)}

    def shard_name(self, shard: int) -> str:
        return self.urls[shard] if self.urls else str(self.paths[shard])

    def describe_bad_sample(self, sample_id: int, err: BaseException) -> str:
        """An error message naming the shard and the sample's key (read from its tar header)."""
        shard, member = int(self.shard_of[sample_id]), "?"
        try:
            with open(self.paths[shard], "rb") as f:
                f.seek(int(self.offsets[sample_id]) - 512)
                member = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape").name
        except (OSError, tarfile.TarError, ValueError):
            pass
        match = _KEY_RE.match(member)
        key = match.group(1) if match else member
        return (f"shard '{self.shard_name(shard)}', sample '{key}' (member '{member}' at byte "
                f"{int(self.offsets[sample_id])}) cannot be read: "
                f"{type(err).__name__}: {str(err)[:300]}. The shard changed or is damaged since the run "
                "started; rewrite or re-download it, then relaunch (the run resumes from its last checkpoint).")

    def read_image(self, sample_id: int, files: dict[int, Any]) -> tuple[bytes, str]:
        shard = int(self.shard_of[sample_id])
        handle = files.get(shard)
        if handle is None:
            path = self.paths[shard] if self.cache is None else self.cache.wait_for(shard)
            handle = files[shard] = open(path, "rb")
        handle.seek(int(self.offsets[sample_id]))
        return handle.read(int(self.sizes[sample_id])), IMAGE_EXTS[int(self.ext_codes[sample_id])]

    def shard_starts(self) -> np.ndarray:
        """The first sample id of each shard."""
        return np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)


def index_shards(pattern: str, key: str, cache_dir: Optional[str] = None,
                 num_classes: Optional[int] = None, fetch: Optional[FetchOptions] = None) -> ShardIndex:
    """Index every shard of a pattern; any unusable shard is an error naming it. Each shard's
    index is read from its saved index file (see "index files") when there is one. Remote shards
    are not fetched here (only their index files): the returned index's cache fetches them."""
    urls = [u[len("file://"):] if u.startswith("file://") else u for u in expand_pattern(pattern)]
    remote_urls = [u for u in urls if not is_local(u)]
    cache = None
    if remote_urls:
        if len(remote_urls) != len(urls):
            raise LauncherError(f"{key}: the pattern '{pattern}' mixes local and remote shards; use one kind "
                                "per data set (upload the local ones, or fetch the remote ones).")
        parts, cache = remote_shard_indexes(urls, key, cache_dir, fetch or FetchOptions())
        paths = [cache.path(i) for i in range(len(urls))]
    else:
        paths = [Path(u) for u in urls]
        for url, path in zip(urls, paths):
            if not path.is_file():
                hint = ""
                if "digits" in str(path):
                    hint = " Write the digits shards first: python -m launcher.shards digits --out data/digits."
                raise LauncherError(
                    f"{key}: shard '{url}' does not exist (pattern '{pattern}'). Check the path and the "
                    f"brace range, or write the shards with `python -m launcher.shards`.{hint}"
                )
        parts = load_shard_indexes(paths, key, cache_dir)
    labels = np.concatenate([p["labels"] for p in parts]).astype(np.int64)
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.max() if labels.max() >= num_classes else labels.min())
        raise LauncherError(
            f"{key}: the shards hold label {bad}, outside 0..{num_classes - 1}; set model.num_classes to the "
            "number of classes in the data."
        )
    shard_sizes = np.asarray([len(p["labels"]) for p in parts], dtype=np.int64)
    return ShardIndex(
        paths=paths,
        shard_sizes=shard_sizes,
        shard_of=np.repeat(np.arange(len(paths), dtype=np.int32), shard_sizes),
        offsets=np.concatenate([p["offsets"] for p in parts]),
        sizes=np.concatenate([p["sizes"] for p in parts]),
        ext_codes=np.concatenate([p["ext_codes"] for p in parts]),
        labels=labels,
        urls=urls,
        cache=cache,
    )


# ---------------------------------------------------------------- index files
#
# Scanning a tar's headers costs ~150 us a sample in Python: 3 minutes for ImageNet's 1.28M, in
# every process. So each shard's index is kept in a small file, written once:
#   <shard>.index.npz   next to the shard: by `python -m launcher.shards` when it writes shards,
#                       or `python -m launcher.shards index PATTERN` for shards of other tools;
#   <cache>/index/...   otherwise, built on first use (one process per machine builds, the
#                       others wait for it and read).
# An index file is used only if it still describes its shard: the same byte size, and the tar
# headers in front of its first and last samples still name members of the recorded sizes. An
# index next to its shard that does not is an error (the shard was rewritten, the index was not);
# a cached one is rebuilt. Remote shards (s3://, http(s)://) have theirs next to them in the store
# (`<url>.index.npz`), checked against the object's size; they are cached by URL, and built on
# first use by fetching the shard once when the store has none.
# Written by hand: WebDataset keeps no index, and MosaicML Streaming / litdata need their own
# shard formats.

INDEX_VERSION = 1
INDEX_KEYS = ("version", "shard_bytes", "sha256", "offsets", "sizes", "ext_codes", "labels")


def index_file_next_to(path: Path) -> Path:
    return path.with_name(path.name + ".index.npz")


def _cache_root(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _cached_index_file(path: Path | str, cache_dir: Optional[str]) -> Path:
    """A local shard's cached index (by its absolute path), or a remote one's (by its URL)."""
    name = str(path.resolve()) if isinstance(path, Path) else path
    return _cache_root(cache_dir) / "index" / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".index.npz")


def scan_shard(path: Path, key: str, checksum: bool = False) -> dict[str, np.ndarray]:
    """One shard's index from its tar headers (validating it), optionally with its SHA-256."""
    samples = _scan_tar(path, key)
    if not samples:
        raise LauncherError(f"{key}: shard '{path}' holds no samples (an empty tar). Remove it or rewrite it.")
    offsets, sizes, exts, labels = zip(*samples)
    digest = file_sha256(path) if checksum else ""
    return {"version": np.asarray(INDEX_VERSION), "shard_bytes": np.asarray(path.stat().st_size),
            "sha256": np.asarray(digest), "offsets": np.asarray(offsets, dtype=np.int64),
            "sizes": np.asarray(sizes, dtype=np.int64),
            "ext_codes": np.asarray([IMAGE_EXTS.index(e) for e in exts], dtype=np.uint8),
            "labels": np.asarray(labels, dtype=np.int32)}


def write_index_file(index: dict[str, np.ndarray], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **index)
        os.replace(tmp, target)  # never half-written under the real name
    finally:
        tmp.unlink(missing_ok=True)


class BadIndex(ValueError):
    """The file is not a usable shard index (damaged, foreign, or inconsistent in itself)."""


def _parse_index(source) -> dict[str, np.ndarray]:
    """An index file's arrays (a path or bytes), every field checked for shape, type and
    consistency (a store may serve anything under the name): BadIndex says what is wrong."""
    head = source[:64] if isinstance(source, bytes) else _head_of(source)
    if not head.startswith(b"PK"):  # np.savez writes a zip; np.load would call anything else a pickle
        looks = "a web page (HTML)" if head.lstrip()[:1] == b"<" else "empty" if not head else f"starting {head[:16]!r}"
        raise BadIndex(f"it is not a shard index file: it is {looks}")
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as npz:
            index = {k: npz[k] for k in npz.files}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise BadIndex(f"it is not a readable shard index ({type(err).__name__}: {str(err)[:100]})") from None
    return _checked_index(index)


def _head_of(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(64)


def _checked_index(index: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [k for k in INDEX_KEYS if k not in index]
    if missing:
        raise BadIndex(f"it lacks {', '.join(missing)} (not a version-{INDEX_VERSION} shard index)")

    def scalar(name: str, kind: str) -> np.ndarray:
        value = index[name]
        if value.shape != () or value.dtype.kind not in kind:
            raise BadIndex(f"its '{name}' is not a single {'number' if 'i' in kind else 'text'} (shape {value.shape}, "
                           f"{value.dtype})")
        return value

    if int(scalar("version", "iu")) != INDEX_VERSION:
        raise BadIndex(f"it is version {int(index['version'])}, this launcher reads version {INDEX_VERSION}")
    shard_bytes = int(scalar("shard_bytes", "iu"))
    sha = str(scalar("sha256", "U"))
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise BadIndex("its 'sha256' is not a SHA-256 digest")
    n = None
    for name in ("offsets", "sizes", "ext_codes", "labels"):
        value = index[name]
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise BadIndex(f"its '{name}' is not a list of whole numbers (shape {value.shape}, {value.dtype})")
        if n is not None and len(value) != n:
            raise BadIndex(f"its '{name}' has {len(value)} entries, 'offsets' has {n}")
        n = len(value)
    if n == 0:
        raise BadIndex("it lists no samples")
    offsets, sizes = index["offsets"].astype(np.int64), index["sizes"].astype(np.int64)
    if offsets[0] < 512 or (sizes < 0).any() or (offsets + sizes > shard_bytes).any() or (np.diff(offsets) <= 0).any():
        raise BadIndex(f"its offsets and sizes do not describe members of a {shard_bytes}-byte tar file in order")
    if (index["ext_codes"] >= len(IMAGE_EXTS)).any() or (index["ext_codes"] < 0).any():
        raise BadIndex("its 'ext_codes' name no known image type")
    if (np.abs(index["labels"].astype(np.int64)) >= 2**31).any():
        raise BadIndex("its 'labels' hold numbers too large to be classes")
    return {"version": np.asarray(INDEX_VERSION), "shard_bytes": np.asarray(shard_bytes), "sha256": np.asarray(sha),
            "offsets": offsets, "sizes": sizes, "ext_codes": index["ext_codes"].astype(np.uint8),
            "labels": index["labels"].astype(np.int32)}


def _member_name(block: bytes, read: Callable[[int, int], bytes], pos: int) -> tuple[Optional[str], int]:
    """(the name of the member whose header is `block` at `pos`, where the next header starts);
    name None for extended headers (pax, GNU long names), which carry the next member's name."""
    header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    following = pos + 512 + -(-header.size // 512) * 512
    if header.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
        return None, following
    return header.name, following


def index_coverage_problem(index: dict[str, np.ndarray], read: Callable[[int, int], bytes]) -> str:
    """'' if the index covers its whole shard, else what it leaves out. Only the members before
    its first sample and after its last one are read (`read(start, length)` of the shard): they
    must belong to that first or last sample, and the end-of-archive marker must follow. An index
    that lists the first 10 samples of 400 (true size and SHA-256 kept) fails here."""
    offsets, sizes = index["offsets"], index["sizes"]

    def key(name: str) -> str:
        match = _KEY_RE.match(name)
        return match.group(1) if match else name

    try:
        first = key(tarfile.TarInfo.frombuf(read(int(offsets[0]) - 512, 512), "utf-8", "surrogateescape").name)
        last = key(tarfile.TarInfo.frombuf(read(int(offsets[-1]) - 512, 512), "utf-8", "surrogateescape").name)
        pos = 0
        while pos < int(offsets[0]) - 512:
            name, pos = _member_name(read(pos, 512), read, pos)
            if name is not None and key(name) != first:
                return f"the shard has member '{name}' before the index's first sample '{first}'"
        pos = int(offsets[-1]) + -(-int(sizes[-1]) // 512) * 512
        for _ in range(256):  # the last sample's other files (its label...), then the end marker
            block = read(pos, 512)
            if block == bytes(len(block)):
                return ""
            name, pos = _member_name(block, read, pos)
            if name is not None and key(name) != last:
                return (f"the shard has more samples after the index's last one (member '{name}' at byte "
                        f"{pos}); the index lists {len(offsets)}")
        return ""
    except (tarfile.TarError, ValueError, OSError) as err:
        return f"the shard's tar headers around the indexed samples cannot be read ({err})"


def _block_reader(fetch: Callable[[int, int], bytes], size: int, block: int = 1 << 16) -> Callable[[int, int], bytes]:
    """read(start, length) over fetch(start, end) of a remote object, in 64 KiB blocks kept for
    reuse: checking an index's coverage takes two or three ranged requests, not one per header."""
    blocks: dict[int, bytes] = {}

    def read(start: int, length: int) -> bytes:
        out = b""
        while length > 0 and start < size:
            b = start // block
            if b not in blocks:
                blocks[b] = fetch(b * block, min((b + 1) * block, size))
            chunk = blocks[b][start - b * block:start - b * block + length]
            if not chunk:
                break
            out, start, length = out + chunk, start + len(chunk), length - len(chunk)
        return out

    return read


def _read_index_file(target: Path, path: Path) -> tuple[Optional[dict[str, np.ndarray]], str]:
    """(the index in `target`, "") if it describes the shard at `path`; (None, why not) if it
    does not; (None, "") if there is no such file. BadIndex if it is no index at all."""
    if not target.exists():
        return None, ""
    index = _parse_index(target)
    try:
        if int(index["shard_bytes"]) != path.stat().st_size:
            return None, f"it records {int(index['shard_bytes'])} bytes, the shard has {path.stat().st_size}"
        with open(path, "rb") as f:
            def read(start: int, length: int) -> bytes:
                f.seek(start)
                return f.read(length)

            for i in {0, len(index["offsets"]) - 1}:
                header = tarfile.TarInfo.frombuf(read(int(index["offsets"][i]) - 512, 512), "utf-8",
                                                 "surrogateescape")
                if header.size != int(index["sizes"][i]):
                    return None, f"its sample {i} is not where the shard has it"
            problem = index_coverage_problem(index, read)
        return (None, problem) if problem else (index, "")
    except (OSError, ValueError, IndexError, tarfile.TarError) as err:
        return None, f"it cannot be used ({err})"


def _mismatch(key: str, shard: str, index_file: str, why: str, pattern_hint: str) -> LauncherError:
    return LauncherError(
        f"{key}: the index '{index_file}' does not match its shard '{shard}': {why}. The shard was rewritten "
        f"after it was indexed, or the index is wrong; write the index again with `python -m launcher.shards index "
        f"'{pattern_hint}'` (or delete the index file to have the launcher index the shard on first use).")


def _unusable(key: str, shard: str, index_file: str, why: str, pattern_hint: str) -> LauncherError:
    return LauncherError(
        f"{key}: the index '{index_file}' of shard '{shard}' cannot be used: {why}. Write it again with "
        f"`python -m launcher.shards index '{pattern_hint}'` (or delete it to have the launcher index the shard on "
        "first use).")


@contextlib.contextmanager
def _machine_lock(cache_dir: Optional[str]):
    """One lock for the machine's index cache (not per shard: processes that started at different
    moments see different shards missing, and must still wait for each other). Yields False when
    the cache is not writable (then every process indexes for itself)."""
    import fcntl

    lock_file = _cache_root(cache_dir) / "index" / "scanning.lock"
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_file, "a+")
    except OSError:
        yield False
        return
    with lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # another process of this machine may be indexing them
        try:
            yield True
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


def _write_cached(index: dict, target: Path) -> None:
    try:
        write_index_file(index, target)
    except OSError:
        pass  # a read-only cache: index again next time


def load_shard_indexes(paths: list[Path], key: str, cache_dir: Optional[str]) -> list[dict[str, np.ndarray]]:
    """Every local shard's index: from its index file, else scanned once and cached. While one
    process of this machine scans, the others wait on a lock and then read what it wrote."""

    def saved(path: Path) -> Optional[dict[str, np.ndarray]]:
        next_to = index_file_next_to(path)
        try:
            index, problem = _read_index_file(next_to, path)
        except BadIndex as err:
            raise _unusable(key, str(path), str(next_to), str(err), str(path)) from None
        if problem:
            raise _mismatch(key, str(path), str(next_to), problem, str(path))
        if index is not None:
            return index
        try:
            return _read_index_file(_cached_index_file(path, cache_dir), path)[0]
        except BadIndex:
            return None  # a damaged cache entry: index the shard again

    parts = [saved(p) for p in paths]
    missing = [i for i, part in enumerate(parts) if part is None]
    if missing:
        with _machine_lock(cache_dir) as locked:
            for i in missing:
                parts[i] = saved(paths[i]) if locked else None
                if parts[i] is None:
                    parts[i] = scan_shard(paths[i], key)
                    if locked:
                        _write_cached(parts[i], _cached_index_file(paths[i], cache_dir))
    return parts


def remote_shard_indexes(urls: list[str], key: str, cache_dir: Optional[str],
                         options: FetchOptions) -> tuple[list[dict[str, np.ndarray]], ShardCache]:
    """Every remote shard's index, and the cache that will fetch the shards. An index comes from
    this machine's cache (checked against the object's size), else from `<url>.index.npz` in the
    store, else from fetching the shard once and scanning it (one process of the machine does it)."""
    from concurrent.futures import ThreadPoolExecutor

    store = remote.Remote(options)
    sizes = store.sizes(urls)
    absent = [u for u in urls if sizes[u] is None]
    if absent:
        raise LauncherError(
            f"{key}: shard '{absent[0]}' does not exist{' (' + str(len(absent)) + ' of ' + str(len(urls)) + ' are missing)' if len(absent) > 1 else ''}"
            f"{' at ' + store.endpoint() if remote.kind(absent[0]) == 's3' else ''}. Check the URL, the brace range "
            "and the endpoint (data.s3_endpoint or AWS_ENDPOINT_URL).")

    def cached(url: str) -> Optional[dict[str, np.ndarray]]:
        target = _cached_index_file(url, cache_dir)
        try:
            index = _parse_index(target) if target.exists() else None
        except BadIndex:
            return None
        if index is not None and sizes[url] not in (remote.UNKNOWN_SIZE, int(index["shard_bytes"])):
            return None  # the object changed: index it again
        return index

    def from_store(url: str) -> Optional[dict[str, np.ndarray]]:
        index_url = remote.remote_url_of_index(url)
        data = store.read_small(index_url) if index_url else None
        if data is None:
            return None
        try:
            index = _parse_index(data)
        except BadIndex as err:
            raise _unusable(key, url, index_url, str(err), url) from None
        # A server that sends no Content-Length leaves the size unknown: the fetch checks it (and the SHA-256).
        if sizes[url] != remote.UNKNOWN_SIZE and int(index["shard_bytes"]) != sizes[url]:
            raise _mismatch(key, url, index_url, f"it records {int(index['shard_bytes'])} bytes, the shard has "
                                                  f"{sizes[url]}", url)
        problem = index_coverage_problem(index, _block_reader(lambda start, end: store.read_range(url, start, end),
                                                              int(index["shard_bytes"])))
        if problem:
            raise _mismatch(key, url, index_url, problem, url)
        return index

    parts = [cached(u) for u in urls]
    if any(p is None for p in parts):
        with _machine_lock(cache_dir):
            missing = [i for i, u in enumerate(urls) if cached(u) is None]
            for i in set(range(len(urls))) - set(missing):
                parts[i] = cached(urls[i])
            with ThreadPoolExecutor(16) as pool:
                found = list(pool.map(from_store, [urls[i] for i in missing]))
            unindexed = [i for i, index in zip(missing, found) if index is None]
            for i, index in zip(missing, found):
                if index is not None:
                    parts[i] = index
                    _write_cached(index, _cached_index_file(urls[i], cache_dir))
            if unindexed:
                print(f"{key}: {len(unindexed)} remote shard(s) have no index file; fetching each once to index it "
                      f"(first use on this machine). `python -m launcher.shards index PATTERN` writes them next "
                      f"to the shards.", file=sys.stderr)
            for i in unindexed:
                parts[i] = _fetch_and_scan(store, urls[i], sizes[urls[i]], key, cache_dir)
                _write_cached(parts[i], _cached_index_file(urls[i], cache_dir))
    cache = ShardCache(urls, [int(p["shard_bytes"]) for p in parts], [str(p["sha256"]) for p in parts], key,
                       store, _cache_root(cache_dir), options.cache_limit, options.prefetch_shards)
    return parts, cache


def _fetch_and_scan(store: remote.Remote, url: str, size: int, key: str, cache_dir: Optional[str]) -> dict:
    tmp = _cache_root(cache_dir) / "index" / f".scan-{os.getpid()}.tar"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        store.fetch(url, tmp, key, shard_bytes=None if size == remote.UNKNOWN_SIZE else size)
        return scan_shard(tmp, key, checksum=True)
    except LauncherError as err:
        raise LauncherError(str(err).replace(str(tmp), url)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _scan_tar(path: Path, key: str) -> list[tuple[int, int, str, int]]:
    """(image offset, image size, image ext, label) for each sample, from the tar headers."""
    file_size = path.stat().st_size
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_RE.match(member.name)
                if not match:
                    continue
                sample_key, ext = match.group(1), match.group(2).lower()
                if member.offset_data + member.size > file_size:
                    raise LauncherError(
                        f"{key}: shard '{path}' is truncated (member '{member.name}' ends past the end of the "
                        "file). Rewrite or re-download it."
                    )
                if sample_key not in groups:
                    groups[sample_key] = {}
                    order.append(sample_key)
                if ext in groups[sample_key]:
                    # WebDataset groups members by key: a repeated key would silently replace a sample.
                    raise LauncherError(f"{key}: shard '{path}' holds sample key '{sample_key}' twice (member "
                                        f"'{member.name}'); every sample needs its own key. Rewrite the shard.")
                groups[sample_key][ext] = member
            # A tar cut exactly between two members still parses; the end-of-archive marker
            # (two zero blocks, written by every tar writer) is what proves it complete.
            with open(path, "rb") as raw:
                raw.seek(tar.offset)
                if raw.read(1024) != bytes(1024):
                    raise LauncherError(
                        f"{key}: shard '{path}' is truncated (no end-of-archive marker after its last "
                        "member). Rewrite or re-download it."
                    )
            label_data = {}
            for sample_key in order:
                members = groups[sample_key]
                label_ext = next((e for e in LABEL_EXTS if e in members), None)
                if label_ext is not None:
                    label_data[sample_key] = tar.extractfile(members[label_ext]).read()
    except tarfile.TarError as err:
        what = "is truncated" if "truncated" in str(err) or "end of" in str(err) else "is not a readable tar file"
        raise LauncherError(f"{key}: shard '{path}' {what} ({err}). Rewrite or re-download it.") from None
    samples = []
    for sample_key in order:
        members = groups[sample_key]
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None or sample_key not in label_data:
            raise LauncherError(
                f"{key}: sample '{sample_key}' in shard '{path}' has files {sorted(members)}; each sample needs an "
                f"image ({'/'.join(IMAGE_EXTS)}) and a label ({'/'.join(LABEL_EXTS)})."
            )
        try:
            label = int(label_data[sample_key].decode().strip())
            if not -2**31 <= label < 2**31:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise LauncherError(
                f"{key}: sample '{sample_key}' in shard '{path}' has a label that is not a class number: "
                f"{label_data[sample_key][:20]!r}."
            ) from None
        member = members[image_ext]
        samples.append((member.offset_data, member.size, image_ext, label))
    return samples


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
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.streams % self.world_size or self.global_batch % self.streams:
            raise LauncherError(
                f"data.streams={self.streams} must be a multiple of the number of processes ({self.world_size}) "
                f"and divide the global batch ({self.global_batch} = data.batch_size x processes)."
            )
        # Lane lengths (near-equal cuts of the stream) and the step count do not depend on the
        # epoch: computed once here, not on every step in every loader worker.
        n, L = self.num_samples, self.streams
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

    def split(self, parts: int) -> list["Batch"]:
        """At most `parts` non-empty micro-batches, in order (a short last batch gives fewer)."""
        from dataclasses import replace

        n = len(self.targets)
        chunks = [c for c in torch.arange(n).tensor_split(min(parts, n)) if len(c)]
        return [replace(self, images=self.images[c[0]:c[-1] + 1], targets=self.targets[c[0]:c[-1] + 1],
                        ids=self.ids[c[0]:c[-1] + 1]) for c in chunks]

    def to(self, device, memory_format=torch.contiguous_format) -> "Batch":
        self.images = self.images.to(device, non_blocking=True, memory_format=memory_format)
        self.targets = self.targets.to(device, non_blocking=True)
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


class _ShardReader(IterableDataset):
    """Shared by the training and evaluation streams: load, decode, seed, transform."""

    def __init__(self, index: ShardIndex, transform: Callable, seed: int, epoch: int):
        self.index, self.transform, self.seed, self.epoch = index, transform, seed, epoch

    def _load(self, ids: np.ndarray, files: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """ids may be resampling copies (id + k * N): read sample id % N, seed with the copy's id."""
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
            seed_for_sample(self.seed, self.epoch, int(sample_id))
            images.append(self.transform(image))
        return torch.stack(images), torch.from_numpy(self.index.labels[ids % len(self.index)])

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
            images, targets = self._load(ids, files)
            yield {"images": images, "targets": targets, "ids": torch.from_numpy(ids % len(self.index)),
                   "global_count": self.plan.global_count(self.epoch, step), "step_in_epoch": step}


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
            images, targets = self._load(ids, files)
            yield {"images": images, "targets": targets, "ids": torch.from_numpy(ids),
                   "global_count": len(ids), "step_in_epoch": 0}


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
        iterator = loader = iter(DataLoader(stream, batch_size=None, num_workers=num_workers,
                                            pin_memory=pin_memory, prefetch_factor=2, worker_init_fn=_prepare_worker))
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


def _same_transform(a, b) -> bool:
    same = getattr(a, "same_settings", None)
    return a is b or (same is not None and same(b))


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
              finish: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Batch]:
    """The batches on the device, in `memory_format`, finished (ImageTransform.finish normalises
    uint8 batches there). On CUDA the next batch is copied from pinned memory and finished on a side
    stream while the current step runs (timm's PrefetchLoader does the same); elsewhere each batch
    is moved when it is taken. One batch ahead: what a step reads does not change."""
    if device.type != "cuda":
        for batch in stream_batches:
            batch.to(device, memory_format)
            batch.images = finish(batch.images)
            yield batch
        return
    side = _side_stream(device)
    pending = None
    for batch in stream_batches:
        with torch.cuda.stream(side):
            batch.to(device, memory_format)
            batch.images = finish(batch.images)
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
