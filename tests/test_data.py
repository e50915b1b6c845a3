"""Data: the epoch plan (exactly-once, world-size invariance, seeking), the shard reader,
the shard writer, and reading shards written by others."""

from __future__ import annotations

import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.data import (EpochPlan, EvalStream, TrainStream, batches, decode_image, expand_pattern,
                           index_shards)
from launcher.errors import LauncherError
from launcher.registry import Plugin, PluginOptions, register
from launcher.config.load import validate_recipe
from launcher.data.transforms import ImageTransform
from tests.conftest import REPO, small_recipe, write_shards


def all_ids(plan: EpochPlan, epoch: int) -> list[list[np.ndarray]]:
    """ids[step][rank]"""
    return [[plan.rank_ids(epoch, s, r) for r in range(plan.world_size)] for s in range(plan.steps_per_epoch())]


@pytest.mark.parametrize("sizes, batch, streams, world", [
    ((400, 400, 400, 237), 32, 2, 2),
    ((400, 400, 400, 237), 32, 2, 1),
    ((10, 3, 7, 1, 50), 4, 4, 4),
    ((1000,), 64, 8, 2),
    ((5, 5), 3, 3, 3),     # a tail smaller than one sample per rank gets merged
    ((33,), 16, 2, 2),
])
def test_every_training_sample_is_used_exactly_once_per_epoch(sizes, batch, streams, world):
    plan = EpochPlan(sizes, global_batch=batch * world, streams=streams, world_size=world, seed=3)
    for epoch in range(3):
        steps = all_ids(plan, epoch)
        flat = np.concatenate([ids for step in steps for ids in step])
        assert sorted(flat.tolist()) == list(range(sum(sizes)))
        for s, per_rank in enumerate(steps):
            assert sum(len(x) for x in per_rank) == plan.global_count(epoch, s)
            assert min(len(x) for x in per_rank) >= min(2, sum(sizes) // world)  # BatchNorm needs 2
            if s < len(steps) - 1:
                assert all(len(x) == batch for x in per_rank)  # full batches except the last step


def test_epochs_differ_and_are_reproducible():
    plan = EpochPlan((400, 400, 400, 237), global_batch=64, streams=2, world_size=2, seed=0)
    first = plan.rank_ids(0, 0, 0)
    assert not np.array_equal(first, plan.rank_ids(1, 0, 0))
    again = EpochPlan((400, 400, 400, 237), global_batch=64, streams=2, world_size=2, seed=0)
    assert np.array_equal(first, again.rank_ids(0, 0, 0))
    assert not np.array_equal(first, EpochPlan((400, 400, 400, 237), 64, 2, 2, seed=1).rank_ids(0, 0, 0))


def test_global_batches_do_not_depend_on_the_number_of_processes():
    """With a fixed `streams`, 1, 2 and 4 processes train on the same global batches."""
    sizes = (400, 400, 400, 237)
    plans = {w: EpochPlan(sizes, global_batch=64, streams=4, world_size=w, seed=5) for w in (1, 2, 4)}
    for epoch in (0, 1):
        reference = [np.concatenate(step) for step in all_ids(plans[1], epoch)]
        for w in (2, 4):
            other = [np.concatenate(step) for step in all_ids(plans[w], epoch)]
            assert len(other) == len(reference)
            for a, b in zip(reference, other):
                assert np.array_equal(a, b)


def test_ranks_read_different_parts_of_the_shard_stream():
    sizes = (400, 400, 400, 237)
    plan = EpochPlan(sizes, global_batch=64, streams=2, world_size=2, seed=0)
    shard_of = np.repeat(np.arange(4), sizes)
    for epoch in range(3):
        shards = [set(), set()]
        for step in all_ids(plan, epoch):
            for rank in (0, 1):
                shards[rank] |= set(shard_of[step[rank]].tolist())
        # Each rank reads a contiguous half of the permuted shard stream: at most the one
        # shard that straddles the half-way point is read by both.
        assert len(shards[0] & shards[1]) <= 1 and len(shards[0] | shards[1]) == 4


def test_streams_must_fit_the_process_count():
    with pytest.raises(LauncherError, match="data.streams=3 must be a multiple of the number of processes"):
        EpochPlan((100,), global_batch=64, streams=3, world_size=2)


def test_shuffle_window_limits_how_far_samples_move():
    plan = EpochPlan((1000,), global_batch=10, streams=1, world_size=1, seed=0, window=100)
    order = np.concatenate([plan.rank_ids(0, s, 0) for s in range(plan.steps_per_epoch())])
    assert sorted(order.tolist()) == list(range(1000))
    assert np.all(np.abs(order - np.arange(1000)) < 100) and not np.array_equal(order, np.arange(1000))


def _recipe(digits, tmp_path, **augment):
    return validate_recipe(small_recipe(digits, tmp_path, data={"augment": augment} if augment else {}))


def _stream_batches(digits, tmp_path, num_workers, start_step=0, epoch=0, **augment):
    recipe = _recipe(digits, tmp_path, **augment)
    index = index_shards(recipe.data.train, "data.train")
    plan = EpochPlan(tuple(index.shard_sizes.tolist()), global_batch=32, streams=2, world_size=1, seed=0)
    transform = ImageTransform(recipe.data, 3, train=True)
    return list(batches(TrainStream(index, plan, transform, epoch, rank=0, start_step=start_step), num_workers))


AUGMENT = dict(crop_padding=2, rotation=10, hflip=0.5, random_erasing=0.5, auto_augment="cifar10")


def test_workers_deliver_steps_in_order_with_identical_augmentation(digits, tmp_path):
    """Random augmentation is seeded per sample, so 0 or 2 workers give bit-identical batches."""
    in_process = _stream_batches(digits, tmp_path, 0, **AUGMENT)
    two_workers = _stream_batches(digits, tmp_path, 2, **AUGMENT)
    assert [b.step_in_epoch for b in two_workers] == list(range(len(in_process)))
    for a, b in zip(in_process, two_workers):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    # ...and augmentation really is random: two epochs differ for the same sample.
    other_epoch = {int(i): img for b in _stream_batches(digits, tmp_path, 0, epoch=1, **AUGMENT)
                   for i, img in zip(b.ids, b.images)}
    first = in_process[0]
    assert not torch.equal(first.images[0], other_epoch[int(first.ids[0])])


def test_starting_mid_epoch_seeks_to_the_same_batches(digits, tmp_path):
    full = _stream_batches(digits, tmp_path, 2, **AUGMENT)
    tail = _stream_batches(digits, tmp_path, 2, start_step=17, **AUGMENT)
    assert len(tail) == len(full) - 17
    for a, b in zip(full[17:], tail):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)


