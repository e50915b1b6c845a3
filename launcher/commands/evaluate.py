"""Score a trained run's weights on a shard set, as the training loop's evaluation does.

    python -m launcher.evaluate RUN_DIR                       # final/model.safetensors on the run's data.val
    python -m launcher.evaluate RUN_DIR --weights ema         # final/ema.safetensors (plugins.ema)
    python -m launcher.evaluate RUN_DIR --weights swa         # final/swa.safetensors (plugins.swa)
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

from launcher.commands.finished_run import NAMED_WEIGHTS, load_run_model, recipe_autocast
from launcher.errors import LauncherError, run_command


@torch.no_grad()
def evaluate_weights(recipe, model: torch.nn.Module, device: torch.device, prefix: str = "val") -> dict:
    """{prefix}/loss, /top1, /top5, /samples over recipe.data.val, every sample once, and those of
    the outputs the recipe's eval_logits hooks add ({prefix}_tta/...)."""
    from launcher.data import EvalStream, batches, fetch_options, index_shards
    from launcher.loop import RunContext, eval_metrics, eval_sums
    from launcher.registry import build_plugins
    from launcher.data.transforms import ImageTransform

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
                        help="model (final/model.safetensors), ema or swa (final/ema.safetensors, final/swa.safetensors: "
                             "plugins.ema, plugins.swa) or a .safetensors path")
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
        from launcher.config.load import load_recipe
        from launcher.runlog import recipe_file

        if recipe_file(args.run_dir).is_file() and "tta" not in load_recipe(recipe_file(args.run_dir)).plugins:
            overrides.append("plugins.tta={}")
    recipe, model, device, weights = load_run_model(args.run_dir, args.weights, overrides, args.allow_pipe, ("val",))
    prefix = f"val_{args.weights}" if args.weights in ("ema", "swa") else "val"  # as the loop logged them
    metrics = evaluate_weights(recipe, model, device, prefix=prefix)
    text = json.dumps({"weights": str(weights), "data.val": recipe.data.val, **metrics}, indent=1)
    print(text)
    label = args.weights if args.weights in NAMED_WEIGHTS else weights.stem
    atomic_write_text(args.run_dir / f"evaluate-{label}.json", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
