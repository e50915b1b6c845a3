"""One shard's index: where each sample of a tar shard lives (byte offset, size, image type, label),
read from the tar headers once and kept in an index file next to the shard, in the machine's
cache, or next to a remote shard in its store; every index is checked before use.

Over 500 lines: the index file's format, its checks and the three places an index can come
from (next to the shard, the machine's cache, the store beside a remote shard, one object for a
whole remote set) share one format and one set of checks; split apart, each would repeat them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from launcher.data.remote import store as remote
from launcher.errors import LauncherError
from launcher.data.remote.store import FetchOptions
from launcher.runlog import atomic_write_bytes, file_sha256
from launcher.data.remote.cache import ShardCache

IMAGE_EXTS = ("npy", "png", "jpg", "jpeg", "webp", "ppm", "bmp")
LABEL_EXTS = ("cls", "cls.txt", "label", "target")
# WebDataset's rule: the key is the path up to the first dot of the file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


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

def default_cache_dir() -> Path:
    """Where streamed shards and shard indexes are cached without data.cache_dir:
    $LAUNCHER_CACHE_DIR, else $XDG_CACHE_HOME/launcher/shards, else ~/.cache/launcher/shards."""
    if os.environ.get("LAUNCHER_CACHE_DIR"):
        return Path(os.environ["LAUNCHER_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "launcher" / "shards"


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
    """Every local shard's index: from this machine's one file for the whole set while every shard
    keeps the size and modification time it had when the set was cached, else from its index file,
    else scanned once and cached. While one process of this machine scans, the others wait on a
    lock and then read what it wrote."""
    stats = [path.stat() for path in paths]
    names = [str(path.resolve()) for path in paths]
    # (size, mtime) stand for the object stores' (size, ETag): a shard rewritten since is left out
    listing = {name: (st.st_size, str(st.st_mtime_ns)) for name, st in zip(names, stats)}
    target = _local_set_file(names, cache_dir)
    try:
        from_set = read_set_index(target, names, listing) if target.exists() else {}
    except BadIndex:
        from_set = {}  # a damaged cache entry: rebuilt below
    if len(from_set) == len(names):
        return [from_set[name] for name in names]
    parts = _load_each_shard_index(paths, key, cache_dir)
    try:
        write_set_index(names, parts, [listing[name][1] for name in names], target)
    except OSError:
        pass  # a read-only cache: the per-shard files again next time
    return parts


def _local_set_file(names: list[str], cache_dir: Optional[str]) -> Path:
    """This machine's cached index of a whole local shard set (by the shards' absolute paths): one
    file read instead of one per shard (1,282 ImageNet shards: 2.4 s -> 0.3 s, most of it numpy
    parsing each small file's headers)."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:24]
    return _cache_root(cache_dir) / "index" / f"set-{len(names)}-{digest}.index.npz"


def _load_each_shard_index(paths: list[Path], key: str, cache_dir: Optional[str]) -> list[dict[str, np.ndarray]]:
    """Every shard's own index file (next to it, or in this machine's cache), else a scan."""

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


# ---------------------------------------------------------------- one index for a whole remote set

SET_INDEX_VERSION = 1


def set_index_url(urls: list[str]) -> Optional[str]:
    """Where `launcher.shards index` puts the one index object of a whole remote shard set: in the
    shards' common folder, named by a hash of their names relative to it, so that a run finds the
    object of its own pattern (and only that) in one request. None for pipe: and local shards."""
    if not urls or any(remote.kind(u) not in ("s3", "http") for u in urls):
        return None
    folder = os.path.commonprefix(urls).rsplit("/", 1)[0] + "/"
    if folder.count("/") < 4:  # not below a bucket or a host (the shards share no folder)
        return None
    names = "\n".join(u[len(folder):] for u in urls)
    return f"{folder}shards-{len(urls)}-{hashlib.sha256(names.encode()).hexdigest()[:16]}.index.npz"


def write_set_index(urls: list[str], parts: list[dict[str, np.ndarray]], etags: list[str], target: Path) -> None:
    """One file holding every shard's index and the ETag its object had when it was indexed."""
    write_index_file({
        "set_version": np.asarray(SET_INDEX_VERSION), "names": np.asarray([u.rsplit("/", 1)[1] for u in urls]),
        "etags": np.asarray(etags), "counts": np.asarray([len(p["labels"]) for p in parts], dtype=np.int64),
        "shard_bytes": np.asarray([int(p["shard_bytes"]) for p in parts], dtype=np.int64),
        "sha256": np.asarray([str(p["sha256"]) for p in parts]),
        **{k: np.concatenate([p[k] for p in parts]) for k in ("offsets", "sizes", "ext_codes", "labels")}}, target)


def read_set_index(source, urls: list[str], listing: dict) -> dict[str, dict[str, np.ndarray]]:
    """The shards' indexes from a set index file (a path or bytes), for the shards whose size and
    ETag in the store are still those recorded when they were indexed (the same bytes, so the index
    needs no other check); the others are left out and indexed one by one. BadIndex if the file
    is not a set index of these shards."""
    head = source[:64] if isinstance(source, bytes) else _head_of(source)
    if not head.startswith(b"PK"):
        raise BadIndex("it is not a set index file")
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
        names, counts = [str(n) for n in raw["names"]], raw["counts"].astype(np.int64)
        if int(raw["set_version"]) != SET_INDEX_VERSION or names != [u.rsplit("/", 1)[1] for u in urls] or \
                not (len(counts) == len(raw["etags"]) == len(raw["shard_bytes"]) == len(raw["sha256"]) == len(urls)):
            raise BadIndex("it does not describe these shards")
        ends = np.cumsum(counts)
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as err:
        raise BadIndex(f"it is not a readable set index ({type(err).__name__})") from None
    out = {}
    for i, url in enumerate(urls):
        size, etag = listing[url]
        if etag is None or etag != str(raw["etags"][i]) or size != int(raw["shard_bytes"][i]):
            continue  # changed since the index command ran (or no ETag to tell): indexed on its own
        start = int(ends[i] - counts[i])
        out[url] = _checked_index({"version": np.asarray(INDEX_VERSION), "shard_bytes": raw["shard_bytes"][i],
                                   "sha256": raw["sha256"][i], **{k: raw[k][start:int(ends[i])] for k in
                                                                 ("offsets", "sizes", "ext_codes", "labels")}})
    return out


def remote_shard_indexes(urls: list[str], key: str, cache_dir: Optional[str],
                         options: FetchOptions) -> tuple[list[dict[str, np.ndarray]], ShardCache]:
    """Every remote shard's index, and the cache that will fetch the shards. An index comes from
    this machine's cache (checked against the object's size), else from `<url>.index.npz` in the
    store, else from fetching the shard once and scanning it (one process of the machine does it)."""
    from concurrent.futures import ThreadPoolExecutor

    store = remote.Remote(options)
    listing = store.listing(urls)
    sizes = {url: size for url, (size, _) in listing.items()}
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

    # The set's one index object (the index command writes it), from this machine's cache or in
    # one request: 1,282 shards start in a second instead of 1,282 index files and their checks.
    from_set = from_set_index(urls, listing, store, cache_dir)
    parts = [from_set.get(u) or cached(u) for u in urls]
    if any(p is None for p in parts):
        with _machine_lock(cache_dir):
            # Another process may have indexed some while this one waited for the lock.
            parts = [p if p is not None else cached(u) for p, u in zip(parts, urls)]
            missing = [i for i, p in enumerate(parts) if p is None]
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


def from_set_index(urls: list[str], listing: dict, store: remote.Remote,
                   cache_dir: Optional[str]) -> dict[str, dict[str, np.ndarray]]:
    """The shards' indexes found in their set index: this machine's copy when it still covers every
    shard, else the store's (kept for next time). {} when there is none or it is unusable (then
    every shard is indexed on its own, as without one)."""
    url = set_index_url(urls)
    if url is None:
        return {}
    target = _cached_index_file(url, cache_dir)
    try:
        found = read_set_index(target, urls, listing) if target.exists() else {}
    except BadIndex:
        found = {}
    if len(found) == len(urls):
        return found
    data = store.read_small(url)
    if data is None:
        return found
    try:
        found = read_set_index(data, urls, listing)
    except BadIndex:
        return {}  # a foreign or damaged object under that name: the per-shard index files decide
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    except OSError:
        pass  # a read-only cache: fetched again next time
    return found


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


