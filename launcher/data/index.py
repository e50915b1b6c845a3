"""A shard set: its pattern expanded to shards (local, s3://, http(s)://, pipe:) and the
ShardIndex of all their samples, which the streams read from.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from launcher.data.remote import store as remote
from launcher.data.index_files import (
    _KEY_RE,
    IMAGE_EXTS,
    load_shard_indexes,
    remote_shard_indexes,
)
from launcher.errors import LauncherError
from launcher.data.remote.store import FetchOptions
from launcher.data.remote.cache import ShardCache

# ---------------------------------------------------------------- shard lists


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (`data/train-{000000..000009}.tar`, `a.tar::b.tar`), as WebDataset does.

    Without a `$` (WebDataset's WDS_ variables) that is braceexpand on each `::` part, done here:
    importing webdataset imports torch (2.5 s), which `--check` and the shard tools do not need."""
    if "$" in pattern:
        from webdataset.shardlists import expand_urls

        return list(expand_urls(pattern))
    from braceexpand import braceexpand

    return [url for part in pattern.split("::") for url in braceexpand(part)]


def is_local(url: str) -> bool:
    return remote.kind(url) == "local"


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