def test_in_process_loading_leaves_the_training_rng_alone(digits, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _stream_batches(digits, tmp_path, 0, **AUGMENT)
    assert torch.equal(torch.rand(3), expected)


def test_evaluation_counts_every_validation_sample_exactly_once(digits, tmp_path):
    recipe = _recipe(digits, tmp_path)
    index = index_shards(recipe.data.val, "data.val")
    transform = ImageTransform(recipe.data, 3, train=False)
    for world in (1, 2, 3, 7):
        seen = []
        for rank in range(world):
            for b in batches(EvalStream(index, transform, 64, rank, world), num_workers=2 if world == 2 else 0):
                seen += b.ids.tolist()
        assert sorted(seen) == list(range(len(index))) == list(range(360))


def test_digits_writer_makes_a_stratified_80_20_split(digits):
    assert (digits["num_train"], digits["num_val"], digits["num_classes"]) == (1437, 360, 10)
    train = index_shards(digits["train"], "t")
    val = index_shards(digits["val"], "v")
    assert train.shard_sizes.tolist() == [400, 400, 400, 237]
    train_frac = np.bincount(train.labels) / len(train)
    val_frac = np.bincount(val.labels) / len(val)
    assert np.abs(train_frac - val_frac).max() < 0.01  # stratified


def test_png_and_raw_shards_hold_the_same_pixels(digits, digits_png):
    raw, png = index_shards(digits["train"], "t"), index_shards(digits_png["train"], "t")
    assert np.array_equal(raw.labels, png.labels) and png.image_exts() == {"png"} and raw.image_exts() == {"npy"}
    files_raw, files_png = {}, {}
    for i in (0, 5, 1436):
        a = decode_image(*raw.read_image(i, files_raw))
        b = decode_image(*png.read_image(i, files_png))
        assert a.shape == (1, 8, 8) and torch.equal(a, b)


@pytest.mark.parametrize("array", [np.arange(64, dtype=np.uint8).reshape(8, 8),
                                   np.arange(105, dtype=np.uint8).reshape(5, 7, 3),
                                   np.asfortranarray(np.eye(3, dtype=np.uint8))])
def test_fast_npy_reader_agrees_with_numpy(array):
    from launcher.data.stream import _read_npy

    buf = io.BytesIO()
    np.save(buf, array)
    out = _read_npy(buf.getvalue())
    assert out.dtype == array.dtype and np.array_equal(out, array)


@pytest.mark.parametrize("array", [np.ones((4, 4), np.float32), np.random.rand(4, 4), np.ones(5, np.uint8)])
def test_a_npy_image_that_is_not_uint8_pixels_is_refused(array):
    """uint8 HxW or HxWxC is the documented format: a float array was read and then mis-scaled."""
    from launcher.data.stream import _read_npy

    buf = io.BytesIO()
    np.save(buf, array)
    with pytest.raises(ValueError, match="a .npy image must be a uint8 HxW or HxWxC array"):
        _read_npy(buf.getvalue())


def test_written_shards_are_plain_webdataset(digits):
    import webdataset as wds

    samples = list(wds.WebDataset(digits["train"], shardshuffle=False).decode())
    assert len(samples) == 1437
    assert samples[0]["npy"].dtype == np.uint8 and samples[0]["npy"].shape == (8, 8)
    index = index_shards(digits["train"], "t")
    assert [int(s["cls"]) for s in samples] == index.labels.tolist()


def test_reads_shards_written_by_others_with_png_and_cls(tmp_path):
    """A tar made with the standard library only (keys with dots in folders, .png + .cls)."""
    from PIL import Image

    path = tmp_path / "foreign-0.tar"
    expected = []
    with tarfile.open(path, "w") as tar:
        for i in range(5):
            pixels = np.full((6, 7, 3), i * 40, dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % 2).encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"some.dir/sample{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            expected.append((pixels, i % 2))
    index = index_shards(str(path), "data.train")
    assert index.labels.tolist() == [0, 1, 0, 1, 0]
    files = {}
    for i, (pixels, _) in enumerate(expected):
        assert torch.equal(decode_image(*index.read_image(i, files)), torch.from_numpy(pixels).permute(2, 0, 1))


# ---------------------------------------------------------------- index files


def _same_index(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("shard_sizes", "shard_of", "offsets", "sizes", "ext_codes", "labels"))


def _no_scanning(monkeypatch):
    import launcher.data.index_files as data

    def refuse(path, key, checksum=False):
        raise AssertionError(f"scanned {path}")

    monkeypatch.setattr(data, "scan_shard", refuse)


def test_the_writer_leaves_an_index_next_to_each_shard_and_runs_read_it_instead_of_scanning(
        digits, tmp_path, monkeypatch):
    import hashlib
    import shutil

    from launcher.data import index_file_next_to

    urls = [Path(u) for u in expand_pattern(digits["train"])]
    for url in urls:
        saved = np.load(index_file_next_to(url))
        assert str(saved["sha256"]) == hashlib.sha256(url.read_bytes()).hexdigest()
        assert int(saved["shard_bytes"]) == url.stat().st_size
    scanned = index_shards(digits["train"], "t", cache_dir=str(tmp_path / "none"))  # (reads the files)
    _no_scanning(monkeypatch)
    assert _same_index(index_shards(digits["train"], "t"), scanned)
    # A shard rewritten since (another size): its index file no longer describes it, an error naming
    # both files and the command that writes the index again; once written, the run reads it.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(urls[0], copy / "a-0.tar")
    shutil.copy(index_file_next_to(urls[0]), index_file_next_to(copy / "a-0.tar"))
    shutil.copy(urls[3], copy / "a-0.tar")  # 237 samples instead of 400
    monkeypatch.undo()
    with pytest.raises(LauncherError, match=r"the index '.*a-0.tar.index.npz' does not match its shard '.*a-0.tar': "
                                            r"it records \d+ bytes, the shard has \d+\. .*launcher.shards index"):
        index_shards(str(copy / "a-0.tar"), "t", cache_dir=str(tmp_path / "c"))
    from launcher.data.writer import main

    assert main(["index", str(copy / "a-0.tar")]) == 0
    assert len(index_shards(str(copy / "a-0.tar"), "t", cache_dir=str(tmp_path / "c"))) == 237


def test_shards_of_other_tools_are_indexed_by_the_index_command_or_once_on_first_use(digits, tmp_path, monkeypatch):
    import shutil

    from launcher.data import index_file_next_to
    from launcher.data.writer import main

    urls = [Path(u) for u in expand_pattern(digits["train"])]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for i, url in enumerate(urls):
        shutil.copy(url, foreign / f"x-{i}.tar")  # no index files
    pattern = str(foreign / "x-{0..3}.tar")
    reference = index_shards(digits["train"], "t")
    # First use: scanned once and cached; the second run reads the cache.
    assert _same_index(index_shards(pattern, "t", cache_dir=str(tmp_path / "cache")), reference)
    assert not index_file_next_to(foreign / "x-0.tar").exists()  # the user's folder is left alone
    with monkeypatch.context() as m:
        _no_scanning(m)
        assert _same_index(index_shards(pattern, "t", cache_dir=str(tmp_path / "cache")), reference)
    # The index command writes the files next to the shards.
    assert main(["index", pattern]) == 0
    _no_scanning(monkeypatch)
    assert _same_index(index_shards(pattern, "t", cache_dir=str(tmp_path / "other-cache")), reference)


def test_a_local_set_is_read_from_one_cached_file_while_its_shards_are_unchanged(digits, tmp_path, monkeypatch):
    """1,282 per-shard index files cost seconds to parse: the machine's cache keeps one file for
    the whole set, used while every shard has the size and modification time it had; a shard
    touched or rewritten since is checked (or scanned) on its own, the others still come from it."""
    import os
    import shutil

    import launcher.data.index_files as index_files

    urls = [Path(u) for u in expand_pattern(digits["train"])]
    for i, url in enumerate(urls):
        shutil.copy(url, tmp_path / f"x-{i}.tar")  # no index files next to them
    pattern, cache = str(tmp_path / "x-{0..3}.tar"), str(tmp_path / "cache")
    reference = index_shards(digits["train"], "t")
    assert _same_index(index_shards(pattern, "t", cache_dir=cache), reference)
    assert len(list((tmp_path / "cache" / "index").glob("set-4-*.index.npz"))) == 1
    each = index_files._load_each_shard_index
    loaded = []
    monkeypatch.setattr(index_files, "_load_each_shard_index",
                        lambda paths, key, cache_dir: loaded.append(len(paths)) or each(paths, key, cache_dir))
    _no_scanning(monkeypatch)
    assert _same_index(index_shards(pattern, "t", cache_dir=cache), reference) and loaded == []  # the one file
    later = (tmp_path / "x-2.tar").stat().st_mtime_ns + 10**9
    os.utime(tmp_path / "x-2.tar", ns=(later, later))  # touched: its per-shard index is checked again
    assert _same_index(index_shards(pattern, "t", cache_dir=cache), reference) and loaded == [4]
    assert _same_index(index_shards(pattern, "t", cache_dir=cache), reference) and loaded == [4]  # cached again
    monkeypatch.undo()
    shutil.copy(urls[3], tmp_path / "x-0.tar")  # rewritten: 237 samples instead of 400
    assert index_shards(pattern, "t", cache_dir=cache).shard_sizes.tolist() == [237, 400, 400, 237]


def test_processes_starting_together_scan_each_shard_once(digits, tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    urls = [Path(u) for u in expand_pattern(digits["train"])]
    for i, url in enumerate(urls):
        shutil.copy(url, tmp_path / f"x-{i}.tar")
    script = ("import sys, launcher.data as data, launcher.data.index_files as d\n"
              "scan = d.scan_shard\n"
              "def counted(path, key, checksum=False):\n"
              "    open(sys.argv[3], 'a').write(f'{path}\\n')\n"
              "    return scan(path, key, checksum)\n"
              "d.scan_shard = counted\n"
              "print(len(data.index_shards(sys.argv[1], 't', cache_dir=sys.argv[2])))\n")
    args = [sys.executable, "-c", script, str(tmp_path / "x-{0..3}.tar"), str(tmp_path / "cache"),
            str(tmp_path / "scans.txt")]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["1437"] * 3
    scans = (tmp_path / "scans.txt").read_text().splitlines()
    assert sorted(scans) == sorted(str(tmp_path / f"x-{i}.tar") for i in range(4))  # each once, by one process


def test_brace_patterns_expand():
    assert expand_pattern("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_pattern("x.tar::y.tar") == ["x.tar", "y.tar"]


# ---------------------------------------------------------------- bad shards


def test_missing_shard_names_the_file(tmp_path):
    with pytest.raises(LauncherError, match=r"shard '.*nothere-0.tar' does not exist"):
        index_shards(str(tmp_path / "nothere-{0..1}.tar"), "data.train")


def test_empty_shard_is_refused(tmp_path):
    path = tmp_path / "empty.tar"
    tarfile.open(path, "w").close()
    with pytest.raises(LauncherError, match="holds no samples"):
        index_shards(str(path), "data.train")


def test_truncated_shard_is_refused_with_its_name(digits, tmp_path):
    src = Path(expand_pattern(digits["train"])[0])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2 + 100])
    with pytest.raises(LauncherError, match=r"'.*cut.tar' is truncated"):
        index_shards(str(cut), "data.train")


def test_shard_cut_exactly_between_two_samples_is_refused(digits, tmp_path):
    src = Path(expand_pattern(digits["train"])[0])
    with tarfile.open(src) as tar:
        boundary = tar.getmembers()[20].offset  # the header of the 11th sample
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[:boundary])
    with pytest.raises(LauncherError, match=r"'.*cut.tar' is truncated \(no end-of-archive marker"):
        index_shards(str(cut), "data.train")


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(LauncherError, match="junk.tar"):
        index_shards(str(path), "data.train")


