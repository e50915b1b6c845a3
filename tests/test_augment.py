"""data.augment_on: device: the augmentation and normalisation on whole batches.

Given the same parameters, the batched ops equal torchvision's and timm's per-sample ops bit for
bit; the parameters are distributed as torchvision's and timm's draws are; each sample's draws
depend on its own key only, so batches do not depend on the rank count, the worker count or
where a resumed run starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from launcher.data import EpochPlan, TrainStream, batches, index_shards, on_device
from launcher.data.augment import BatchAugment, erase_by_copies, erase_by_mask, pixel_normals, sample_keys
from launcher.errors import LauncherError
from launcher.config.recipe import AugmentSection
from launcher.config.load import validate_recipe
from launcher.data.transforms import ImageTransform
from tests.conftest import small_recipe

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def per_sample_reference(image: torch.Tensor, params: dict, i: int, padding: int, mean, std) -> torch.Tensor:
    """Today's per-sample ops (torchvision v2 functionals, timm's erasing assignment) with sample
    i's parameters."""
    c, h, w = image.shape
    out = image
    if padding:
        out = F.crop(F.pad(out, [padding] * 4, fill=0), int(params["crop"][i, 0]), int(params["crop"][i, 1]), h, w)
    if bool(params["flip"][i]):
        out = F.horizontal_flip(out)
    out = F.normalize(F.to_dtype(out, torch.float32, scale=True), mean, std)
    on, top, left, eh, ew = (int(v) for v in params["erase"][i])
    if on:
        noise = pixel_normals(params["key"][i:i + 1], c, h, w)[0]
        out = out.clone()
        out[:, top:top + eh, left:left + ew] = noise[:, top:top + eh, left:left + ew]  # timm: img[:, t:t+h, l:l+w] = ...
    return out


@pytest.mark.parametrize("channels, size, padding", [(3, 32, 4), (1, 28, 2), (3, 20, 0)])
def test_batched_ops_equal_the_per_sample_ops_bit_for_bit_given_the_same_parameters(channels, size, padding):
    augment = AugmentSection(crop_padding=padding, hflip=0.5, random_erasing=0.5)
    mean, std = MEAN[:channels], STD[:channels]
    batched = BatchAugment(augment, size, mean, std)
    images = torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = batched.params(sample_keys(7, 3, np.arange(64)), size, size)
    assert params["flip"].any() and not params["flip"].all() and params["erase"][:, 0].any()
    expected = torch.stack([per_sample_reference(images[i], params, i, padding, mean, std) for i in range(64)])
    got = batched.apply(images, params)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # channels_last batches (CUDA runs with amp) come back channels_last, with the same values
    nhwc = batched.apply(images.contiguous(memory_format=torch.channels_last), params)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, expected)


@pytest.mark.parametrize("channels, size, n", [(3, 32, 64), (3, 600, 3)])  # 600 px: larger than the noise table
def test_erasing_by_copies_on_the_cpu_equals_the_mask_that_cuda_uses(channels, size, n):
    """The CPU copies each rectangle from its noise window; CUDA blends the windows in under one
    mask. The test above checks the CPU's against timm's assignment; this one checks CUDA's against
    the CPU's, both run here."""
    batched = BatchAugment(AugmentSection(random_erasing=1.0), size, MEAN[:channels], STD[:channels])
    params = batched.params(sample_keys(5, 1, np.arange(n)), size, size)
    chosen = params["erase"][:, 0].nonzero().squeeze(1)
    assert len(chosen) == n  # every sample erased
    rectangles, keys = params["erase"][chosen, 1:], params["key"][chosen]
    images = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))
    by_copies = erase_by_copies(images.clone(), chosen, rectangles, keys)
    assert torch.equal(by_copies, erase_by_mask(images.clone(), chosen, rectangles, keys))
    assert (by_copies != images).sum() > 0.01 * images.numel()
    # a batch that is a view into a larger tensor (its storage starts before it) is erased the same
    larger = torch.cat([torch.zeros(1, channels, size, size), images])
    assert torch.equal(erase_by_copies(larger[1:], chosen, rectangles, keys), by_copies)
    assert torch.equal(larger[0], torch.zeros(channels, size, size))


