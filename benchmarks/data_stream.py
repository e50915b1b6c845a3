"""Streaming from an object store, side by side: this launcher vs MosaicML Streaming
(streaming-community, MDS format) vs litdata vs plain WebDataset, same machine, same images,
same transform, same S3-compatible server (SeaweedFS on loopback, as in the tests).

    pip install streaming-community litdata      # the anchors (not dependencies of the launcher)
    python benchmarks/data_stream.py             # 20,000 JPEG images in 20 shards
    python benchmarks/data_stream.py --samples 4000 --out benchmarks/results/data_stream.md

The same samples (64x64 JPEG bytes, a label, an id) are written as WebDataset tars (with the
launcher's index files), as MDS shards and as litdata chunks, about 1,000 samples a shard, and
uploaded to the store. Every loader decodes with the same function (PIL) and applies the same
transform (the launcher's ImageTransform: resize 32, pad-4 random crop, flip, normalise), one
loader worker, batches of 64, shuffled, a cache limit of 8 shards where the loader has one.
Each measurement is a fresh process with an empty cache:

  first batch    seconds from creating the dataset to the first batch (the launcher: its index
                 files are read from the store, which the others' index.json files are too)
  samples/s      one epoch through one worker, downloads included
  resume at 90%  a new process resuming from a state taken at 90% of the epoch: seconds to its
                 first batch (WebDataset has no resume: it reads and skips 90% of the epoch)
  bit-exact      the resumed batches equal those of the uninterrupted epoch: same samples in the
                 same order, and the same augmented tensors
  fetched MB     bytes the store sent in the epoch (index files, listings and shards), counted by a
                 relay on loopback that every loader reaches the store through
  peak disk MB   the most the cache folder held, sampled every 20 ms

WebDataset reads http:// through curl from the store's filer (its s3 support is a pipe to the
AWS CLI); the others read s3://.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH = 64
LOADERS = ("launcher", "streaming", "litdata", "webdataset")


# ---------------------------------------------------------------- data (in the main process)

def make_images(n: int, seed: int = 0):
    """n (jpeg bytes, label) pairs: smooth colour fields with noise, 64x64, 10 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(n):
        label = int(rng.integers(0, 10))
        base = rng.integers(0, 256, 3)
        field = (base[None, None, :] * (0.5 + 0.5 * np.sin(6 * (xx + label * 0.1))[:, :, None])
                 + rng.normal(0, 20, (64, 64, 3)) + 60 * yy[:, :, None])
        buf = io.BytesIO()
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        yield buf.getvalue(), label


def write_all(root: Path, n: int, per_shard: int, loaders=LOADERS) -> dict:
    import webdataset as wds

    from launcher.data import index_file_next_to, scan_shard, write_index_file

    items = list(make_images(n))
    (root / "wds").mkdir(parents=True)
    with wds.ShardWriter(str(root / "wds" / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (jpg, label) in enumerate(items):
            sink.write({"__key__": f"{i:08d}", "jpg": jpg, "cls": str(label).encode()})
    shards = sorted((root / "wds").glob("train-*.tar"))
    for shard in shards:
        write_index_file(scan_shard(shard, "bench", checksum=True), index_file_next_to(shard))
    shard_bytes = max(s.stat().st_size for s in shards)

    if "streaming" in loaders:
        write_mds(root, items, shard_bytes)
    if "litdata" in loaders:
        write_litdata(root, items, shard_bytes)
    return {"shards": len(shards), "shard_bytes": shard_bytes,
            "total_bytes": sum(s.stat().st_size for s in shards), "samples": n}


def write_mds(root: Path, items, shard_bytes: int) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(root / "mds"), columns={"jpg": "bytes", "label": "int", "idx": "int"},
                   size_limit=shard_bytes, compression=None) as out:
        for i, (jpg, label) in enumerate(items):
            out.write({"jpg": jpg, "label": label, "idx": i})


def write_litdata(root: Path, items, shard_bytes: int) -> None:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(root / "lit"), chunk_bytes=shard_bytes)
    for i, (jpg, label) in enumerate(items):
        writer.add_item(i, {"jpg": jpg, "label": label, "idx": i})
    writer.done()
    writer.merge()


