"""The LR range test as its own short run:

    python -m launcher.lr_find RECIPE [key=value ...] [--start-lr 1e-6] [--end-lr 10] [--steps 100]
    accelerate launch ... -m launcher.lr_find RECIPE ...          (on several processes alike)

It trains the recipe (model, data, augmentation, loss plugins, precision) with the
`lr_finder` plugin switched on, a constant schedule that the plugin drives, no evaluation,
and in its own run directory (<run dir>/lr_find), then prints the suggested LR. Plugins the
range test cannot run with (lr_finder's `incompatible`, e.g. checkpoint, and those that refuse
a recipe without validation data, e.g. report) are left out, and the sweep's final weights
are not kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

FINDER = "lr_finder"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.lr_find", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value or ~key, as for python -m launcher")
    parser.add_argument("--start-lr", type=float, default=1e-6)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides

    from launcher.errors import run_command

    def command() -> int:
        import yaml

        from launcher.loop import train
        from launcher.config.load import load_recipe
        from launcher.registry import get_plugin_class
        from launcher.runlog import final_weights

        base = load_recipe(args.recipe, args.overrides)
        dropped = {n: "cannot run with lr_finder" for n in get_plugin_class(FINDER).incompatible if n in base.plugins}
        options = {"start_lr": args.start_lr, "end_lr": args.end_lr, "steps": args.steps}
        sweep = [f"plugins.{FINDER}={yaml.safe_dump(options, default_flow_style=True).strip()}",
                 "schedule.name=constant", "schedule.warmup_epochs=0", "data.val=null",
                 # enough epochs for the sweep even at one step per epoch; max_steps ends it
                 f"train.epochs={max(base.train.epochs, args.steps)}", f"train.max_steps={args.steps}",
                 f"run.dir={base.run_dir / 'lr_find'}"]
        # Plugins that refuse the sweep's recipe (e.g. report and early_stopping need data.val,
        # which the sweep has not) are left out too, each with its own reason.
        dropped.update(_refusing_plugins(args.recipe, [*args.overrides, *(f"~plugins.{n}" for n in dropped), *sweep]))
        recipe = load_recipe(args.recipe, [*args.overrides, *(f"~plugins.{n}" for n in dropped), *sweep])
        if dropped and os.environ.get("RANK", "0") == "0":
            print("[lr_find] left out for the range test: "
                  + "; ".join(f"{n} ({why})" for n, why in dropped.items()), flush=True)
        ctx = train(recipe)
        if ctx.is_main:
            # The sweep's final weights are those of a diverged run: of no use, and large.
            shutil.rmtree(final_weights(ctx.run_dir).parent, ignore_errors=True)
        return 0 if (ctx.run_dir / "lr_find.json").exists() or not ctx.is_main else 1

    return run_command(command)


def _refusing_plugins(recipe_file: str, overrides: list[str]) -> dict[str, str]:
    """Plugins whose check_recipe refuses the sweep's recipe, with their reasons."""
    from launcher.config.recipe import Recipe
    from launcher.config.load import apply_overrides
    from launcher.registry import get_plugin_class, parse_options
    from launcher.config.yamlfile import load_yaml

    raw = apply_overrides(load_yaml(open(recipe_file).read(), f"Recipe '{recipe_file}'") or {}, overrides)
    recipe = Recipe.model_validate(raw)  # the plugins are checked one by one below
    refusing = {}
    for name in recipe.plugins:
        reason = get_plugin_class(name).check_recipe(recipe, parse_options(name, recipe.plugins[name]))
        if reason:
            refusing[name] = reason
    return refusing

if __name__ == "__main__":
    sys.exit(main())
