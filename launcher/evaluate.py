"""Score a trained run's weights on a shard set, as the training loop's evaluation does.

    python -m launcher.evaluate RUN_DIR                       # final/model.safetensors on the run's data.val
    python -m launcher.evaluate RUN_DIR --weights ema         # final/ema.safetensors (plugins.ema)
    python -m launcher.evaluate RUN_DIR data.val='other/val-{000000..000009}.tar'
    python -m launcher.evaluate RUN_DIR --tta                 # + val_tta/* (flip TTA, plugins.tta)

Prints loss, top-1, top-5 and the sample count as JSON (keys like the run's metrics.jsonl) and
writes them to RUN_DIR/evaluate-<weights>.json. The computation is the loop's own (same
transform, batches, precision and sums), so on the run's data.val and final weights it gives
the numbers of the run's last evaluation row. The recipe's plugins' eval_logits hooks run as in
the loop (a run trained with plugins.tta gets its val_tta/* again); --tta adds plugins.tta to a
recipe without it. One process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from launcher.errors import LauncherError, run_command


def recipe_autocast(recipe, device: torch.device):
    """The recipe's precision for a forward pass, as the loop's accelerator.autocast() gives it."""
    from launcher.registry import recipe_precision

    precision = recipe_precision(recipe)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                          enabled=precision in ("bf16", "fp16"))


def load_run_model(run_dir: Path, weights: str, overrides: list[str] = (), allow_pipe: bool = False,
                   shards_read: tuple[str, ...] = ()):
    """(recipe, model in eval mode on the device, weights path) of a run directory; weights is
    model, ema or a .safetensors path. shards_read: the recipe's shard keys the caller will read
    (their pipe: commands need allow_pipe, see load_run_recipe)."""
    from launcher.models import create_model
    from launcher.recipe import load_run_recipe
    from launcher.runlog import final_weights, recipe_file
    from launcher.weights import load_into

    if not recipe_file(run_dir).is_file():
        raise LauncherError(f"'{run_dir}' is not a run directory (no recipe.yaml).")
    named = weights in ("model", "ema")
    path = final_weights(run_dir, weights) if named else Path(weights)
    if not path.is_file():
        raise LauncherError(f"no weights at '{path}'" + (" (the run has not finished, or ran without "
                                                          "plugins.ema)" if named else "") + ".")
    recipe = load_run_recipe(run_dir, list(overrides), allow_pipe, shards_read)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The run's own weights are loaded next: no need for the pretrained ones it started from.
    model = create_model(recipe.model.model_copy(update={"pretrained": False, "pretrained_file": None}))
    load_into(model, path, "--weights" if not named else str(run_dir),
              f"The weights must come from a run of {recipe_file(run_dir)}'s model ({recipe.model.name}, "
              f"{recipe.model.num_classes} classes); the recipe or the weights were changed.")
    model = model.to(device)
    return recipe, model.eval(), device, path


@torch.no_grad()
def evaluate_weights(recipe, model: torch.nn.Module, device: torch.device, prefix: str = "val") -> dict:
    """{prefix}/loss, /top1, /top5, /samples over recipe.data.val, every sample once, and those of
    the outputs the recipe's eval_logits hooks add ({prefix}_tta/...)."""
    from launcher.data import EvalStream, batches, fetch_options, index_shards
    from launcher.loop import RunContext, eval_metrics, eval_sums
    from launcher.registry import build_plugins
    from launcher.transforms import ImageTransform

    data = recipe.data
    if not data.val:
        raise LauncherError("nothing to evaluate on: the recipe sets no data.val; give data.val=PATTERN.")
    index = index_shards(data.val, "data.val", data.cache_dir, recipe.model.num_classes, fetch_options(data))
    transform = ImageTransform(data, recipe.model.in_chans, train=False)
    stream = EvalStream(index, transform, data.eval_batch_size or 2 * data.batch_size, 0, 1)
    memory_format = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    autocast = recipe_autocast(recipe, device)
    plugins = build_plugins(recipe)
    ctx = RunContext(recipe=recipe, plugins=plugins)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for batch in batches(stream, data.num_workers):
        batch = batch.to(device, memory_format)
        with autocast:
            logits = model(batch.images)
            outputs = plugins.chain("eval_logits", ctx, {prefix: logits}, batch.images, model, prefix)
        for name, out in outputs.items():
            sums.setdefault(name, torch.zeros(4, dtype=torch.float64, device=device))
            sums[name] += eval_sums(out.float(), batch.targets)
    return eval_metrics(sums)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.val=PATTERN")
    parser.add_argument("--weights", default="model",
                        help="model (final/model.safetensors), ema (final/ema.safetensors) or a .safetensors path")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation (flipped view): adds plugins.tta to a recipe without it")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="run the pipe: shard commands written in RUN_DIR/recipe.yaml (refused by default)")
    args = parser.parse_intermixed_args(argv)
    return run_command(lambda: _evaluate_command(args))


def _evaluate_command(args) -> int:
    from launcher.runlog import atomic_write_text

    overrides = list(args.overrides)
    if args.tta:
        from launcher.recipe import load_recipe
        from launcher.runlog import recipe_file

        if recipe_file(args.run_dir).is_file() and "tta" not in load_recipe(recipe_file(args.run_dir)).plugins:
            overrides.append("plugins.tta={}")
    recipe, model, device, weights = load_run_model(args.run_dir, args.weights, overrides, args.allow_pipe, ("val",))
    metrics = evaluate_weights(recipe, model, device, prefix="val_ema" if args.weights == "ema" else "val")
    text = json.dumps({"weights": str(weights), "data.val": recipe.data.val, **metrics}, indent=1)
    print(text)
    label = args.weights if args.weights in ("model", "ema") else weights.stem
    atomic_write_text(args.run_dir / f"evaluate-{label}.json", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
