"""The LR range test as its own short run:

    python -m launcher.lr_find RECIPE [key=value ...] [--start-lr 1e-6] [--end-lr 10] [--steps 100]
    accelerate launch ... -m launcher.lr_find RECIPE ...          (on several processes alike)

It trains the recipe (model, data, augmentation, loss plugins, precision) with the
`lr_finder` plugin switched on, a constant schedule that the plugin drives, no evaluation,
and in its own run directory (<run dir>/lr_find), then prints the suggested LR. Plugins the
range test cannot run with (lr_finder's `incompatible`, e.g. checkpoint) are left out.
"""

from __future__ import annotations

import argparse
import os
import sys

FINDER = "lr_finder"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.lr_find", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value or ~key, as for python -m launcher")
    parser.add_argument("--start-lr", type=float, default=1e-6)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)

    from launcher.errors import run_command

    def command() -> int:
        import yaml

        from launcher.loop import train
        from launcher.recipe import load_recipe
        from launcher.registry import get_plugin_class

        base = load_recipe(args.recipe, args.overrides)
        dropped = [n for n in get_plugin_class(FINDER).incompatible if n in base.plugins]
        options = {"start_lr": args.start_lr, "end_lr": args.end_lr, "steps": args.steps}
        overrides = [*args.overrides, *(f"~plugins.{n}" for n in dropped),
                     f"plugins.{FINDER}={yaml.safe_dump(options, default_flow_style=True).strip()}",
                     "schedule.name=constant", "schedule.warmup_epochs=0", "data.val=null",
                     # enough epochs for the sweep even at one step per epoch; max_steps ends it
                     f"train.epochs={max(base.train.epochs, args.steps)}", f"train.max_steps={args.steps}",
                     f"run.dir={base.run_dir / 'lr_find'}"]
        recipe = load_recipe(args.recipe, overrides)
        if dropped and os.environ.get("RANK", "0") == "0":
            print(f"[lr_find] left out for the range test: {', '.join(dropped)}", flush=True)
        ctx = train(recipe)
        return 0 if (ctx.run_dir / "lr_find.json").exists() or not ctx.is_main else 1

    return run_command(command)

if __name__ == "__main__":
    sys.exit(main())