class CountingProxy:
    """A TCP relay on loopback in front of the store that counts the bytes it sends back: the
    bytes each loader fetched, measured the same way for all of them (their caches evict)."""

    def __init__(self, target_port: int):
        import socket

        self.target, self.sent = target_port, 0
        self._lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, count):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass

    def close(self):
        self.server.close()


# ---------------------------------------------------------------- measuring (one fresh process each)

class DiskWatcher:
    """The most bytes a folder held, sampled every 20 ms in a thread."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def size(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.folder):
            for f in files:
                try:
                    st = os.stat(os.path.join(dirpath, f))
                    total += st.st_blocks * 512  # allocated bytes: a ranged fetch's holes take none
                except OSError:
                    pass
        return total

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.size())

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return max(self.peak, self.size())


def _transform():
    from launcher.config.recipe import DataSection
    from launcher.data.transforms import ImageTransform

    data = DataSection(train="x", batch_size=BATCH, image_size=32, augment={"crop_padding": 4, "hflip": 0.5})
    return ImageTransform(data, 3, train=True)


def _decode(jpg: bytes):
    from launcher.data import decode_image

    return decode_image(jpg, "jpg")


def _launcher(env: dict, cache: Path, resume_state):
    """(batches, state function, bytes-fetched function) of the launcher's reader."""
    from launcher.data import EpochPlan, TrainStream, batches, index_shards
    from launcher.data.remote.store import FetchOptions

    index = index_shards(env["s3_pattern"], "data.train", cache_dir=str(cache),
                         fetch=FetchOptions(s3_endpoint=env["endpoint"], cache_limit=8 * env["shard_bytes"],
                                            prefetch_shards=2))
    plan = EpochPlan(tuple(int(n) for n in index.shard_sizes), global_batch=BATCH, streams=1, world_size=1, seed=0)
    start = resume_state["step"] if resume_state else 0
    stream = TrainStream(index, plan, _transform(), 0, 0, start)

    def gen():
        for step, b in enumerate(batches(stream, num_workers=1), start):
            yield b.ids.tolist(), b.images, {"step": step + 1}
    return gen(), lambda: index.cache.bytes_fetched


def _streaming(env, cache, resume_state):
    import streaming
    from streaming import StreamingDataLoader, StreamingDataset

    transform = _transform()

    class Dataset(StreamingDataset):
        def __getitem__(self, i):
            obj = super().__getitem__(i)
            return obj["idx"], transform(_decode(obj["jpg"]))

    os.environ["S3_ENDPOINT_URL"] = env["endpoint"]
    streaming.base.util.clean_stale_shared_memory()
    ds = Dataset(remote=env["mds_url"], local=str(cache), shuffle=True, shuffle_seed=0, batch_size=BATCH,
                 cache_limit=8 * env["shard_bytes"], predownload=2 * BATCH)
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=1)
    if resume_state:
        loader.load_state_dict(resume_state)

    def gen():
        for ids, images in loader:
            yield ids.tolist(), images, loader.state_dict()
    return gen(), None


def _litdata(env, cache, resume_state):
    import litdata.streaming.downloader as downloader
    from litdata import StreamingDataLoader, StreamingDataset

    # The store is plain http on loopback: obstore (litdata's fast path) refuses http unless told.
    downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}
    transform = _transform()

    class Dataset(StreamingDataset):
        def __getitem__(self, i):
            obj = super().__getitem__(i)
            return obj["idx"], transform(_decode(obj["jpg"]))

    ds = Dataset(env["lit_url"], cache_dir=str(cache), shuffle=True, seed=0, max_cache_size=8 * env["shard_bytes"],
                 storage_options={"endpoint_url": env["endpoint"]})
    loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=1)
    if resume_state:
        loader.load_state_dict(resume_state)

    def gen():
        for ids, images in loader:
            yield ids.tolist(), images, loader.state_dict()
    return gen(), None


