"""Classify images with a trained run: one CSV row per image.

    python -m launcher.predict RUN_DIR photos/ more/cat.jpg --out preds.csv
    python -m launcher.predict RUN_DIR 'data/test-{000000..000009}.tar' --top-k 5

Inputs are image files (png, jpg, jpeg, webp, bmp, ppm, or .npy uint8 arrays), folders of them
(searched recursively) or shard patterns (names ending in .tar, s3://, http(s)://). Each goes
through the run's evaluation transform and precision, in batches. Columns: input (the file, or
shard#position for shards), label (shards only), then class, name and probability for each of
the top k. Default output: RUN_DIR/predictions.csv.

An image file that cannot be read is skipped with a warning that lists every skipped file, and
the exit status is 1 (the CSV holds the others); no image at all to classify is an error (exit 2).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from launcher.errors import LauncherError, run_command, whole_number

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".npy")


def is_shard_pattern(item: str) -> bool:
    """A shard set: a remote URL, or names ending in .tar (x.tar.png is an image)."""
    from launcher.data import expand_pattern, is_local

    if not is_local(item):
        return True
    if Path(item).exists():
        return Path(item).is_file() and item.endswith(".tar")
    return all(url.endswith(".tar") for url in expand_pattern(item))


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise LauncherError(f"the folder '{item}' holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LauncherError(f"'{item}' is neither an image file, a folder nor a shard pattern (.tar).")
    return files


def _batches_of_files(files: list[Path], transform, batch_size: int,
                      skipped: list[str]) -> Iterator[tuple[list[str], torch.Tensor, list]]:
    """Batches of readable images; each unreadable file is appended to `skipped` with the reason."""
    from launcher.data import decode_image

    for start in range(0, len(files), batch_size):
        names, images = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(transform(decode_image(path.read_bytes(), path.suffix.lower().lstrip("."))))
                names.append(str(path))
            except Exception as err:  # noqa: BLE001  any decoder error: skip the file, name it at the end
                skipped.append(f"{path} ({type(err).__name__}: {str(err)[:120]})")
        if images:
            yield names, torch.stack(images), [""] * len(names)


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
    parser.add_argument("--top-k", type=whole_number(1), default=1)
    parser.add_argument("--batch-size", type=whole_number(1), default=64)
    args = parser.parse_args(argv)
    return run_command(lambda: _predict_command(args))


@torch.no_grad()
def _predict_command(args) -> int:
    from launcher.commands.finished_run import class_names, load_run_model, recipe_autocast
    from launcher.runlog import atomic_write_text
    from launcher.data.transforms import ImageTransform

    target = Path(args.out or args.run_dir / "predictions.csv")
    if target.is_dir():
        raise LauncherError(f"--out '{target}' is a folder; give the path of the CSV file to write.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LauncherError(f"--out '{target}': its folder cannot be created ({err.strerror}).") from None
    if not os.access(target.parent, os.W_OK):
        raise LauncherError(f"--out '{target}': the folder '{target.parent}' is not writable.")
    recipe, model, device, _ = load_run_model(args.run_dir, args.weights)
    names = class_names(recipe)
    k = min(args.top_k, recipe.model.num_classes)
    transform = ImageTransform(recipe.data, recipe.model.in_chans, train=False)
    shards = [i for i in args.inputs if is_shard_pattern(i)]
    sources = [_batches_of_shards(p, recipe, transform, args.batch_size) for p in shards]
    files = image_files([i for i in args.inputs if not is_shard_pattern(i)])
    skipped: list[str] = []
    if files:
        sources.append(_batches_of_files(files, transform, args.batch_size, skipped))
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
    if not rows:
        raise LauncherError(f"no image could be read, so nothing was written; skipped: {'; '.join(skipped[:10])}"
                            f"{f'; and {len(skipped) - 10} more' if len(skipped) > 10 else ''}.")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    try:
        atomic_write_text(target, text.getvalue())
    except OSError as err:
        raise LauncherError(f"--out '{target}' cannot be written ({err.strerror or err}).") from None
    print(f"predicted {len(rows)} images -> {target}")
    if skipped:
        print(f"warning: {len(skipped)} file(s) could not be read as images and were skipped: "
              + "; ".join(skipped), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
