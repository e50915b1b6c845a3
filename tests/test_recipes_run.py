"""Shipped recipes run end to end, shortened, on the CPU."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_cli, write_shards

pytestmark = pytest.mark.slow


def test_wrn_recipe_runs_with_every_plugin_it_names(tmp_path):
    """recipes/wrn.yaml (WRN-40-10, SAM, label smoothing, TTA, AutoAugment, random erasing)
    shortened: WRN-16-4 on synthetic CIFAR-100-shaped shards, 3 steps."""
    info = write_shards(tmp_path / "cifar", "synthetic", "--num-classes", "100", "--train", "256", "--val", "128")
    result = run_cli([sys.executable, "-m", "launcher", str(REPO / "recipes" / "wrn.yaml"),
                      "model.name=wrn16_4", "train.max_steps=3", "data.batch_size=16", "data.num_workers=2",
                      f"data.train={info['train']}", f"data.val={info['val']}", f"run.dir={tmp_path / 'run'}",
                      "run.progress=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "sam:" in recipe and "label_smoothing:" in recipe and "tta:" in recipe
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["val/samples"] == 128 and "val_tta/top1" in last
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def write_photo_folder(root, per_class=(8, 3), seed=0):
    """An imagefolder of real photos: random crops (various sizes and shapes) of scikit-learn's
    two sample photographs, one class each, as JPEG files in train/ and val/."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    for name, photo in zip(("china", "flower"), load_sample_images().images):
        for split, count in zip(("train", "val"), per_class):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(160, 400)), int(rng.integers(160, 600))
                top, left = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
                Image.fromarray(photo[top:top + h, left:left + w]).save(folder / f"{i}.jpg", quality=90)
    return root


def test_imagenet_resnet50_recipe_runs_on_real_photos(tmp_path):
    """recipes/imagenet_resnet50.yaml as shipped (ResNet-50 at 224, bicubic RandomResizedCrop,
    RandAugment, mixup/cutmix, LAMB, crop_pct evaluation), shortened: 2 steps on JPEG crops of
    real photos written with the README's imagefolder command. bf16 is left out: the CPU emulates it."""
    from tests.conftest import write_shards as shards_from

    photos = write_photo_folder(tmp_path / "photos")
    info = shards_from(tmp_path / "shards", "imagefolder", "--src", str(photos), "--format", "keep")
    assert info["num_classes"] == 2 and info["format"] == "keep"
    result = run_cli([sys.executable, "-m", "launcher", str(REPO / "recipes" / "imagenet_resnet50.yaml"),
                      "model.num_classes=2", "train.max_steps=2", "data.batch_size=4", "data.num_workers=1",
                      "~plugins.amp", f"data.train={info['train']}", f"data.val={info['val']}",
                      f"run.dir={tmp_path / 'run'}", "run.progress=false"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "rand-m7-mstd0.5-inc1" in recipe and "crop_pct: 0.95" in recipe and "name: lamb" in recipe
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["val/samples"] == 6


def test_fashion_mnist_recipes_run_on_idx_written_shards(tmp_path):
    """recipes/fashion_mnist.yaml (the CPU recipe) and recipes/fashion_mnist_wrn.yaml (the Random
    Erasing paper's WRN-28-10, for a GPU) as shipped, 2 steps each, on shards written from IDX
    files by the README's command (random 28x28 images in the real files' format)."""
    from tests.test_data import fake_idx_folder

    fake_idx_folder(tmp_path / "idx", n_train=40, n_val=12)
    info = write_shards(tmp_path / "shards", "fashion-mnist", "--src", str(tmp_path / "idx"))
    for name, extra in (("fashion_mnist", []), ("fashion_mnist_wrn", ["~plugins.amp"])):  # bf16: emulated on CPUs
        run = tmp_path / name
        result = run_cli([sys.executable, "-m", "launcher", str(REPO / "recipes" / f"{name}.yaml"), "train.max_steps=2",
                          "data.batch_size=8", "data.num_workers=1", *extra, f"data.train={info['train']}",
                          f"data.val={info['val']}", f"run.dir={run}", "run.progress=false"], timeout=900)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 2 and last["val/samples"] == 12, last
        assert "augment_on: device" in (run / "recipe.yaml").read_text()  # every op of both recipes is batched