def _webdataset(env, cache, resume_state):
    import webdataset as wds

    transform = _transform()
    ds = (wds.WebDataset(env["http_pattern"], shardshuffle=20, seed=0, empty_check=False)
          .shuffle(1000, rng=__import__("random").Random(0))
          .map(lambda s: (int(s["__key__"]), transform(_decode(s["jpg"]))))
          .batched(BATCH))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=1)
    skip = resume_state["batches"] if resume_state else 0

    def gen():
        for n, (ids, images) in enumerate(loader, 1):
            if n > skip:  # no seek: a resume reads and drops what came before
                yield list(ids), images, {"batches": n}
    return gen(), lambda: env["total_bytes"]  # it streams every shard once


def measure(loader_name: str, mode: str, env: dict, resume_state) -> dict:
    # Every library imported before the clock starts (the same for all; torch alone takes seconds).
    import importlib

    for module in ("boto3", "torch", "webdataset", *(m for m in ("streaming", "litdata") if m in env["loaders"])):
        importlib.import_module(module)

    import launcher.data  # noqa: F401

    # The same (emptied) folder for the epoch and the resume: litdata's state names its cache path.
    cache = Path(env["root"]) / "cache" / loader_name
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    watcher = DiskWatcher(cache)
    start = time.perf_counter()
    it, _ = {"launcher": _launcher, "streaming": _streaming, "litdata": _litdata,
                   "webdataset": _webdataset}[loader_name](env, cache, resume_state)
    first, samples, batches, state_at_90 = None, 0, [], None
    total_batches = -(-env["samples"] // BATCH)
    for n, (ids, images, state) in enumerate(it, 1):
        if first is None:
            first = time.perf_counter() - start
        ids = [int(i) for i in ids]
        samples += len(ids)
        batches.append([ids, hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]])
        if mode == "epoch" and n == int(0.9 * total_batches):
            state_at_90 = json.loads(json.dumps(state, default=int))
    elapsed = time.perf_counter() - start
    peak = watcher.stop()
    return {"first_batch_s": first, "samples": samples, "samples_per_s": samples / elapsed, "batches": batches,
            "state_at_90": state_at_90, "peak_disk": peak}


# ---------------------------------------------------------------- main