def test_labels_outside_num_classes_are_refused(digits):
    with pytest.raises(LauncherError, match="label 9, outside 0..4.*model.num_classes"):
        index_shards(digits["train"], "data.train", num_classes=5)


# ---------------------------------------------------------------- other writer sources


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (20, 4, 4, 3), dtype=np.uint8), "y_train": np.arange(20) % 3,
              "x_val": rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8), "y_val": np.arange(6) % 3}
    np.savez(tmp_path / "a.npz", **{**arrays, "y_val": arrays["y_val"].astype(np.float32)})  # integral floats
    info = write_shards(tmp_path / "out", "npz", "--src", str(tmp_path / "a.npz"), "--shard-size", "8")
    index = index_shards(info["train"], "t")
    assert index.shard_sizes.tolist() == [8, 8, 4] and info["num_classes"] == 3
    assert index_shards(info["val"], "v").labels.tolist() == arrays["y_val"].tolist()
    assert torch.equal(decode_image(*index.read_image(13, {})), torch.from_numpy(arrays["x_train"][13]).permute(2, 0, 1))


def test_cifar100_source_from_the_python_pickles(tmp_path):
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": list(rng.integers(0, 100, n))}, f)
        if name == "train":
            first = data[0].reshape(3, 32, 32)
    with open(src / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    info = write_shards(tmp_path / "out", "cifar100", "--src", str(src))
    assert (info["num_train"], info["num_val"], info["classes"][3]) == (30, 10, "c3")
    index = index_shards(info["train"], "t")
    assert torch.equal(decode_image(*index.read_image(0, {})), torch.from_numpy(first))


def fake_cifar10(src: Path, n: int = 4) -> np.ndarray:
    """The CIFAR-10 python version's six batch pickles and batches.meta; returns the first image."""
    src.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(rng.integers(0, 10, n))}, f)
        if name == "data_batch_1":
            first = data[0].reshape(3, 32, 32)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"k{i}".encode() for i in range(10)]}, f)
    return first


