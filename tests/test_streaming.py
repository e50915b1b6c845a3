"""Remote shards against a real object store (SeaweedFS on loopback; tests/object_store.py):
s3://, http:// (the same objects through the store's filer) and pipe: give the same batches as
local disk, fetched in plan order into a bounded cache; resume fetches only what it still reads;
bad remote input and an unreachable store are clear errors."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.data import EpochPlan, TrainStream, batches, expand_pattern, index_shards
from launcher.errors import LauncherError
from launcher.config.load import validate_recipe
from launcher.registry import Plugin, PluginOptions, register
from launcher.data.remote.store import FetchOptions
from launcher.data.transforms import ImageTransform
from tests.conftest import small_recipe

WINDOW = 36  # half a shard: a lane reads about two shards at a time, so a small cache can hold them


def _plan(index, world_size=1):
    return EpochPlan(tuple(index.shard_sizes.tolist()), global_batch=32, streams=2, world_size=world_size, seed=0,
                     window=WINDOW)


def _read(index, plan, transform, num_workers, epoch=0, start_step=0, rank=0, first_batch_hook=None):
    out = []
    for batch in batches(TrainStream(index, plan, transform, epoch, rank, start_step), num_workers):
        if not out and first_batch_hook is not None:
            first_batch_hook()
        out.append(batch)
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images)
                                    and torch.equal(x.targets, y.targets) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def transform(digits20, tmp_path_factory):
    recipe = validate_recipe(small_recipe(digits20, tmp_path_factory.mktemp("r"),
                                          data={"augment": {"crop_padding": 2, "hflip": 0.5}}))
    return ImageTransform(recipe.data, 3, train=True)


def test_s3_http_and_pipe_shards_give_the_batches_of_local_disk_in_a_bounded_cache(
        remote_digits20, object_store, transform, tmp_path, capsys):
    info = remote_digits20
    local = index_shards(info["train"], "data.train")
    sizes = [Path(u).stat().st_size for u in expand_pattern(info["train"])]
    shard, total = max(sizes), sum(sizes)
    cache = str(tmp_path / "cache")

    def check(pattern, plan, workers, limit):
        options = FetchOptions(s3_endpoint=object_store.endpoint, cache_limit=limit, prefetch_shards=1)
        remote = index_shards(pattern, "data.train", cache_dir=cache, fetch=options)
        assert np.array_equal(remote.offsets, local.offsets) and np.array_equal(remote.labels, local.labels)
        at_first_batch = []
        got = _read(remote, plan, transform, workers,
                    first_batch_hook=lambda: at_first_batch.append(remote.cache.bytes_fetched))
        assert _same(got, _read(local, plan, transform, 0)), pattern
        # Training started after a few shards, not the whole set; each shard was fetched once
        # (evicted only after its last step); the cache never held more than its limit.
        assert at_first_batch[0] <= 4 * shard, (pattern, at_first_batch, shard)
        assert remote.cache.bytes_fetched == total
        assert remote.cache.peak_bytes <= limit, (pattern, remote.cache.peak_bytes, limit)
        remote.cache.close()

    pipe = "pipe:cat " + info["train"]
    two_lanes = _plan(local)
    for pattern, workers in ((info["s3_train"], 2), (info["http_train"], 0), (pipe, 2)):
        check(pattern, two_lanes, workers, limit=10 * shard)  # half the set
    # 3 shards of 20: one lane, read in process, needs at most two at a time, plus one prefetched.
    one_lane = EpochPlan(tuple(local.shard_sizes.tolist()), global_batch=32, streams=1, world_size=1, seed=0,
                         window=WINDOW)
    check(info["s3_train"], one_lane, 0, limit=3 * shard)
    assert "cache_limit" not in capsys.readouterr().err  # no shard was fetched past the limit


def test_a_resumed_epoch_fetches_only_what_its_remaining_steps_read(remote_digits20, object_store, transform, tmp_path):
    info = remote_digits20
    local = index_shards(info["train"], "data.train")
    plan = _plan(local)
    total = sum(Path(u).stat().st_size for u in expand_pattern(info["train"]))
    options = FetchOptions(s3_endpoint=object_store.endpoint)
    start = plan.steps_per_epoch() * 9 // 10  # resume at 90% of the epoch
    remote = index_shards(info["s3_train"], "data.train", cache_dir=str(tmp_path / "c"), fetch=options)
    tail = _read(remote, plan, transform, 2, start_step=start)
    assert _same(tail, _read(local, plan, transform, 0, start_step=start))
    fetched = remote.cache.bytes_fetched
    assert 0 < fetched < 0.25 * total, (fetched, total)  # ranged reads of the shards the last 10% read
    # The next epoch needs every shard whole: the partial ones are fetched again, whole.
    assert _same(_read(remote, plan, transform, 2, epoch=1), _read(local, plan, transform, 0, epoch=1))
    assert remote.cache.bytes_fetched == fetched + total
    # With no cache limit every shard stays: a third epoch fetches nothing.
    assert _same(_read(remote, plan, transform, 0, epoch=2), _read(local, plan, transform, 0, epoch=2))
    assert remote.cache.bytes_fetched == fetched + total
    # Two ranks read their own lanes: together they fetch each byte about once (shards at the
    # boundary between lanes are split by ranged reads, not fetched by both).
    plan2 = _plan(local, world_size=2)
    ranks = [index_shards(info["s3_train"], "data.train", cache_dir=str(tmp_path / f"r{r}"), fetch=options)
             for r in range(2)]
    for r, index in enumerate(ranks):
        assert _same(_read(index, plan2, transform, 0, rank=r), _read(local, plan2, transform, 0, rank=r))
    assert sum(i.cache.bytes_fetched for i in ranks) < total * 1.05
    for index in (remote, *ranks):
        index.cache.close()


def test_remote_shards_without_index_files_are_indexed_once_per_machine_or_by_the_index_command(
        remote_digits20, object_store, tmp_path, monkeypatch, capsys):
    import launcher.data.index_files as data
    from launcher.data.writer import main

    info, options = remote_digits20, FetchOptions(s3_endpoint=object_store.endpoint)
    local = index_shards(info["train"], "data.train")
    cache = str(tmp_path / "cache")
    first = index_shards(info["bare_train"], "data.train", cache_dir=cache, fetch=options)
    assert "have no index file" in capsys.readouterr().err
    assert np.array_equal(first.offsets, local.offsets) and np.array_equal(first.labels, local.labels)

    def refuse(path, key, checksum=False):
        raise AssertionError(f"scanned {path}")

    with monkeypatch.context() as m:
        m.setattr(data, "scan_shard", refuse)
        again = index_shards(info["bare_train"], "data.train", cache_dir=cache, fetch=options)  # the machine's cache
        assert np.array_equal(again.offsets, local.offsets)
    # The index command fetches each shard once and uploads its index next to it.
    bare = info["bare_train"].replace("{000000..000019}", "{000000..000003}")
    assert main(["index", bare, "--s3-endpoint", object_store.endpoint]) == 0
    monkeypatch.setattr(data, "scan_shard", refuse)
    fresh = index_shards(bare, "data.train", cache_dir=str(tmp_path / "fresh"), fetch=options)
    assert len(fresh) == 4 * 72
    for index in (first, again, fresh):
        index.cache.close()


def test_the_index_command_writes_one_index_for_a_remote_set_read_by_a_cold_start_in_one_request(
        digits20, object_store, tmp_path, monkeypatch, capsys):
    """1,282 shards' index files and their checks cost a cold start seconds (data_scale.md): the
    index command also writes one object for the whole set, with each shard's ETag; a fresh machine
    reads it in one request, a warm one not at all, and a shard replaced since is indexed on its own."""
    import launcher.data.index_files as index_files
    from launcher.data.index_files import index_file_next_to, set_index_url
    from launcher.data.remote.store import Remote
    from launcher.data.writer import main

    options = FetchOptions(s3_endpoint=object_store.endpoint)
    store = Remote(options)
    local = expand_pattern(digits20["train"])
    pattern = object_store.s3_url("set", digits20["train"]).replace("{000000..000019}", "{000000..000003}")
    urls = expand_pattern(pattern)
    for path, url in zip(local, urls):
        store.upload(Path(path), url)  # the shards alone: the index command writes the indexes
    assert main(["index", pattern, "--s3-endpoint", object_store.endpoint]) == 0
    assert f"one index for the 4 shards: {set_index_url(urls)}" in capsys.readouterr().out

    requests = []
    for method in ("read_small", "read_range"):
        real = getattr(Remote, method)
        monkeypatch.setattr(Remote, method, lambda self, url, *a, real=real: (requests.append(url), real(self, url, *a))[1])

    def refuse(path, key, checksum=False):
        raise AssertionError(f"scanned {path}")

    monkeypatch.setattr(index_files, "scan_shard", refuse)

    def labels_of(*shards: int) -> np.ndarray:
        return np.concatenate([index_shards(local[i], "data.train").labels for i in shards])

    cache = str(tmp_path / "cache")
    for expected_requests in ([set_index_url(urls)], []):  # a fresh machine, then the same machine again
        requests.clear()
        index = index_shards(pattern, "data.train", cache_dir=cache, fetch=options)
        index.cache.close()
        assert requests == expected_requests
        assert np.array_equal(index.labels, labels_of(0, 1, 2, 3))
    # Shard 1 replaced by another one (with its own index file): its ETag no longer matches the set's.
    store.upload(Path(local[5]), urls[1])
    store.upload(index_file_next_to(Path(local[5])), urls[1] + ".index.npz")
    requests.clear()
    index = index_shards(pattern, "data.train", cache_dir=cache, fetch=options)
    index.cache.close()
    assert requests[0] == set_index_url(urls) and urls[1] + ".index.npz" in requests
    assert set(requests) <= {set_index_url(urls), urls[1] + ".index.npz", urls[1]}  # its own index and its check
    assert np.array_equal(index.labels, labels_of(0, 5, 2, 3))


def test_bad_remote_input_is_a_clear_error(remote_digits20, object_store, digits20, tmp_path, capsys):
    info, client = remote_digits20, object_store.client()
    options = FetchOptions(s3_endpoint=object_store.endpoint, retries=1, retry_wait=0.1, timeout=5)
    cache = str(tmp_path / "c")
    with pytest.raises(LauncherError, match=r"shard 's3://shards/d20/train-000020.tar' does not exist \(80 of 100 are missing\) at http://127"):
        index_shards(info["s3_train"].replace("000019", "000099"), "data.train", cache_dir=cache, fetch=options)
    # An index in the store that does not describe its shard (replaced by one of another size): both named.
    shards = expand_pattern(digits20["train"])
    client.upload_file(shards[19], "shards", "stale/train-000000.tar")  # the last shard is smaller
    client.upload_file(shards[0] + ".index.npz", "shards", "stale/train-000000.tar.index.npz")
    with pytest.raises(LauncherError) as err:
        index_shards("s3://shards/stale/train-000000.tar", "data.train", cache_dir=cache, fetch=options)
    assert "'s3://shards/stale/train-000000.tar.index.npz' does not match its shard " \
           "'s3://shards/stale/train-000000.tar'" in str(err.value) and "launcher.shards index" in str(err.value)
    # Replaced by a shard of the same size: the fetch checks its SHA-256 against the index.
    client.upload_file(shards[1], "shards", "same-size/train-000000.tar")
    client.upload_file(shards[0] + ".index.npz", "shards", "same-size/train-000000.tar.index.npz")
    swapped = index_shards("s3://shards/same-size/train-000000.tar", "data.train", cache_dir=cache, fetch=options)
    with pytest.raises(LauncherError, match=r"SHA-256 .* differs from its index's .* no longer matches its index"):
        swapped.read_image(0, {})
    swapped.cache.close()
    # The same for local files.
    import shutil

    folder = tmp_path / "local"
    folder.mkdir()
    shutil.copy(shards[19], folder / "a.tar")
    shutil.copy(shards[0] + ".index.npz", folder / "a.tar.index.npz")
    with pytest.raises(LauncherError, match=r"the index '.*a.tar.index.npz' does not match its shard '.*a.tar'"):
        index_shards(str(folder / "a.tar"), "data.train", cache_dir=cache)
    # Mixing local and remote shards in one set.
    with pytest.raises(LauncherError, match="mixes local and remote"):
        index_shards(f"{shards[0]}::{info['s3_train']}", "data.train", cache_dir=cache, fetch=options)
    # --check (and slurm submit) list the bucket as a run does first.
    from launcher.__main__ import main as launcher_main
    from tests.conftest import REPO

    assert launcher_main(["--check", str(REPO / "recipes" / "digits.yaml"), f"data.train={info['s3_train']}",
                          f"data.val={info['s3_val'].replace('val-', 'nope-')}", "model.num_classes=10",
                          f"data.s3_endpoint={object_store.endpoint}"]) == 2
    assert "data.val: shard 's3://shards/d20/nope-000000.tar' does not exist (5 of 5 missing" in capsys.readouterr().err
    # An unreachable store: retried, then an error naming the URL and the endpoint.
    dead = FetchOptions(s3_endpoint="http://127.0.0.1:9", retries=2, retry_wait=0.05, timeout=2)
    with pytest.raises(LauncherError) as err:
        index_shards(info["s3_train"], "data.train", cache_dir=cache, fetch=dead)
    assert "could not list 's3://shards/d20/train-000000.tar' (endpoint http://127.0.0.1:9) after 3 attempts" \
        in str(err.value)


def test_remote_indexes_that_leave_out_samples_are_web_pages_or_come_without_a_size_are_named(
        remote_digits20, object_store, digits20, tmp_path):
    """Issue 29: an index in the store listing the first 10 of a shard's samples (true size and
    SHA-256 kept) was accepted and the run trained on 10 samples; an HTML page served for an index
    was called "pickled data ... the shard was rewritten"; a server sending no Content-Length was
    said to hold a shard of -1 bytes."""
    import http.server
    import io
    import threading

    client, options = object_store.client(), FetchOptions(s3_endpoint=object_store.endpoint, retries=1,
                                                          retry_wait=0.05, timeout=5)
    shard = expand_pattern(digits20["train"])[0]
    with np.load(shard + ".index.npz") as npz:
        good = {k: npz[k] for k in npz.files}
    first10 = {**good, **{k: good[k][:10] for k in ("offsets", "sizes", "ext_codes", "labels")}}
    buffer = io.BytesIO()
    np.savez(buffer, **first10)
    client.upload_file(shard, "shards", "short/train-000000.tar")
    client.put_object(Bucket="shards", Key="short/train-000000.tar.index.npz", Body=buffer.getvalue())
    with pytest.raises(LauncherError) as err:
        index_shards("s3://shards/short/train-000000.tar", "data.train", cache_dir=str(tmp_path / "c"), fetch=options)
    text = str(err.value)
    assert "'s3://shards/short/train-000000.tar.index.npz' does not match its shard" in text
    assert "more samples after the index's last one" in text and "the index lists 10" in text
    assert "python -m launcher.shards index 's3://shards/short/train-000000.tar'" in text
    # An HTML page where the index should be.
    client.upload_file(shard, "shards", "html/train-000000.tar")
    client.put_object(Bucket="shards", Key="html/train-000000.tar.index.npz", Body=b"<html><body>gone</body></html>")
    with pytest.raises(LauncherError, match=r"cannot be used: it is not a shard index file: it is a web page \(HTML\)"):
        index_shards(object_store.http_url("html", "x/train-000000.tar"), "data.train", cache_dir=str(tmp_path / "c"),
                     fetch=options)

    # A plain HTTP server that sends no Content-Length (and ignores Range): the index's size is used,
    # and the fetch checks it with the SHA-256; the samples are those of the local shard.
    class NoLength(http.server.SimpleHTTPRequestHandler):
        def send_header(self, keyword, value):
            if keyword.lower() != "content-length":
                super().send_header(keyword, value)

        def log_message(self, *args):
            pass

    folder = Path(shard).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: NoLength(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{Path(shard).name}"
        remote = index_shards(url, "data.train", cache_dir=str(tmp_path / "c2"), fetch=options)
        local = index_shards(shard, "data.train")
        assert len(remote) == len(local) and remote.read_image(7, {}) == local.read_image(7, {})
        remote.cache.close()
    finally:
        server.shutdown()


@register("test_delete_objects")
class _DeleteObjects(Plugin):
    """Once (a marker file remembers), at the end of step `step`, deletes the store's objects under
    `prefix` whose names contain `match` (as if someone removed or was replacing the shards)."""

    class Options(PluginOptions):
        endpoint: str
        prefix: str
        match: str = "train-"
        step: int = 3
        marker: str

    def on_step_end(self, ctx) -> None:
        if ctx.step != self.options.step or Path(self.options.marker).exists():
            return
        Path(self.options.marker).touch()
        from tests.object_store import ObjectStore

        client = ObjectStore.__new__(ObjectStore)
        client.endpoint = self.options.endpoint
        s3 = client.client()
        for item in s3.list_objects_v2(Bucket="shards", Prefix=self.options.prefix + "/").get("Contents", []):
            if self.options.match in item["Key"]:
                s3.delete_object(Bucket="shards", Key=item["Key"])


def test_shards_deleted_from_the_store_mid_run_are_retried_then_named_and_the_relaunch_resumes_exactly(
        object_store, digits20, tmp_path, capsys):
    """Issue 29: an object deleted while the run streams it. Each fetch is retried (the object may be
    being replaced), then the run stops with one paragraph naming the URL, status failed; once the
    shards are back, the relaunch resumes from its checkpoint and ends as a run that never stopped."""
    from launcher.loop import train
    from tests.conftest import metric_rows

    folder = Path(digits20["train"]).parent
    object_store.upload_folder(folder, "deleted")
    shard = max(Path(u).stat().st_size for u in expand_pattern(digits20["train"]))
    data = {"num_workers": 0, "prefetch_shards": 0, "cache_limit": 3 * shard, "shuffle_window": WINDOW, "fetch_retries": 2,
            "fetch_retry_wait": 0.05, "s3_endpoint": object_store.endpoint}
    plugins = {"checkpoint": {"every_steps": 2}}

    def recipe(run, train_pattern, val_pattern, extra):
        return validate_recipe(small_recipe(digits20, run, data={**small_recipe(digits20, run)["data"], **data,
                                                                 "train": train_pattern, "val": val_pattern},
                                            train={"epochs": 1, "max_steps": 16}, plugins={**plugins, **extra}))

    train(recipe(tmp_path / "local", digits20["train"], digits20["val"], {}))
    deleting = {"test_delete_objects": {"endpoint": object_store.endpoint, "prefix": "deleted", "step": 2,
                                        "marker": str(tmp_path / "deleted-once")}}
    run = tmp_path / "s3"
    remote = recipe(run, object_store.s3_url("deleted", digits20["train"]),
                    object_store.s3_url("deleted", digits20["val"]), deleting)
    with pytest.raises(LauncherError) as err:
        train(remote)
    text = str(err.value)
    assert re.search(r"could not fetch 's3://shards/deleted/train-0000\d\d.tar' \(endpoint http://127[^)]*\) after 3 "
                     r"attempts: ObjectMissing: S3 (NoSuchKey|404)", text), text
    assert "put it back, then relaunch" in text
    assert capsys.readouterr().err.count("is missing from the store") >= 2  # retried before giving up
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    object_store.upload_folder(folder, "deleted")
    train(remote)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert metric_rows(run) == metric_rows(tmp_path / "local")
    assert (run / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "local" / "final" / "model.safetensors").read_bytes()


def _counted_pipe(shard: str, counter: Path, cases: str) -> str:
    """A pipe: command that knows how often it ran (its counter file): `cases` is a shell case
    body choosing, by the run number c, what it prints."""
    return (f"pipe:sh -c 'c=$(cat {counter} 2>/dev/null || echo 0); echo $((c+1)) > {counter}; "
            f"case $c in {cases.replace('F', shard)} esac'")


def test_a_download_cut_short_is_retried_and_never_used(digits20, transform, tmp_path, capsys):
    """pipe: shards whose first fetch for training (their second run: the first indexed them)
    delivers 5,000 bytes: the size check refuses it, the retry gets it whole, and the batches are
    those of local disk. A shard that stays short stops the read, naming it."""
    shards = expand_pattern(digits20["train"])[:2]
    pattern = "::".join(_counted_pipe(s, tmp_path / f"n{i}", "1) head -c 5000 F;; *) cat F;;")
                        for i, s in enumerate(shards))
    local = index_shards("::".join(shards), "data.train")
    remote = index_shards(pattern, "data.train", cache_dir=str(tmp_path / "c"), fetch=FetchOptions(retry_wait=0.05))
    plan = EpochPlan(tuple(local.shard_sizes.tolist()), global_batch=32, streams=2, world_size=1, seed=0)
    assert _same(_read(remote, plan, transform, 2), _read(local, plan, transform, 0))
    assert capsys.readouterr().err.count("the transfer was cut short") == 2  # each shard's first attempt
    remote.cache.close()
    broken_pattern = _counted_pipe(shards[0], tmp_path / "m", "0) cat F;; *) head -c 5000 F;;")
    broken = index_shards(broken_pattern, "data.train", cache_dir=str(tmp_path / "c"),
                          fetch=FetchOptions(retries=1, retry_wait=0.05))
    plan1 = EpochPlan(tuple(broken.shard_sizes.tolist()), global_batch=32, streams=1, world_size=1, seed=0)
    with pytest.raises(LauncherError, match=r"could not fetch 'pipe:sh -c .*train-000000.tar.*' after 2 "
                                            r"attempts: OSError: got 5000 of \d+ bytes"):
        _read(broken, plan1, transform, 2)
    broken.cache.close()


# ---------------------------------------------------------------- training runs (2 processes)

def _streaming_recipe(info, tmp_path, name, train, val, **data):
    import yaml

    run_dir = tmp_path / name
    raw = small_recipe(info, run_dir, train={"epochs": 2}, run={"log_every": 5, "progress": False},
                       data={"train": train, "val": val, "num_workers": 2, "batch_size": 16, "shuffle_window": WINDOW,
                             "augment": {"crop_padding": 2, "random_erasing": 0.3}, **data},
                       plugins={"checkpoint": {"every_steps": 4}, "recorder": {"trace": False, "stream": True}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, run_dir


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "ids-rank0.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def local_disk_run(digits20, tmp_path_factory) -> Path:
    """The reference: the same recipe on local shards, 2 processes, uninterrupted."""
    from tests.conftest import accelerate_cmd
    from tests.test_kill_resume import finish

    tmp_path = tmp_path_factory.mktemp("local-disk")
    recipe, run = _streaming_recipe(digits20, tmp_path, "local", digits20["train"], digits20["val"])
    finish([*accelerate_cmd(2), "launcher", str(recipe)], tmp_path / "local.log")
    return run


@pytest.mark.slow
def test_training_from_s3_rides_out_a_store_outage_and_kill_9_and_equals_local_disk(
        remote_digits20, object_store, local_disk_run, tmp_path):
    """2 processes train from s3:// (endpoint from AWS_ENDPOINT_URL) with a cache of 3 shards of 20.
    The store is stopped for 4 s mid-epoch (the run retries and carries on when it is back), then
    the run is killed with SIGKILL; the relaunch resumes from its checkpoint. Weights and metrics
    equal the local-disk run's, byte for byte."""
    from tests.conftest import accelerate_cmd
    from tests.test_kill_resume import assert_same_run, checkpoints, finish, kill, start, wait_for

    info = remote_digits20
    shard = max(Path(u).stat().st_size for u in expand_pattern(info["train"]))
    recipe, run = _streaming_recipe(info, tmp_path, "s3", info["s3_train"], info["s3_val"], cache_limit=3 * shard,
                                    prefetch_shards=1, fetch_retries=8, fetch_retry_wait=0.5)
    cmd, log = [*accelerate_cmd(2), "launcher", str(recipe)], tmp_path / "s3.log"
    env = {"AWS_ENDPOINT_URL": object_store.endpoint}
    proc = start(cmd, log, **env)
    try:
        assert wait_for(lambda: _steps_done(run) >= 3, proc), log.read_text()[-3000:]
        object_store.stop()
        time.sleep(4)
    finally:
        object_store.start()
    assert wait_for(lambda: _steps_done(run) >= 14 and checkpoints(run), proc), log.read_text()[-3000:]
    kill(proc)
    assert "retrying in" in log.read_text()  # the outage was felt, and ridden out
    finish(cmd, log, **env)
    assert_same_run(run, local_disk_run)