def run_child(loader: str, mode: str, env: dict, state) -> dict:
    payload = json.dumps({"loader": loader, "mode": mode, "env": env, "state": state})
    proc = subprocess.run([sys.executable, __file__, "--child"], input=payload, capture_output=True, text=True,
                          env={**os.environ, **env["aws"]}, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(sys.stdin.read())
        print(json.dumps(measure(job["loader"], job["mode"], job["env"], job["state"])))
        return

    from benchmarks.emit_results import emit
    from tests.object_store import BUCKET, ObjectStore

    root = Path(tempfile.mkdtemp(prefix="data-stream-"))
    facts = write_all(root / "data", args.samples, args.per_shard, args.loaders)
    store = ObjectStore(root / "seaweedfs")
    store.start()
    try:
        for name in ("wds", "mds", "lit"):
            if not (root / "data" / name).exists():
                continue
            client = store.client()
            for path in sorted((root / "data" / name).rglob("*")):
                if path.is_file():
                    client.upload_file(str(path), BUCKET, f"{name}/{path.relative_to(root / 'data' / name)}")
        last = facts["shards"] - 1
        s3_proxy, http_proxy = CountingProxy(store.ports["s3"]), CountingProxy(store.ports["filer"])
        endpoint = f"http://127.0.0.1:{s3_proxy.port}"
        env = {**facts, "loaders": args.loaders, "endpoint": endpoint, "aws": {**store.env, "AWS_ENDPOINT_URL": endpoint}, "root": str(root),
               "s3_pattern": f"s3://{BUCKET}/wds/train-{{000000..{last:06d}}}.tar",
               "http_pattern": f"http://127.0.0.1:{http_proxy.port}/buckets/{BUCKET}/wds/"
                               f"train-{{000000..{last:06d}}}.tar",
               "mds_url": f"s3://{BUCKET}/mds", "lit_url": f"s3://{BUCKET}/lit"}
        runs = {loader: [] for loader in args.loaders}
        for _ in range(args.repeats):  # loaders alternate, so a slow moment of the machine hits all
            for loader in args.loaders:
                before = s3_proxy.sent + http_proxy.sent
                epoch = run_child(loader, "epoch", env, None)
                middle = s3_proxy.sent + http_proxy.sent
                resumed = run_child(loader, "resume", env, epoch["state_at_90"])
                epoch["fetched"], resumed["fetched"] = middle - before, s3_proxy.sent + http_proxy.sent - middle
                tail = epoch["batches"][-len(resumed["batches"]):] if resumed["batches"] else []
                runs[loader].append({
                    "epoch": epoch, "resumed": resumed,
                    "same_samples": bool(tail) and [b[0] for b in tail] == [b[0] for b in resumed["batches"]],
                    "same_tensors": bool(tail) and tail == resumed["batches"],
                    "complete": sorted(i for b in epoch["batches"] for i in b[0]) == list(range(args.samples))})
                print(f"{loader}: {epoch['samples_per_s']:.0f} samples/s", file=sys.stderr)
    finally:
        store.stop()
        shutil.rmtree(root, ignore_errors=True)

    def median(loader, part, key):
        return statistics.median(r[part][key] for r in runs[loader])

    best_rate = max(median(loader, "epoch", "samples_per_s") for loader in runs)
    mb = 1e6
    lines = [f"# Streaming from an object store: {args.samples} JPEG samples, {facts['shards']} shards of "
             f"~{facts['shard_bytes'] / mb:.1f} MB, SeaweedFS on loopback, 1 loader worker, batch {BATCH}", "",
             f"Medians of {args.repeats} runs per loader (loaders alternating), each a fresh process with an empty "
             "cache.", "",
             "| loader | first batch (s) | samples/s | vs best | resume at 90%: first batch (s) | resume fetched MB | "
             "same samples | bit-exact | every sample once | fetched MB / epoch | peak disk MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for loader, results in runs.items():
        rate = median(loader, "epoch", "samples_per_s")
        yes = lambda key: "yes" if all(r[key] for r in results) else "no"  # noqa: E731
        lines.append(f"| {loader} | {median(loader, 'epoch', 'first_batch_s'):.2f} | {rate:.0f} | "
                     f"{rate / best_rate:.2f} | {median(loader, 'resumed', 'first_batch_s'):.2f} | "
                     f"{median(loader, 'resumed', 'fetched') / mb:.1f} | {yes('same_samples')} | "
                     f"{yes('same_tensors')} | {yes('complete')} | {median(loader, 'epoch', 'fetched') / mb:.1f} | "
                     f"{median(loader, 'epoch', 'peak_disk') / mb:.1f} |")
    lines += ["", f"Data set: {facts['total_bytes'] / mb:.1f} MB of tars (the MDS and litdata copies are smaller: "
              "no tar headers); cache limit 8 shards "
              f"({8 * facts['shard_bytes'] / mb:.1f} MB) for the launcher, streaming (cache_limit) and litdata "
              "(max_cache_size); WebDataset keeps no cache. Resume: streaming and litdata load the state_dict their "
              "loader gave at 90%; the launcher starts its epoch plan at the step it checkpointed; WebDataset reads "
              "and drops the first 90%. Bit-exact: the resumed batches' augmented tensors equal the uninterrupted "
              "epoch's (the launcher seeds augmentation per sample; the others draw from the worker's RNG)."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
