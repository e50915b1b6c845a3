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

from launcher.commands.finished_run import NAMED_WEIGHTS, evaluate_weights, load_run_model
from launcher.errors import run_command


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