@pytest.mark.slow
def test_training_over_http_stops_clearly_when_the_store_stays_down_and_resumes_exactly(
        remote_digits20, object_store, local_disk_run, tmp_path):
    """Over http:// (the store's filer, with Range requests): the store goes down for good
    mid-epoch; after its retries the run stops naming the shard URL (status failed). Started again
    once the store is back, it resumes from its checkpoint and equals the local-disk run."""
    from tests.conftest import accelerate_cmd
    from tests.test_kill_resume import assert_same_run, finish, start, wait_for

    info = remote_digits20
    shard = max(Path(u).stat().st_size for u in expand_pattern(info["train"]))
    recipe, run = _streaming_recipe(info, tmp_path, "http", info["http_train"], info["http_val"],
                                    cache_limit=3 * shard, prefetch_shards=1, fetch_retries=2, fetch_retry_wait=0.2,
                                    fetch_timeout=5)
    cmd, log = [*accelerate_cmd(2), "launcher", str(recipe)], tmp_path / "http.log"
    proc = start(cmd, log)
    try:
        assert wait_for(lambda: _steps_done(run) >= 6, proc), log.read_text()[-3000:]
        # The run is paused while the store shuts down (a graceful stop takes seconds, in which a
        # fast run could finish its 2 epochs): it goes on only once the store is gone.
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            object_store.stop()
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=180) != 0
    finally:
        object_store.start()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed", status
    assert re.search(r"could not fetch 'http://127\.0\.0\.1:\d+/buckets/shards/d20/(train|val)-0000\d\d\.tar' after 3 "
                     r"attempts", status["error"]), status
    assert re.search(r"^error: data\.(train|val): could not fetch 'http://", log.read_text(), re.M), \
        log.read_text()[-4000:]  # one paragraph
    finish(cmd, log)
    assert "resum" in log.read_text().lower()
    assert_same_run(run, local_disk_run)