def test_cifar10_source_from_the_python_pickles(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    first = fake_cifar10(src)
    # As published: written by Python 2's cPickle (protocol 2), labels plain ints.
    with open(src / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [1, 2, 3, 4],
                     b"batch_label": b"testing batch 1 of 1", b"filenames": [b"a.png"] * 4}, f, protocol=2)
    info = write_shards(tmp_path / "out", "cifar10", "--src", str(src))
    assert (info["num_train"], info["num_val"], info["classes"][7]) == (20, 4, "k7")
    assert torch.equal(decode_image(*index_shards(info["train"], "t").read_image(0, {})), torch.from_numpy(first))


class RunsCode:
    """A pickle that opens (creates) a file when loaded: what a hostile 'CIFAR' batch would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def cifar_damage(src: Path, marker: Path) -> dict:
    """Ways a CIFAR-10 folder comes hostile or damaged, each with the words its error must contain."""
    batch = src / "data_batch_3"

    def dump(payload):
        with open(batch, "wb") as f:
            pickle.dump(payload, f)

    rows = np.zeros((4, 3072), np.uint8)
    return {
        "runs code": (lambda: dump({b"data": RunsCode(marker), b"labels": [0] * 4}),
                      "asks to call io.open while loading, which a CIFAR file never does"),
        "code in the meta file": (lambda: (src / "batches.meta").write_bytes(pickle.dumps(RunsCode(marker))),
                                  "batches.meta' is not a readable CIFAR batch file"),
        "truncated": (lambda: batch.write_bytes(batch.read_bytes()[:700]), "is not a readable CIFAR batch file"),
        "fewer labels": (lambda: dump({b"data": rows, b"labels": [0] * 3}), "4 images but 3 labels"),
        "label 57": (lambda: dump({b"data": rows, b"labels": [0, 57, 0, 0]}), "label 57 (image 1) is outside CIFAR 10"),
        "CIFAR-100 batch": (lambda: dump({b"data": rows, b"fine_labels": [0] * 4}), "lacks ['labels']"),
        "rows of another size": (lambda: dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}),
                                 "not CIFAR's uint8 rows of 3072 values"),
    }


@pytest.mark.parametrize("case", ["runs code", "code in the meta file", "truncated", "fewer labels", "label 57",
                                  "CIFAR-100 batch", "rows of another size"])
def test_hostile_or_damaged_cifar_files_run_nothing_and_are_one_paragraph(case, tmp_path, capsys):
    from launcher.data.writer import main

    src, marker = tmp_path / "cifar-10-batches-py", tmp_path / "code-ran"
    fake_cifar10(src)
    damage, words = cifar_damage(src, marker)[case]
    damage()
    assert main(["cifar10", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err and str(src) in err, err
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, words", [
    ("fewer labels", "100 images but 50 labels"),
    ("fractional labels", "label 1.7 (image 0) is not a class number"),
    ("one-hot labels", "labels have shape (100, 3); give one class number per image"),
    ("text labels", "the labels are <U1, not integers"),
    ("negative label", "label -1 (image 7) is negative"),
    ("float images", "the images are float64, not uint8 pixels"),
    ("channels first", "the images have shape (100, 3, 4, 4)"),
    ("object array", "object arrays are not read"),
    ("not an npz", "is not an .npz file"),
])
def test_npz_arrays_that_do_not_mean_one_thing_are_refused(case, words, tmp_path, capsys):
    from launcher.data.writer import main

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (100, 4, 4, 3), dtype=np.uint8), "y_train": np.arange(100) % 3,
              "x_val": rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8), "y_val": np.arange(6) % 3}
    labels = np.arange(100) % 3
    arrays.update({
        "fewer labels": {"y_train": labels[:50]},
        "fractional labels": {"y_train": np.full(100, 1.7)},
        "one-hot labels": {"y_train": np.eye(3)[labels]},
        "text labels": {"y_train": np.array(["a"] * 100)},
        "negative label": {"y_train": np.where(np.arange(100) == 7, -1, labels)},
        "float images": {"x_train": rng.random((100, 4, 4, 3))},
        "channels first": {"x_train": rng.integers(0, 255, (100, 3, 4, 4), dtype=np.uint8)},
        "object array": {"y_train": np.array([{"a": 1}] * 100, dtype=object)},
    }.get(case, {}))
    src = tmp_path / "a.npz"
    np.savez(src, **arrays)
    if case == "not an npz":
        src.write_bytes(pickle.dumps(arrays))
    assert main(["npz", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err and str(src) in err, err
    assert not (tmp_path / "out").exists()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file as the MNIST family publishes them: big-endian magic and sizes, then uint8."""
    import gzip

    magic = 2051 if array.ndim == 3 else 2049
    data = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape)) + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_idx_folder(folder: Path, n_train=23, n_val=7, seed=0) -> dict:
    """Random 28x28 images in the four IDX files (train gzip'd, test plain: both forms occur)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_val)}
    for stem, array in arrays.items():
        write_idx(folder / stem, array, compress=stem.startswith("train"))
    return arrays


@pytest.mark.parametrize("source", ["fashion-mnist", "mnist", "kmnist"])
def test_mnist_family_sources_from_their_idx_files(source, tmp_path):
    arrays = fake_idx_folder(tmp_path / "idx")
    info = write_shards(tmp_path / "out", source, "--src", str(tmp_path / "idx"), "--shard-size", "10")
    assert (info["num_train"], info["num_val"], info["num_classes"]) == (23, 7, 10)
    assert info["classes"][9] == {"fashion-mnist": "Ankle boot", "mnist": "9", "kmnist": "wo"}[source]
    train, val = index_shards(info["train"], "t"), index_shards(info["val"], "v")
    assert train.shard_sizes.tolist() == [10, 10, 3]
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert val.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    for i in (0, 22):
        image = decode_image(*train.read_image(i, {}))
        assert image.shape == (1, 28, 28)  # grey, channel first like every decoded image
        assert torch.equal(image[0], torch.from_numpy(arrays["train-images-idx3-ubyte"][i].astype(np.uint8)))
    assert torch.equal(decode_image(*val.read_image(6, {}))[0],
                       torch.from_numpy(arrays["t10k-images-idx3-ubyte"][6].astype(np.uint8)))


def test_the_real_fashion_mnist_files_read_as_the_data_set_says():
    """The files in ../shared (Debian's dataset-fashion-mnist): 60k + 10k 28x28 images, 6,000 and
    1,000 of each class (the data set's README)."""
    from launcher.data.sources import idx_arrays

    src = REPO.parent / "shared" / "data" / "fashion-mnist"
    if not src.is_dir():
        pytest.skip(f"{src} is not on this machine")
    x_train, y_train, x_val, y_val, classes = idx_arrays(src, "fashion-mnist")
    assert x_train.shape == (60000, 28, 28, 1) and x_val.shape == (10000, 28, 28, 1)
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_val).tolist() == [1000] * 10
    assert classes[0] == "T-shirt/top" and 60 < x_train.mean() < 90  # mostly dark background, grey garments


def idx_damage(folder: Path) -> dict:
    """Ways the IDX files come damaged or mixed up, each with the words its error must contain."""
    train_images = folder / "train-images-idx3-ubyte.gz"
    good = train_images.read_bytes()
    return {
        "truncated gzip": (lambda: train_images.write_bytes(good[: len(good) // 2]), "truncated or damaged"),
        "labels for images": (lambda: train_images.write_bytes((folder / "train-labels-idx1-ubyte.gz").read_bytes()),
                              "its magic number is 2049, expected 2051"),
        "not IDX": (lambda: (train_images.unlink(), (folder / "train-images-idx3-ubyte").write_text("<html>")),
                    "is not an IDX images file"),
        "short data": (lambda: (folder / "t10k-images-idx3-ubyte").write_bytes(
            (folder / "t10k-images-idx3-ubyte").read_bytes()[:-5]), "the file is truncated or damaged"),
        "counts differ": (lambda: write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(6), compress=False),
                          "holds 7 images but t10k-labels-idx1-ubyte 6 labels"),
        "label range": (lambda: write_idx(folder / "t10k-labels-idx1-ubyte", np.full(7, 12), compress=False),
                        "has label 12, outside fashion-mnist's 10 classes"),
        "missing file": (lambda: (folder / "t10k-labels-idx1-ubyte").unlink(), "has no t10k-labels-idx1-ubyte.gz"),
    }


@pytest.mark.parametrize("case", ["truncated gzip", "labels for images", "not IDX", "short data", "counts differ",
                                  "label range", "missing file"])
def test_damaged_idx_files_are_one_paragraph_naming_the_file(case, tmp_path, capsys):
    from launcher.data.writer import main

    fake_idx_folder(tmp_path / "idx")
    damage, words = idx_damage(tmp_path / "idx")[case]
    damage()
    assert main(["fashion-mnist", "--src", str(tmp_path / "idx"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and str(tmp_path / "idx") in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "info.json").exists()


def idx_header_damage(folder: Path) -> dict:
    """IDX headers that lie, each with the words its error must contain."""
    import gzip

    def header(path: Path, *dims: int, data: bytes = b"") -> None:
        with gzip.open(path, "wb") as f:
            f.write(b"".join(int(v).to_bytes(4, "big") for v in (2051, *dims)) + data)

    images = folder / "train-images-idx3-ubyte.gz"
    return {
        "overflowing header": (lambda: header(images, 2**31, 2**31, 4, data=bytes(64)),
                               "which no images file of this family has"),
        "zero dimension": (lambda: header(images, 300, 0, 28), "(a dimension of 0)"),
        # 7 MB of data (a few KB of gzip) behind a header that promises 300 x 28 x 28 = 235 KB.
        "more data than promised": (lambda: header(images, 300, 28, 28, data=bytes(7 << 20)),
                                    "holds more than 235200 bytes of data where its header (300, 28, 28) promises"),
    }


@pytest.mark.parametrize("case", ["overflowing header", "zero dimension", "more data than promised"])
def test_idx_headers_that_lie_are_refused_reading_no_more_than_they_promise(case, tmp_path, capsys):
    import tracemalloc

    from launcher.data.writer import main

    fake_idx_folder(tmp_path / "idx")
    damage, words = idx_header_damage(tmp_path / "idx")[case]
    damage()
    tracemalloc.start()
    try:
        assert main(["fashion-mnist", "--src", str(tmp_path / "idx"), "--out", str(tmp_path / "out")]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "train-images-idx3-ubyte.gz" in err, err
    assert peak < 3 << 20, f"{peak / 2**20:.1f} MiB held to refuse the file"  # not the 7 MB decompressed whole
    assert not (tmp_path / "out").exists()


def test_mnist_family_without_src_names_debians_folder(tmp_path, capsys):
    from launcher.data.sources import IDX_DEFAULT_SRC
    from launcher.data.writer import main

    if IDX_DEFAULT_SRC["kmnist"].is_dir():
        pytest.skip("this machine has /usr/share/datasets/kmnist")
    assert main(["kmnist", "--out", str(tmp_path / "out")]) == 2
    assert "kmnist needs --src (the folder of its four IDX files" in capsys.readouterr().err


def test_imagefolder_source(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((5, 5, 3), i, np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
    info = write_shards(tmp_path / "out", "imagefolder", "--src", str(tmp_path / "src"), "--format", "keep")
    assert info["classes"] == ["cat", "dog"] and info["num_train"] + info["num_val"] == 10
    index = index_shards(info["train"], "t")
    assert index.image_exts() == {"png"} and sorted(set(index.labels.tolist())) == [0, 1]


def test_the_writer_never_deletes_data_it_was_not_asked_to_replace(digits, tmp_path, capsys):
    """An existing data set is replaced only with --force, whole (written beside, then swapped in: a
    write that fails leaves the old one as it was); a folder holding anything else never is."""
    from PIL import Image

    from launcher.data.writer import main

    out = tmp_path / "digits"
    write_shards(out, "digits")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def refused(*args, words):
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err

    fake_idx_folder(tmp_path / "idx", n_train=23)
    refused("fashion-mnist", "--src", str(tmp_path / "idx"), "--out", str(out), words="Add --force to replace it")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A replacement that fails half-way (an unreadable image after good ones) leaves the old set as it was.
    for c in ("cat", "dog"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((5, 5, 3), i, np.uint8)).save(tmp_path / "photos" / c / f"{i}.png")
    (tmp_path / "photos" / "dog" / "5.png").write_bytes(b"not a png")
    refused("imagefolder", "--src", str(tmp_path / "photos"), "--out", str(out), "--force",
            words="5.png' is not a readable image")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "idx", "photos"]  # no half-written folder left
    # --force replaces the whole set: no digits shard is left beside the new ones.
    assert main(["fashion-mnist", "--src", str(tmp_path / "idx"), "--out", str(out), "--force",
                 "--shard-size", "10"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["source"] == "fashion-mnist" and sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert index_shards(info["train"], "t").shard_sizes.tolist() == [10, 10, 3]
    # A folder that holds anything the writer did not write is not replaced, even with --force.
    (out / "notes.txt").write_text("mine")
    refused("digits", "--out", str(out), "--force", words="holds notes.txt, which this writer did not write")
    assert (out / "notes.txt").read_text() == "mine" and (out / "info.json").exists()
    # --out at a file, or under one: one line each.
    refused("digits", "--out", str(out / "notes.txt"), words="notes.txt' is a file, not a folder")
    refused("digits", "--out", str(out / "notes.txt" / "sub"), words="notes.txt' is a file, not a folder")
    refused("digits", "--out", str(tmp_path / ("a" * 300) / "x"), words="is too long for the file system")


def test_imagefolder_output_inside_its_source_is_refused(tmp_path, capsys):
    """Written into the image folder, the shards' folder became a class the next time
    (classes [cat, dog, shards]), and a name sorting earlier would shift every label."""
    from PIL import Image

    from launcher.data.writer import main

    for c in ("cat", "dog"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((5, 5, 3), i, np.uint8)).save(tmp_path / "photos" / c / f"{i}.png")
    for out in (tmp_path / "photos" / "shards", tmp_path / "photos"):
        assert main(["imagefolder", "--src", str(tmp_path / "photos"), "--out", str(out)]) == 2
        assert "is inside --src" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat", "dog"]


def _tar_with(tmp_path, members: list[tuple[str, bytes]]) -> Path:
    import io as _io

    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
    return path


def test_a_repeated_sample_key_is_refused_naming_shard_and_key(tmp_path):
    img = _npy_bytes(np.zeros((4, 4), np.uint8))
    path = _tar_with(tmp_path, [("a.npy", img), ("a.cls", b"1"), ("b.npy", img), ("b.cls", b"2"),
                                ("a.npy", img), ("a.cls", b"3")])
    with pytest.raises(LauncherError, match=r"odd.tar' holds sample key 'a' twice"):
        index_shards(str(path), "data.train")


@pytest.mark.parametrize("label", [b"1" * 23, b"\xff\xfe"], ids=["23 digits", "not UTF-8"])
def test_a_label_too_large_for_any_class_is_refused(tmp_path, label):
    path = _tar_with(tmp_path, [("a.npy", _npy_bytes(np.zeros((4, 4), np.uint8))), ("a.cls", label)])
    with pytest.raises(LauncherError, match=r"sample 'a' in shard .* label that is not a class number"):
        index_shards(str(path), "data.train")


def _npy_bytes(array) -> bytes:
    import io as _io

    buffer = _io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@register("test_spoil_shard")
class _SpoilShard(Plugin):
    """At the end of epoch 0, damages every image of the training shards in place (as if the files
    were replaced while the run was training)."""

    class Options(PluginOptions):
        how: str = "garbage"

    def on_epoch_end(self, ctx) -> None:
        if ctx.epoch != 1:
            return
        index = ctx.train_index
        for i in range(len(index)):
            with open(index.paths[int(index.shard_of[i])], "r+b") as f:
                f.seek(int(index.offsets[i]))
                f.write(b"\x93NUMPY\x01\x00\x46\x00{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999, 99999999999), }"
                        if self.options.how == "npy header" else b"not an image at all")


@pytest.mark.parametrize("fmt, how, workers", [("png", "garbage", 1), ("raw", "npy header", 0)])
def test_data_that_goes_bad_during_training_names_shard_and_sample_and_marks_the_run_failed(
        digits, digits_png, tmp_path, fmt, how, workers):
    import shutil

    from launcher.loop import train
    from launcher.config.load import validate_recipe
    from tests.conftest import small_recipe

    info = digits_png if fmt == "png" else digits
    copy = tmp_path / "shards"
    shutil.copytree(Path(expand_pattern(info["train"])[0]).parent, copy)
    pattern = str(copy / Path(info["train"]).name)
    raw = small_recipe(info, tmp_path / "run", train={"epochs": 2}, data={"train": pattern, "val": None,
                                                                         "num_workers": workers},
                       plugins={"test_spoil_shard": {"how": how}})
    with pytest.raises(LauncherError, match=r"shard '.*train-00000\d\.tar', sample 'train\d+' \(member 'train\d+\."
                                            r"(png|npy)' at byte \d+\) cannot be read: .*rewrite or re-download"):
        train(validate_recipe(raw))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "cannot be read" in status["error"]


def test_a_process_that_keeps_a_training_error_still_exits_with_its_loader_workers(digits, tmp_path):
    """Loader workers ignore SIGTERM (Slurm's stop signal must not kill them before the checkpoint),
    so a DataLoader left suspended by an error must be stopped by the launcher: multiprocessing's
    exit handler would send SIGTERM and wait forever. Seen as a test session that never exited."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    raw = small_recipe(digits, tmp_path / "run", data={"num_workers": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    script = ("import sys, yaml\n"
              "import launcher.data.stream\n"
              "from launcher.errors import LauncherError\n"
              "from launcher.loop import train\n"
              "from launcher.config.load import validate_recipe\n"
              "def broken(data, ext, **_):\n"
              "    raise ValueError('not an image')\n"
              "launcher.data.stream.decode_image = broken  # in the workers too (forked)\n"
              "try:\n"
              "    train(validate_recipe(yaml.safe_load(open(sys.argv[1]))))\n"
              "except LauncherError as err:\n"
              "    kept = err  # held until exit, with the loader in its traceback\n"
              "print('raised:', kept, flush=True)\n")
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "cannot be read: ValueError: not an image" in done.stdout, done.stderr[-2000:]


def test_a_loader_worker_is_quiet_about_an_abandoned_handover_only():
    """In a worker (after _prepare_worker), the traceback multiprocessing's resource-sharer thread
    prints when the training process drops a batch hand-over (Ctrl-C) is silenced; any other
    error still prints."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = ("import sys\n"
              "from launcher.data.loader import _prepare_worker\n"
              "_prepare_worker(0)\n"
              "for error in (ConnectionResetError('peer gone'), EOFError(), ValueError('real problem')):\n"
              "    try:\n"
              "        raise error\n"
              "    except BaseException:\n"
              "        sys.excepthook(*sys.exc_info())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ValueError: real problem" in done.stderr
    assert "ConnectionResetError" not in done.stderr and "EOFError" not in done.stderr


# ---------------------------------------------------------------- hostile index files (issue 29)


def _index_of(shard: str) -> dict:
    with np.load(shard + ".index.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _shard_with_index(tmp_path, source: str, name: str, index: dict) -> Path:
    import shutil

    shard = tmp_path / f"{name}.tar"
    shutil.copy(source, shard)
    with open(str(shard) + ".index.npz", "wb") as f:
        np.savez(f, **index)
    return shard


def test_an_index_that_leaves_out_samples_or_is_malformed_is_one_clear_error(digits, tmp_path):
    """An index listing the first 10 samples (the shard's true size and SHA-256 kept) trained on
    10 samples; a 1-element array where a scalar belongs, sizes shorter than offsets, or no samples
    at all were a TypeError / IndexError / a loader worker's RuntimeError."""
    source = expand_pattern(digits["train"])[0]
    good = _index_of(source)
    n = len(good["labels"])
    first10 = {**good, **{k: good[k][:10] for k in ("offsets", "sizes", "ext_codes", "labels")}}
    last10 = {**good, **{k: good[k][-10:] for k in ("offsets", "sizes", "ext_codes", "labels")}}
    cases = {
        "first10": (first10, "does not match its shard .*more samples after the index's last one .*the index "
                             "lists 10"),
        "last10": (last10, "does not match its shard .*before the index's first sample"),
        "version_array": ({**good, "version": np.asarray([1])}, "cannot be used: its 'version' is not a single number"),
        "bytes_array": ({**good, "shard_bytes": np.asarray([1, 2])}, "its 'shard_bytes' is not a single number"),
        "short_sizes": ({**good, "sizes": good["sizes"][:-1]}, f"its 'sizes' has {n - 1} entries, 'offsets' has {n}"),
        "empty": ({**good, **{k: good[k][:0] for k in ("offsets", "sizes", "ext_codes", "labels")}},
                  "it lists no samples"),
        "float_offsets": ({**good, "offsets": good["offsets"].astype(float)}, "'offsets' is not a list of whole"),
        "past_the_end": ({**good, "sizes": good["sizes"] * 1000}, "do not describe members of a"),
        "bad_ext": ({**good, "ext_codes": good["ext_codes"] + 50}, "no known image type"),
    }
    for name, (index, message) in cases.items():
        shard = _shard_with_index(tmp_path, source, name, index)
        with pytest.raises(LauncherError, match=message) as err:
            index_shards(str(shard), "data.train", cache_dir=str(tmp_path / "cache"))
        text = str(err.value)
        assert f"'{shard}.index.npz'" in text and f"python -m launcher.shards index '{shard}'" in text, name
    # Not an index at all (a web page saved under its name): said so, not "rewritten" or "pickled".
    shard = _shard_with_index(tmp_path, source, "html", good)
    Path(str(shard) + ".index.npz").write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    with pytest.raises(LauncherError, match=r"cannot be used: it is not a shard index file: it is a web page \(HTML\)"):
        index_shards(str(shard), "data.train", cache_dir=str(tmp_path / "cache"))
    # The unchanged index still works, and a run's whole shard stays covered.
    shard = _shard_with_index(tmp_path, source, "fine", good)
    assert len(index_shards(str(shard), "data.train", cache_dir=str(tmp_path / "cache"))) == n


def test_the_index_command_on_hostile_shards(tmp_path, capsys):
    """Truncated and non-tar files are refused naming them; a member path with `..` is indexed as
    a sample key and nothing is written outside the shard's folder (members are never extracted)."""
    from launcher.data.writer import main as shards_main

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    np.save(buf, np.full((4, 4), 7, np.uint8))
    folder = tmp_path / "deep" / "shards"
    folder.mkdir(parents=True)
    with tarfile.open(folder / "dotdot.tar", "w") as tar:
        add(tar, "../../escaped/a.npy", buf.getvalue())
        add(tar, "../../escaped/a.cls", b"1")
        add(tar, "b.npy", buf.getvalue())
        add(tar, "b.cls", b"2")
    (folder / "text.tar").write_bytes(b"not a tar " * 300)
    (folder / "cut.tar").write_bytes((folder / "dotdot.tar").read_bytes()[:1500])
    before = sorted(p for p in tmp_path.rglob("*"))
    assert shards_main(["index", str(folder / "dotdot.tar")]) == 0
    assert sorted(p for p in tmp_path.rglob("*")) == sorted(before + [folder / "dotdot.tar.index.npz"])
    index = index_shards(str(folder / "dotdot.tar"), "t")
    assert index.labels.tolist() == [1, 2] and decode_image(*index.read_image(0, {}))[0, 0, 0] == 7
    for name, message in (("text.tar", "is not a readable tar file"), ("cut.tar", "is truncated")):
        capsys.readouterr()
        assert shards_main(["index", str(folder / name)]) == 2
        err = capsys.readouterr().err
        assert f"shard '{folder / name}' {message}" in err and "Traceback" not in err
        assert not (folder / f"{name}.index.npz").exists()


@pytest.mark.parametrize("workers", ["per-pass", "persistent"])
def test_loader_workers_never_finalise_the_training_process_garbage(digits, tmp_path, workers):
    """A loader worker is a fork: its collections must not run the finalisers of the training
    process's garbage. A gloo process group's destructor there waits for threads that exist only in
    the parent (a worker hung, or aborted with std::system_error). Workers fork with the parent's
    objects frozen (gc.freeze)."""
    from tests.conftest import run_cli

    recipe = small_recipe(digits, tmp_path)
    result = run_cli([sys.executable, str(REPO / "tests" / "fork_garbage.py"), json.dumps(recipe), workers],
                     timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["steps", str(len(_stream_batches(digits, tmp_path, 0)))]