def test_parameters_are_distributed_as_torchvisions_and_timms_draws():
    """Flip rate, crop offsets (uniform over 0..2p) and timm's erasing rectangle (area, aspect,
    position) against the per-sample ops' own draws: two-sample KS tests that fail on a wrong
    distribution (checked by breaking it: an area range of (0.02, 0.4) fails)."""
    import random

    from scipy.stats import ks_2samp
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import v2

    n, size = 20000, 32
    augment = AugmentSection(crop_padding=4, hflip=0.3, random_erasing=0.6)
    params = BatchAugment(augment, size, MEAN, STD).params(sample_keys(0, 0, np.arange(n)), size, size)
    flips, crops = params["flip"].numpy(), params["crop"].numpy()
    assert abs(flips.mean() - 0.3) < 0.015
    counts = np.bincount(crops.ravel(), minlength=9)
    assert counts.shape == (9,) and (abs(counts / counts.sum() - 1 / 9) < 0.01).all()  # uniform over 0..8
    # torchvision's RandomCrop offsets, drawn the per-sample way
    crop = v2.RandomCrop(size, padding=4)
    torch.manual_seed(0)
    tv_tops = [crop.make_params([torch.zeros(3, size, size)])["top"] for _ in range(3000)]
    assert ks_2samp(crops[:3000, 0], tv_tops).pvalue > 0.001
    # timm's RandomErasing, its rectangles recorded from the images it erases (zeros in ones)
    random.seed(0)
    torch.manual_seed(0)
    eraser = RandomErasing(probability=0.6, mode="const", device="cpu")
    timm_rects = []
    for _ in range(4000):
        img = torch.ones(1, size, size)
        eraser(img)
        zero = (img[0] == 0).nonzero()
        if len(zero):
            top, left = zero.min(0).values.tolist()
            bottom, right = zero.max(0).values.tolist()
            timm_rects.append((top, left, bottom - top + 1, right - left + 1))
    timm_rects = np.array(timm_rects)
    ours = params["erase"].numpy()
    ours = ours[ours[:, 0] == 1][:, 1:]
    assert abs(len(ours) / n - 0.6) < 0.015 and abs(len(timm_rects) / 4000 - 0.6) < 0.03
    for column, name in enumerate(("top", "left", "height", "width")):
        assert ks_2samp(ours[:4000, column], timm_rects[:, column]).pvalue > 0.001, name
    areas = ours[:, 2] * ours[:, 3] / size ** 2
    assert areas.min() >= 0.015 and areas.max() <= 0.36
    # the noise: standard normal values, different per sample and per position
    noise = pixel_normals(params["key"][:200], 3, size, size)
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    assert not torch.equal(noise[0], noise[1])


def _augmented(index, plan, transform, epoch=0, start_step=0, rank=0, num_workers=0) -> dict[int, torch.Tensor]:
    """sample id -> its augmented image, over the steps a stream yields."""
    out = {}
    stream = TrainStream(index, plan, transform, epoch, rank, start_step)
    for batch in on_device(batches(stream, num_workers), torch.device("cpu"), torch.contiguous_format,
                           transform.finish):
        for i, image in zip(batch.ids.tolist(), batch.images):
            out[i] = image
    return out


# every op with a batched form but the resized crop (its own test below)
EVERY_OP = {"crop_padding": 2, "hflip": 0.5, "rotation": 10, "color_jitter": 0.4, "auto_augment": "cifar10",
            "random_erasing": 0.5}


def test_each_samples_augmentation_depends_on_its_key_only(digits, tmp_path):
    """1 or 2 ranks, 0 or 2 loader workers, a stream started mid-epoch: the same sample gets the
    same augmented pixels; another epoch gets other draws."""
    recipe = validate_recipe(small_recipe(digits, tmp_path, data={
        **small_recipe(digits, tmp_path)["data"], "augment_on": "device",
        "augment": EVERY_OP}))
    transform = ImageTransform(recipe.data, 3, train=True, batched=True)
    assert transform.batch_augment is not None and transform.erase is None
    index = index_shards(recipe.data.train, "t")

    def plan(world):
        return EpochPlan(tuple(index.shard_sizes.tolist()), global_batch=64, streams=2, world_size=world, seed=0)

    one = _augmented(index, plan(1), transform)
    assert len(one) == 1437
    two = {**_augmented(index, plan(2), transform, rank=0), **_augmented(index, plan(2), transform, rank=1)}
    workers = _augmented(index, plan(1), transform, num_workers=2)
    resumed = _augmented(index, plan(1), transform, start_step=7)
    assert two.keys() == one.keys() and all(torch.equal(two[i], one[i]) for i in one)
    assert all(torch.equal(workers[i], one[i]) for i in one)
    assert resumed and all(torch.equal(resumed[i], one[i]) for i in resumed)
    other_epoch = _augmented(index, plan(1), transform, epoch=1)
    assert sum(not torch.equal(other_epoch[i], one[i]) for i in one) > 1000