def test_the_fetch_policy_evicts_finished_shards_least_recently_used_first_and_never_starves_the_loader():
    """launcher.data.remote.cache.fetch_decision, the cache's policy without its side effects."""
    from launcher.data.remote.cache import Need, fetch_decision

    needs = {s: Need(s, first_item=2 * s, last_item=2 * s + 1, start=0, end=100) for s in range(8)}
    state = dict(present={0: (0, 100), 1: (0, 100), 2: (0, 100)}, in_flight={}, needs=needs, consumed=3, lookahead=2,
                 prefetch_shards=4, last_used={0: 5, 1: 2, 2: 9})
    # Room for 3 shards: 0 and 1 are finished (last items 1 and 3 consumed); 1 was used longest ago.
    decision = fetch_decision(needs[3], cache_limit=300, **state)
    assert decision.start and decision.evict == (1,) and not decision.past_limit
    assert fetch_decision(needs[3], cache_limit=None, **state).evict == ()
    # Shard 2 is still being read (item 5 not consumed): a shard needed now (item 6) goes past the limit, one
    # needed later waits.
    full = dict(state, present={2: (0, 100)}, last_used={2: 9}, consumed=4)
    assert fetch_decision(needs[3], cache_limit=150, **full) == type(decision)(True, (), past_limit=True)
    assert not fetch_decision(needs[6], cache_limit=150, **full).start
    # Ahead of the loader: no more than prefetch_shards held or coming; at most 4 fetches at once.
    ahead = dict(state, present={s: (0, 100) for s in (4, 5)}, in_flight={6: needs[6]}, prefetch_shards=3)
    assert not fetch_decision(needs[7], cache_limit=None, **ahead).start
    busy = dict(state, in_flight={s: needs[s] for s in (3, 4, 5, 6)})
    assert not fetch_decision(needs[7], cache_limit=None, **busy).start
    held = fetch_decision(needs[2], cache_limit=10, **state)
    assert held.start and held.evict == ()  # already here
