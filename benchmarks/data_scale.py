"""Start-up time against data-set size: time to the first training batch, per process.

    python benchmarks/data_scale.py                         # 10k, 100k and 1.28M samples
    python benchmarks/data_scale.py --sizes 10000 100000 --out benchmarks/results/data_scale.md

For each size, shards of tiny samples (8x8 uint8 .npy + .cls, 1,000 per shard, ImageNet-1k has
1.28M samples) are written with the standard library, and a fresh process measures the time to
its first training batch (2 loader workers) in three states:

  scan      no index anywhere: every tar header is read (what every rank paid before index files)
  cached    the index this machine cached on that first use (data.cache_dir)
  sidecar   index files next to the shards (`python -m launcher.shards index`, or written by
            `python -m launcher.shards` itself), in an empty cache

and, side by side, plain WebDataset's time to its first batch on the same shards. Times exclude
the Python and torch imports (the same for all). Peak RSS is the measuring process's, after the
first batch (torch's own ~0.3 GB included).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402

PER_SHARD = 1000

# Runs in a fresh process: prints one JSON line.
MEASURE = r"""
import json, resource, sys, time
import numpy as np
from launcher.data import EpochPlan, TrainStream, batches, index_shards
from launcher.config.recipe import DataSection
from launcher.data.transforms import ImageTransform
pattern, cache, mode = sys.argv[1], sys.argv[2], sys.argv[3]
imported_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
if mode == "webdataset":
    import webdataset as wds
    loader = wds.WebDataset(pattern, shardshuffle=False, empty_check=False).decode().to_tuple("npy", "cls").batched(256)
    first = next(iter(loader))
    index_s = 0.0
else:
    index = index_shards(pattern, "data.train", cache_dir=cache)
    index_s = time.perf_counter() - start
    plan = EpochPlan(shard_sizes=tuple(int(n) for n in index.shard_sizes), global_batch=256, streams=1, world_size=1)
    data = DataSection(train=pattern, batch_size=256, image_size=8, mean=[0.5], std=[0.5], augment={"crop_padding": 0, "hflip": 0.0})
    stream = TrainStream(index, plan, ImageTransform(data, 1, train=True, image_size=8), 0, 0, 0)
    first = next(iter(batches(stream, num_workers=2)))
total = time.perf_counter() - start
print(json.dumps({"index_s": index_s, "first_batch_s": total, "imported_rss_mb": imported_rss,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_shards(folder: Path, samples: int) -> str:
    """Tiny samples as plain WebDataset tars, written with tarfile (fast enough for 1.28M)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((8, 8), dtype=np.uint8))
    image = buffer.getvalue()
    shards = -(-samples // PER_SHARD)
    for s in range(shards):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for i in range(s * PER_SHARD, min(samples, (s + 1) * PER_SHARD)):
                for ext, data in (("npy", image), ("cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"train-{{000000..{shards - 1:06d}}}.tar")


def measure(pattern: str, cache: Path, mode: str, env: dict | None = None) -> dict:
    env_cache = str(cache)
    out = subprocess.run([sys.executable, "-c", MEASURE, pattern, env_cache, mode], cwd=REPO, check=False,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                                              "CUDA_VISIBLE_DEVICES": "", "HOME": str(cache),
                                                              **(env or {})})
    if out.returncode:
        raise SystemExit(f"the {mode} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_281_167])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = ["| samples | shards | scan: index s | scan: first batch s | cached: first batch s | "
             "sidecar: first batch s | s3: first batch s | s3 cached: first batch s | s3 + set index: first batch s | "
             "s3 + set index cached: first batch s | index command s | index command s3 s | "
             "webdataset: first batch s | RSS MB after imports -> peak (sidecar) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    from tests.object_store import BUCKET, ObjectStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ObjectStore(Path(tmp) / "seaweedfs")
        store.start()
        try:
            for n in args.sizes:
                lines.append(measure_size(Path(tmp) / str(n), n, store, BUCKET))
                print(lines[-1], flush=True)
        finally:
            store.stop()
    lines += ["", "Times in seconds from after the imports to the first batch of 256 (2 loader workers), each in a "
              "fresh process on this machine's CPUs. `index command`: `python -m launcher.shards index --no-checksum` "
              "(includes its own imports). `s3`: the same shards and index files in a SeaweedFS bucket on loopback, "
              "an empty cache (the bucket is listed, every index file fetched and checked against its shard, then the "
              "first shards); `s3 cached`: a second process on the same machine (a requeued job): the listing, then "
              "the first shards. `s3 + set index`: after `python -m launcher.shards index --no-checksum s3://...` "
              "(`index command s3`: it fetches every shard) also wrote one index object for the whole set: "
              "the listing, that one object, the first shards; `cached`: the same machine again."]
    emit(lines, args.out)
    return 0


def measure_size(root: Path, n: int, store, bucket: str) -> str:
    from concurrent.futures import ThreadPoolExecutor

    pattern = write_shards(root / "shards", n)
    scan = measure(pattern, root / "cache", "launcher")
    cached = measure(pattern, root / "cache", "launcher")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher.shards", "index", "--no-checksum", pattern], cwd=REPO,
                   check=True, capture_output=True)
    index_command = time.perf_counter() - start
    sidecar = measure(pattern, root / "empty-cache", "launcher")
    plain = measure(pattern, root / "cache", "webdataset")
    client = store.client()
    files = sorted((root / "shards").iterdir())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: client.upload_file(str(f), bucket, f"scale{n}/{f.name}"), files))
    remote = f"s3://{bucket}/scale{n}/{Path(pattern).name}"
    s3 = measure(remote, root / "s3-cache", "launcher", store.env)
    s3_cached = measure(remote, root / "s3-cache", "launcher", store.env)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher.shards", "index", "--no-checksum", remote], cwd=REPO,
                   check=True, capture_output=True, env={**os.environ, **store.env})
    index_command_s3 = time.perf_counter() - start
    s3_set = measure(remote, root / "s3-set-cache", "launcher", store.env)
    s3_set_cached = measure(remote, root / "s3-set-cache", "launcher", store.env)
    return (f"| {n:,} | {-(-n // PER_SHARD):,} | {scan['index_s']:.2f} | {scan['first_batch_s']:.2f} | "
            f"{cached['first_batch_s']:.2f} | {sidecar['first_batch_s']:.2f} | {s3['first_batch_s']:.2f} | "
            f"{s3_cached['first_batch_s']:.2f} | {s3_set['first_batch_s']:.2f} | {s3_set_cached['first_batch_s']:.2f} | "
            f"{index_command:.1f} | {index_command_s3:.1f} | {plain['first_batch_s']:.2f} | "
            f"{sidecar['imported_rss_mb']:.0f} -> {sidecar['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
