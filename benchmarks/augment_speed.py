"""Augmentation of 32-pixel images per CPU core: the per-sample paths against whole batches.

    python benchmarks/augment_speed.py --out benchmarks/results/augment_speed.md
    python benchmarks/augment_speed.py --samples 512 --repeats 1      # quick

One thread (torch.set_num_threads(1)): samples/s per core for three recipes (crop + flip;
+ random erasing 0.5; + normalisation is always in), measured side by side, medians of
alternating repeats:

  launcher loader    today's per-sample path: ImageTransform in a loader worker, each sample
                     seeded on its own (seed_for_sample), uint8 CHW tensor in, float out
  classic PIL        the classic CIFAR pipeline: torchvision RandomCrop(padding) / flip /
                     ToTensor / Normalize on PIL images, then timm's RandomErasing
  kornia batch       Kornia's AugmentationSequential on the batch (when kornia is installed;
                     its draws come from one generator per batch)
  launcher device    data.augment_on: device: parameters drawn per sample from their keys in
                     the loader, ops on the whole batch (here on the CPU)

The last column is the speed-up of the batched path over today's per-sample path.

Then end to end (--train-steps, 0 to skip): training samples/s of the launcher (one process, no
loader worker, crop 2 + flip, wrn10_2 at 28x28, batch 128) with augmentation in the loader and
on the device, against a plain loop over in-memory uint8 batches that applies the same batched
ops (same model, optimizer, batch); medians of the steps after a warm-up, the three loops run in
turn --train-repeats times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.emit_results import emit  # noqa: E402
from launcher.data import seed_for_sample  # noqa: E402
from launcher.data.augment import sample_keys  # noqa: E402
from launcher.config.recipe import AugmentSection, DataSection  # noqa: E402
from launcher.data.transforms import ImageTransform  # noqa: E402

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
RECIPES = {"crop 4 + flip": dict(crop_padding=4, hflip=0.5),
           "crop 4 + flip + erasing 0.5": dict(crop_padding=4, hflip=0.5, random_erasing=0.5),
           "crop 4 + flip + AutoAugment cifar10 + erasing 0.5": dict(crop_padding=4, hflip=0.5,
                                                                    auto_augment="cifar10", random_erasing=0.5),
           "crop 4 + flip + TrivialAugment": dict(crop_padding=4, hflip=0.5, auto_augment="trivialaugment"),
           "rotation 15 + colour jitter 0.4": dict(rotation=15, color_jitter=0.4),
           "resized crop (0.35-1) + flip": dict(random_resized_crop=True, scale=(0.35, 1.0), hflip=0.5)}


def data_section(augment: dict, on: str) -> DataSection:
    return DataSection(train="x.tar", batch_size=128, image_size=32, mean=MEAN, std=STD,
                       augment=AugmentSection(**augment), augment_on=on)


def launcher_loader(images: torch.Tensor, augment: dict) -> float:
    transform = ImageTransform(data_section(augment, "loader"), 3, train=True)
    start = time.perf_counter()
    for i, image in enumerate(images):
        seed_for_sample(0, 0, i)
        transform(image)
    return len(images) / (time.perf_counter() - start)


def classic_pil(images: torch.Tensor, augment: dict) -> float:
    from PIL import Image
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    ops = []
    if augment.get("random_resized_crop"):
        ops.append(T.RandomResizedCrop(32, scale=augment["scale"]))
    if augment.get("crop_padding"):
        ops.append(T.RandomCrop(32, padding=augment["crop_padding"]))
    if augment.get("hflip"):
        ops.append(T.RandomHorizontalFlip(augment["hflip"]))
    if augment.get("rotation"):
        ops.append(T.RandomRotation(augment["rotation"]))
    if augment.get("color_jitter"):
        ops.append(T.ColorJitter(*[augment["color_jitter"]] * 3))
    if augment.get("auto_augment") == "trivialaugment":
        ops.append(T.TrivialAugmentWide())
    elif augment.get("auto_augment"):
        ops.append(T.AutoAugment(T.AutoAugmentPolicy(augment["auto_augment"])))
    ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    if augment.get("random_erasing"):
        ops.append(RandomErasing(augment["random_erasing"], mode="pixel", device="cpu"))
    transform = T.Compose(ops)
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    start = time.perf_counter()
    for image in pil:
        transform(image)
    return len(images) / (time.perf_counter() - start)


def kornia_batch(images: torch.Tensor, augment: dict, batch: int) -> float | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    from kornia.augmentation import auto

    ops = []
    if augment.get("random_resized_crop"):
        ops.append(K.RandomResizedCrop((32, 32), scale=augment["scale"]))
    if augment.get("crop_padding"):
        ops.append(K.RandomCrop((32, 32), padding=augment["crop_padding"]))
    if augment.get("hflip"):
        ops.append(K.RandomHorizontalFlip(p=augment["hflip"]))
    if augment.get("rotation"):
        ops.append(K.RandomRotation(augment["rotation"], p=1.0))
    if augment.get("color_jitter"):
        ops.append(K.ColorJitter(*[augment["color_jitter"]] * 3, p=1.0))
    if augment.get("auto_augment") == "trivialaugment":
        ops.append(auto.TrivialAugment())
    elif augment.get("auto_augment"):
        ops.append(auto.AutoAugment(augment["auto_augment"]))
    ops.append(K.Normalize(torch.tensor(MEAN), torch.tensor(STD)))
    if augment.get("random_erasing"):
        ops.append(K.RandomErasing(p=augment["random_erasing"]))
    pipeline = K.AugmentationSequential(*ops)
    start = time.perf_counter()
    for first in range(0, len(images), batch):
        pipeline(images[first:first + batch].float() / 255)
    return len(images) / (time.perf_counter() - start)


def launcher_device(images: torch.Tensor, augment: dict, batch: int) -> float:
    transform = ImageTransform(data_section(augment, "device"), 3, train=True, batched=True)
    ids = np.arange(len(images))
    start = time.perf_counter()
    for first in range(0, len(images), batch):
        chunk = images[first:first + batch]
        params = transform.batch_params(sample_keys(0, 0, ids[first:first + batch]), 32, 32)
        transform.finish(chunk, params)
    return len(images) / (time.perf_counter() - start)


def end_to_end(steps: int, warmup: int, repeats: int, workdir: Path) -> dict[str, list[float]]:
    """Samples/s of each repeat: launcher (loader path, device path) and a plain loop on in-memory
    batches."""
    import benchmarks.loop_overhead  # noqa: F401  (registers the bench_step_timer plugin)
    from launcher.data import index_shards, decode_image
    from launcher.data.augment import BatchAugment
    from launcher.loop import train
    from launcher.config.load import validate_recipe
    from launcher.data.writer import main as write_shards

    shards = workdir / "shards"
    if not (shards / "info.json").exists():
        assert write_shards(["synthetic", "--out", str(shards), "--num-classes", "10", "--train", "4096",
                             "--val", "64", "--size", "28"]) == 0
    pattern = json.loads((shards / "info.json").read_text())["train"]
    batch, augment = 128, {"crop_padding": 2, "hflip": 0.5}

    def recipe(on: str):
        return validate_recipe({
            "seed": 0, "run": {"dir": str(workdir / f"run-{on}"), "log_every": 1000000, "progress": False},
            "model": {"name": "wrn10_2", "num_classes": 10},
            "data": {"train": pattern, "batch_size": batch, "num_workers": 0, "image_size": 28, "streams": 1,
                     "augment": augment, "augment_on": on},
            "train": {"epochs": 100, "max_steps": steps}, "optimizer": {"name": "momentum", "lr": 0.05},
            "plugins": {"bench_step_timer": {}}})

    def launcher_rate(on: str) -> float:
        import shutil

        shutil.rmtree(workdir / f"run-{on}", ignore_errors=True)
        ctx = train(recipe(on))
        times = next(p for p in ctx.plugins if p.name == "bench_step_timer").times[warmup:]
        return batch / statistics.median(t[0] for t in times)

    def plain_rate() -> float:
        import timm

        index = index_shards(pattern, "data.train")
        images = torch.stack([decode_image(*index.read_image(i, {})) for i in range(len(index))])
        labels = torch.from_numpy(index.labels.astype(np.int64))
        ops = BatchAugment(AugmentSection(**augment), 28, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        torch.manual_seed(0)
        model = timm.create_model("wrn10_2", num_classes=10).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        times, order = [], torch.randperm(len(images))
        for step in range(steps):
            start = time.perf_counter()
            ids = order[(step * batch) % len(images):][:batch]
            x = ops.apply(images[ids], ops.params(sample_keys(0, 0, ids.numpy()), 28, 28))
            loss = torch.nn.functional.cross_entropy(model(x), labels[ids])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - start)
        return batch / statistics.median(times[warmup:])

    launcher_rate("device")  # a discarded first run: allocator and cache warm-up
    # alternating repeats: this VM's speed drifts by 10% within minutes, so one run of each (in a
    # row) can put that drift between them
    rates: dict[str, list[float]] = {"plain": [], "device": [], "loader": []}
    for _ in range(repeats):
        rates["plain"].append(plain_rate())
        rates["device"].append(launcher_rate("device"))
        rates["loader"].append(launcher_rate("loader"))
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=40, help="end-to-end steps per run (0: skip)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--train-repeats", type=int, default=5, help="alternating end-to-end runs of each loop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = torch.randint(0, 256, (args.samples, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    lines = ["# Augmentation of 32-pixel images, samples/s on one CPU core", "",
             f"{args.samples} samples of 3x32x32, batches of {args.batch}, medians of {args.repeats} alternating "
             f"repeats; torch {torch.__version__}.", "",
             "| recipe | launcher loader (per sample) | classic PIL + timm erasing | kornia batch | launcher device "
             "(batched) | batched / per sample |", "|---|---|---|---|---|---|"]
    for name, augment in RECIPES.items():
        runs: dict[str, list[float]] = {"loader": [], "pil": [], "kornia": [], "device": []}
        for _ in range(args.repeats):
            runs["loader"].append(launcher_loader(images, augment))
            runs["pil"].append(classic_pil(images, augment))
            speed = kornia_batch(images, augment, args.batch)
            if speed is not None:
                runs["kornia"].append(speed)
            runs["device"].append(launcher_device(images, augment, args.batch))
        med = {k: statistics.median(v) if v else None for k, v in runs.items()}
        cells = [f"{med[k]:,.0f}" if med[k] else "not installed" for k in ("loader", "pil", "kornia", "device")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {med['device'] / med['loader']:.1f}x |")
    if args.train_steps:
        import tempfile

        torch.set_num_threads(threads)
        rates = end_to_end(args.train_steps, min(args.warmup, args.train_steps - 1), args.train_repeats,
                           Path(tempfile.mkdtemp()))
        lines += ["", f"## End to end: training samples/s ({threads} threads, wrn10_2, 28x28, batch 128, crop 2 + "
                  f"flip, {args.train_steps} steps, medians after {args.warmup}; {args.train_repeats} alternating "
                  "runs of each loop)", "",
                  "| loop | samples/s, median run | / plain loop, each run | / plain loop |", "|---|---|---|---|"]
        plain = statistics.median(rates["plain"])
        for key, label in (("plain", "plain loop, in-memory uint8 batches + the batched ops"),
                           ("device", "launcher, data.augment_on: device"),
                           ("loader", "launcher, data.augment_on: loader (per sample)")):
            each = ", ".join(f"{rate / base:.2f}" for rate, base in zip(rates[key], rates["plain"]))
            median = statistics.median(rates[key])
            lines.append(f"| {label} | {median:,.0f} | {each} | {median / plain:.2f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