def test_a_run_with_device_augmentation_resumes_exactly(digits, tmp_path):
    """The loop with data.augment_on: device, stopped after a checkpoint and relaunched: the same
    weights and rows as an uninterrupted run; --check says which path a recipe takes."""
    import shutil

    from launcher.loop import train
    from tests.conftest import metric_rows

    def recipe(run, max_steps, on="device"):
        raw = small_recipe(digits, run, train={"epochs": 2, "max_steps": max_steps},
                           plugins={"checkpoint": {"every_steps": 10}})
        raw["data"].update(augment_on=on, augment=EVERY_OP)
        return validate_recipe(raw)

    train(recipe(tmp_path / "straight", 50))
    train(recipe(tmp_path / "stopped", 25))
    shutil.rmtree(tmp_path / "stopped" / "checkpoints" / "step-00000025")  # killed after step 25's row
    train(recipe(tmp_path / "stopped", 50))
    assert metric_rows(tmp_path / "stopped") == metric_rows(tmp_path / "straight")
    assert (tmp_path / "stopped" / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "final" / "model.safetensors").read_bytes()
    # The draws differ between the paths: a run keeps the one it started with.
    with pytest.raises(LauncherError, match="data.augment_on"):
        train(recipe(tmp_path / "stopped", 60, on="loader"))


def test_device_augmentation_with_an_op_it_lacks_is_refused_and_check_names_the_path(digits, tmp_path, capsys):
    from launcher.__main__ import main
    from tests.conftest import REPO

    raw = small_recipe(digits, tmp_path)
    raw["data"].update(augment_on="device", augment={"crop_padding": 2, "auto_augment": "rand-m9-mstd0.5"})
    with pytest.raises(LauncherError, match=r"data.augment_on=device: data.augment.auto_augment has no batched form "
                                            r"\('rand-m9-mstd0.5' is a timm string\) .*cifar10.*"
                                            r"Set data.augment_on=loader"):
        validate_recipe(raw)
    base = [f"data.train={digits['train']}", f"data.val={digits['val']}"]
    assert main(["--check", str(REPO / "recipes" / "digits.yaml"), *base, "data.augment_on=device"]) == 0
    assert "# training augmentation runs on the device: data.augment_on: device" in capsys.readouterr().out
    assert main(["--check", str(REPO / "recipes" / "digits.yaml"), *base]) == 0  # crop + rotation: batched
    assert "runs on the device: augmentation and normalisation on the whole batch (data.augment_on: auto, every " \
           "op of data.augment has a batched form)" in capsys.readouterr().out
    assert main(["--check", str(REPO / "recipes" / "digits.yaml"), *base, "data.augment.auto_augment=original"]) == 0
    assert "runs on the loader: per sample in the loader workers (data.augment_on: auto, data.augment.auto_augment " \
           "has no batched form ('original' is a timm string))" in capsys.readouterr().out


