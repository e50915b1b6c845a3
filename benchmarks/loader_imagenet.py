"""ImageNet-style loading per worker: the launcher vs timm's own loader pieces, same JPEG shards.

    python benchmarks/loader_imagenet.py [--samples 600] [--repeats 3] [--out FILE]

JPEG photos (random crops of scikit-learn's two sample photographs, resized to ImageNet's typical
500x375, quality 90) are written as WebDataset shards with `python -m launcher.shards imagefolder
--format keep`. Each loader reads them in one process (one worker's work): decode, RandomResizedCrop
224 + flip (+ RandAugment rand-m9-mstd0.5-inc1 in the second row), uint8 out, stacked into batches
of 64. timm: `timm.data.create_transform(224, is_training=True, use_prefetcher=True)` (what timm's
train.py uses with its default prefetcher: uint8 out, normalised on the GPU) over WebDataset's
PIL decoding, batched with timm's `fast_collate`. The launcher: its TrainStream with
normalize_on_device (what a CUDA run uses). Median samples/s of alternating runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402

BATCH = 64


def write_photos(root: Path, samples: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    for i in range(samples):
        photo = photos[i % 2]
        h, w = int(rng.integers(200, 427)), int(rng.integers(266, 640))
        top, left = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize((500, 375), Image.BICUBIC)
        image.save(folder / f"{i}.jpg", quality=90)
    for c in range(10):  # the writer wants a val split too
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[0][:64, :64]).save(root / "val" / f"c{c}" / "0.jpg")


def launcher_rate(pattern: str, augment: dict) -> float:
    from launcher.data import EpochPlan, TrainStream, batches, index_shards
    from launcher.config.recipe import DataSection
    from launcher.data.transforms import ImageTransform

    data = DataSection(train=pattern, batch_size=BATCH, image_size=224, mean=[0.485, 0.456, 0.406],
                       std=[0.229, 0.224, 0.225], augment=augment)
    index = index_shards(pattern, "data.train")
    plan = EpochPlan(tuple(int(n) for n in index.shard_sizes), BATCH, streams=1, world_size=1, seed=0)
    stream = TrainStream(index, plan, ImageTransform(data, 3, train=True, normalize_on_device=True), 0, 0)
    start, n = time.perf_counter(), 0
    for batch in batches(stream, num_workers=0):
        n += len(batch.targets)
    return n / (time.perf_counter() - start)


def timm_rate(pattern: str, auto_augment) -> float:
    import torch
    import webdataset as wds
    from timm.data import create_transform
    from timm.data.loader import fast_collate

    transform = create_transform(224, is_training=True, use_prefetcher=True, hflip=0.5, color_jitter=None,
                                 auto_augment=auto_augment, interpolation="bilinear", re_prob=0.0)
    dataset = (wds.WebDataset(pattern, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(transform, int))
    start, n, pending = time.perf_counter(), 0, []
    for sample in dataset:
        pending.append(sample)
        if len(pending) == BATCH:
            images, _ = fast_collate(pending)
            n += len(images)
            pending = []
    if pending:
        n += len(fast_collate(pending)[0])
    assert torch.is_tensor(images) and images.dtype == torch.uint8
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one worker's work, as a loader worker runs it
    from launcher.data.writer import main as shards

    tmp = Path(tempfile.mkdtemp(prefix="loader-imagenet-"))
    write_photos(tmp / "photos", args.samples)
    assert shards(["imagefolder", "--src", str(tmp / "photos"), "--out", str(tmp / "shards"), "--format", "keep",
                   "--shard-size", "200"]) == 0
    import json

    pattern = json.loads((tmp / "shards" / "info.json").read_text())["train"]
    rows = []
    for label, augment, timm_aa in (
            ("RandomResizedCrop 224 + flip", {"random_resized_crop": True, "hflip": 0.5}, None),
            ("+ RandAugment rand-m9-mstd0.5-inc1", {"random_resized_crop": True, "hflip": 0.5,
                                                    "auto_augment": "rand-m9-mstd0.5-inc1"}, "rand-m9-mstd0.5-inc1")):
        ours, theirs = [], []
        launcher_rate(pattern, augment)  # warm the page cache and the decoders
        for _ in range(args.repeats):
            ours.append(launcher_rate(pattern, augment))
            theirs.append(timm_rate(pattern, timm_aa))
        a, b = statistics.median(ours), statistics.median(theirs)
        rows.append(f"| {label} | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        print(rows[-1], flush=True)
    lines = [f"# JPEG 224 loading per worker: launcher vs timm ({args.samples} JPEGs 500x375, one thread, "
             f"medians of {args.repeats} alternating runs)", "",
             "| augmentation | launcher samples/s | timm samples/s | launcher / timm (goal >= 1.0) |",
             "|---|---|---|---|", *rows]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
