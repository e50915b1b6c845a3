"""Classify images with a trained run: one CSV row per image.

    python -m launcher.predict RUN_DIR photos/ more/cat.jpg --out preds.csv
    python -m launcher.predict RUN_DIR 'data/test-{000000..000009}.tar' --top-k 5

Inputs are image files (png, jpg, jpeg, webp, bmp, ppm, or .npy uint8 arrays), folders of them
(searched recursively) or shard patterns. Each goes through the run's evaluation transform
and precision, in batches. Columns: input (the file, or shard#position for shards), label
(shards only), then class, name and probability for each of the top k. Default output:
RUN_DIR/predictions.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from launcher.errors import LauncherError, run_command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".npy")


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise LauncherError(f"'{item}' is neither an image file, a folder nor a shard pattern.")
    return files


def _batches_of_files(files: list[Path], transform, batch_size: int) -> Iterator[tuple[list[str], torch.Tensor, list]]:
    from launcher.data import decode_image

    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = []
        for path in chunk:
            try:
                images.append(transform(decode_image(path.read_bytes(), path.suffix.lower().lstrip("."))))
            except LauncherError:
                raise
            except Exception as err:  # noqa: BLE001  any decoder error names the file
                raise LauncherError(f"'{path}' cannot be read as an image ({type(err).__name__}: {err}).") from None
        yield [str(p) for p in chunk], torch.stack(images), [""] * len(chunk)


def _batches_of_shards(pattern: str, recipe, transform, batch_size: int):
    from launcher.data import EvalStream, batches, fetch_options, index_shards

    index = index_shards(pattern, "input", recipe.data.cache_dir, recipe.model.num_classes,
                         fetch_options(recipe.data))
    first_of_shard = index.shard_sizes.cumsum() - index.shard_sizes  # sample id of each shard's first sample
    for batch in batches(EvalStream(index, transform, batch_size, 0, 1), recipe.data.num_workers):
        names = [f"{index.shard_name(index.shard_of[i])}#{i - first_of_shard[index.shard_of[i]]}" for i in batch.ids.tolist()]
        yield names, batch.images, batch.targets.tolist()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("inputs", nargs="+", help="image files, folders, or shard patterns (.tar)")
    parser.add_argument("--out", type=Path, default=None, help="CSV file (default RUN_DIR/predictions.csv)")
    parser.add_argument("--weights", default="model", help="model, ema, or a .safetensors path")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    return run_command(lambda: _predict_command(args))


@torch.no_grad()
def _predict_command(args) -> int:
    from launcher.evaluate import load_run_model, recipe_autocast
    from launcher.report import class_names
    from launcher.runlog import atomic_write_text
    from launcher.transforms import ImageTransform

    recipe, model, device, _ = load_run_model(args.run_dir, args.weights)
    names = class_names(recipe)
    k = max(1, min(args.top_k, recipe.model.num_classes))
    transform = ImageTransform(recipe.data, recipe.model.in_chans, train=False)
    shards = [i for i in args.inputs if ".tar" in i]
    sources = [_batches_of_shards(p, recipe, transform, args.batch_size) for p in shards]
    files = image_files([i for i in args.inputs if ".tar" not in i])
    if files:
        sources.append(_batches_of_files(files, transform, args.batch_size))
    rows = []
    header = ["input", "label"] + [f"{c}{j + 1}" if k > 1 else c for j in range(k)
                                   for c in ("class", "name", "probability")]
    memory_format = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    for source in sources:
        for inputs, images, labels in source:
            with recipe_autocast(recipe, device):
                logits = model(images.to(device, memory_format=memory_format))
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            top = probs.topk(k, dim=-1)
            for name, label, p, c in zip(inputs, labels, top.values.tolist(), top.indices.tolist()):
                row = [name, label]
                for prob, cls in zip(p, c):
                    row += [cls, names[cls], f"{prob:.6f}"]
                rows.append(row)
    target = args.out or args.run_dir / "predictions.csv"
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(Path(target), text.getvalue())
    print(f"predicted {len(rows)} images -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