def test_augment_on_auto_takes_the_device_when_every_op_is_batched_and_a_run_keeps_its_path(digits, tmp_path):
    """The default: whole batches on the device when every op has a batched form, else the loader.
    A run directory keeps the path its run started with (an upgrade does not change a run's draws
    mid-run): one written before the key existed ran on the loader, and its checkpoints resume."""
    import yaml

    from launcher.config.recipe import schema_default
    from launcher.checkpoints import recipe_differences

    def resolved(run_dir: Path, augment: dict) -> str:
        raw = small_recipe(digits, run_dir)
        raw["data"]["augment"] = augment
        return validate_recipe(raw).data.augment_on

    assert resolved(tmp_path / "a", {"crop_padding": 2, "hflip": 0.5, "random_erasing": 0.25}) == "device"
    assert resolved(tmp_path / "b", {}) == "device"  # normalisation alone
    assert resolved(tmp_path / "c", {"crop_padding": 2, "auto_augment": "rand-m9-mstd0.5"}) == "loader"
    assert resolved(tmp_path / "d", {"rotation": 10, "color_jitter": 0.4, "auto_augment": "trivialaugment"}) == "device"
    # A resized crop cuts photos of differing sizes: auto leaves it on the loader, device is allowed.
    assert resolved(tmp_path / "e", {"random_resized_crop": True}) == "loader"
    # A run that started before the key existed: its recipe.yaml lacks it; it ran on the loader.
    old_run = tmp_path / "old"
    old_run.mkdir()
    saved = small_recipe(digits, old_run)
    saved["data"]["augment"] = {"crop_padding": 2}
    (old_run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    current = small_recipe(digits, old_run)
    current["data"]["augment"] = {"crop_padding": 2}
    recipe = validate_recipe(current)
    assert recipe.data.augment_on == "loader" and schema_default("data.augment_on") == "loader"
    saved_resolved = {**recipe.to_dict(), "data": {k: v for k, v in recipe.to_dict()["data"].items()
                                                   if k != "augment_on"}}
    assert recipe_differences(saved_resolved, recipe.to_dict()) == []  # its checkpoints resume
    # Switching paths mid-run is refused (the draws differ): the checkpoint check names the key.
    current["data"]["augment_on"] = "device"
    assert recipe_differences(saved_resolved, validate_recipe(current).to_dict()) == [
        "data.augment_on: 'loader' -> 'device'"]
    # An op without a batched form takes the loader even in a run that started on the device.
    (old_run / "recipe.yaml").write_text(yaml.safe_dump({**saved, "data": {**saved["data"], "augment_on": "device"}}))
    assert resolved(old_run, {"crop_padding": 2, "auto_augment": "original"}) == "loader"


def _through_policy(transform, image, steps):
    """torchvision's per-sample policy op (the call its forward() makes) for each (op, magnitude)."""
    for op, magnitude in steps:
        image = transform._apply_image_or_video_transform(image, op, magnitude, interpolation=transform.interpolation,
                                                          fill=transform._fill)
    return image


@pytest.mark.parametrize("channels", [1, 3])
def test_rotation_jitter_policies_and_resized_crops_equal_torchvisions_per_sample_ops(channels):
    """Given each sample's parameters: rotation, colour jitter (its own order and factors) and the
    five policies equal torchvision's per-sample kernels bit for bit; the resized crop is within one
    grey level (torchvision resizes uint8 in fixed point), for crops that upscale and that shrink."""
    from launcher.data.augment import color_jitter, resized_crops, rotations
    from launcher.data.augment_policy import BatchPolicy

    n, size = 96, 32
    mean, std = MEAN[:channels], STD[:channels]
    generator = torch.Generator().manual_seed(channels)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    keys = sample_keys(3, 1, np.arange(n))

    params = BatchAugment(AugmentSection(rotation=40), size, mean, std).params(keys, size, size)
    expected = torch.stack([F.rotate(images[i], float(params["angle"][i]), fill=0) for i in range(n)])
    assert torch.equal(rotations(images, params["angle"]), expected)

    draws = BatchAugment(AugmentSection(color_jitter=0.5), size, mean, std).params(keys, size, size)["jitter"]
    assert len({tuple(row) for row in draws[:, :3].tolist()}) == 6  # every order occurs
    kernels = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    expected = []
    for i in range(n):
        image = images[i]
        for which in draws[i, :3].long().tolist():
            image = kernels[which](image, float(draws[i, 3 + which]))
        expected.append(image)
    assert torch.equal(color_jitter(images, draws), torch.stack(expected))

    for name in ("cifar10", "imagenet", "svhn", "randaugment", "trivialaugment"):
        policy = BatchPolicy(name)
        params = BatchAugment(AugmentSection(auto_augment=name), size, mean, std).params(keys, size, size)
        steps = [[(policy.ops[op], magnitude) for op, magnitude in zip(ops, magnitudes) if op >= 0]
                 for ops, magnitudes in zip(params["policy_op"].tolist(), params["policy_magnitude"].tolist())]
        expected = torch.stack([_through_policy(policy.transform, images[i], steps[i]) for i in range(n)])
        assert torch.equal(policy.apply(images, params), expected), name

    # resized crops from images of the output's size (upscaling) and from larger ones (some shrink)
    for height, width in [(size, size), (48, 40)]:
        source = torch.randint(0, 256, (n, channels, height, width), dtype=torch.uint8, generator=generator)
        boxes = BatchAugment(AugmentSection(random_resized_crop=True), size, mean, std).params(
            keys, height, width)["resized_crop"]
        expected = torch.stack([F.resized_crop(source[i], *boxes[i].tolist(), [size, size], antialias=True)
                                for i in range(n)])
        difference = (resized_crops(source, boxes, size).int() - expected.int()).abs()
        assert difference.max() <= 1 and (difference == 0).float().mean() > 0.5

    # the whole chain, as ImageTransform's per-sample ops run it, then normalisation and erasing
    augment = AugmentSection(**EVERY_OP)
    batched = BatchAugment(augment, size, mean, std)
    params = batched.params(keys, size, size)
    policy = BatchPolicy("cifar10")
    reference = []
    for i in range(n):
        image = F.crop(F.pad(images[i], [2] * 4, fill=0), int(params["crop"][i, 0]), int(params["crop"][i, 1]),
                       size, size)
        image = F.horizontal_flip(image) if bool(params["flip"][i]) else image
        image = F.rotate(image, float(params["angle"][i]), fill=0)
        image = color_jitter(image[None], params["jitter"][i:i + 1])[0]  # checked against torchvision above
        steps = [(policy.ops[op], magnitude) for op, magnitude in
                 zip(params["policy_op"][i].tolist(), params["policy_magnitude"][i].tolist()) if op >= 0]
        image = _through_policy(policy.transform, image, steps)
        reference.append(image)
    reference = torch.stack(reference)
    unflipped = {**params, "flip": torch.zeros_like(params["flip"])}  # cropped and flipped above
    expected = torch.stack([per_sample_reference(reference[i], unflipped, i, 0, mean, std) for i in range(n)])
    assert torch.equal(batched.apply(images, params), expected)


def _same_distribution(ours: list, theirs: list, merge_below: int = 10) -> bool:
    """A chi-square test of two samples of categories (rare ones pooled) at the 0.001 level."""
    from collections import Counter

    from scipy.stats import chi2_contingency

    a, b = Counter(ours), Counter(theirs)
    common = [c for c in set(a) | set(b) if a[c] + b[c] >= merge_below]
    table = [[a[c] for c in common] + [sum(a.values()) - sum(a[c] for c in common)],
             [b[c] for c in common] + [sum(b.values()) - sum(b[c] for c in common)]]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    return chi2_contingency(table).pvalue > 0.001


@pytest.mark.parametrize("name", ["cifar10", "imagenet", "svhn", "randaugment", "trivialaugment"])
def test_policy_draws_are_distributed_as_torchvisions_per_sample_policy(name, monkeypatch):
    """Which ops a sample goes through, in which order, with which signed magnitude: our per-sample
    draws against torchvision's own forward() (its op calls recorded), by a chi-square test that
    fails on a wrong distribution: skewed uniforms (u ** 1.3) fail it."""
    from torchvision.transforms import v2

    from launcher.data.augment import uniforms
    from launcher.data.augment_policy import BatchPolicy

    n, size = 20000, 32
    policy = BatchPolicy(name)

    def ours(u):
        params = policy.params(u, size, size)
        return [tuple((policy.ops[op], magnitude) for op, magnitude in zip(ops, magnitudes) if op >= 0)
                for ops, magnitudes in zip(params["policy_op"].tolist(), params["policy_magnitude"].tolist())]

    u = uniforms(sample_keys(0, 0, np.arange(n)), 8)
    calls = []
    monkeypatch.setattr(type(policy.transform), "_apply_image_or_video_transform",
                        lambda self, image, op, magnitude, **_: calls.append((op, magnitude)) or image)
    theirs = []
    torch.manual_seed(0)
    image = torch.zeros(1, size, size, dtype=torch.uint8)
    for _ in range(n):
        calls.clear()
        policy.transform(image)
        theirs.append(tuple(calls))
    if name == "randaugment":
        assert isinstance(policy.transform, v2.RandAugment) and all(len(t) == 2 for t in theirs)
    assert _same_distribution(ours(u), theirs)
    assert not _same_distribution(ours(u ** 1.3), theirs)  # the test sees a skewed draw


def test_rotation_jitter_and_resized_crop_draws_are_distributed_as_torchvisions():
    """Angles, jitter factors and order, and resized-crop boxes (top, left, height, width, from an
    image of the output's size and from a larger, oblong one) against torchvision's make_params:
    KS and chi-square tests that fail on a wrong distribution (a scale range of (0.2, 1) fails)."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import v2

    n, size = 20000, 32
    keys = sample_keys(0, 0, np.arange(n))
    torch.manual_seed(0)
    params = BatchAugment(AugmentSection(rotation=25, color_jitter=0.4), size, MEAN, STD).params(keys, size, size)
    rotation = v2.RandomRotation(25)
    angles = [rotation.make_params([])["angle"] for _ in range(4000)]
    assert ks_2samp(params["angle"].numpy(), angles).pvalue > 0.001
    jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
    drawn = [jitter.make_params([]) for _ in range(4000)]
    for column, factor in enumerate(("brightness_factor", "contrast_factor", "saturation_factor")):
        assert ks_2samp(params["jitter"][:, 3 + column].numpy(), [d[factor] for d in drawn]).pvalue > 0.001
    orders = [tuple(int(i) for i in d["fn_idx"].tolist() if i < 3) for d in drawn]  # hue (3) is unused
    assert _same_distribution([tuple(row) for row in params["jitter"][:, :3].long().tolist()], orders)

    for height, width in [(size, size), (40, 64)]:
        image = torch.zeros(3, height, width)

        def boxes(scale):
            ours = BatchAugment(AugmentSection(random_resized_crop=True, scale=scale), size, MEAN, STD).params(
                keys, height, width)["resized_crop"].numpy()
            crop = v2.RandomResizedCrop(size, scale=scale)
            theirs = np.array([[p["top"], p["left"], p["height"], p["width"]]
                               for p in (crop.make_params([image]) for _ in range(4000))])
            return ours, theirs

        ours, theirs = boxes((0.08, 1.0))
        assert all(ks_2samp(ours[:, k], theirs[:, k]).pvalue > 0.001 for k in range(4))
        broken, _ = boxes((0.2, 1.0))
        assert min(ks_2samp(broken[:, k], theirs[:, k]).pvalue for k in range(4)) < 0.001


def test_resized_crops_on_the_device_need_images_of_one_size_and_a_bilinear_filter(digits, tmp_path):
    """data.augment_on: device with random_resized_crop: crops are cut from the decoded images where
    the batch lands (not from images squashed to data.image_size first); images of differing sizes
    cannot make a batch, and other filters than bilinear have no batched form: clear errors."""
    import io
    import tarfile

    from PIL import Image

    def shard(path: Path, sizes) -> str:
        with tarfile.open(path, "w") as tar:
            for i, (h, w) in enumerate(sizes):
                buf = io.BytesIO()
                Image.fromarray(np.full((h, w, 3), 40 * i % 256, dtype=np.uint8)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return str(path)

    def recipe(train: str, **data):
        raw = small_recipe(digits, tmp_path / "run")
        raw["data"].update(train=train, image_size=16, batch_size=4, augment_on="device",
                           augment={"random_resized_crop": True}, **data)
        raw["model"]["num_classes"] = 2
        return validate_recipe(raw)

    def first_batch(section):
        transform = ImageTransform(section.data, 3, train=True, batched=True)
        index = index_shards(section.data.train, "t")
        plan = EpochPlan(tuple(index.shard_sizes.tolist()), global_batch=4, streams=1, world_size=1, seed=0)
        stream = TrainStream(index, plan, transform, 0, 0, 0)
        return next(on_device(batches(stream, 0), torch.device("cpu"), torch.contiguous_format, transform.finish))

    same = recipe(shard(tmp_path / "same.tar", [(24, 20)] * 8))
    assert first_batch(same).images.shape == (4, 3, 16, 16)
    mixed = recipe(shard(tmp_path / "mixed.tar", [(24, 20), (30, 40)] * 4))
    with pytest.raises(LauncherError, match=r"needs images of one size .* differ .*mixed.tar.*"
                                            r"Set data.augment_on=loader"):
        first_batch(mixed)
    with pytest.raises(LauncherError, match=r"data.augment.random_resized_crop has no batched form with "
                                            r"data.interpolation=bicubic \(bilinear only\).*data.augment_on=loader"):
        recipe(str(tmp_path / "same.tar"), interpolation="bicubic")
