"""Command line:

    python -m launcher RECIPE [key=value ...] [~key ...]     train
    accelerate launch [--multi_gpu --num_processes N ...] -m launcher RECIPE [overrides]
    python -m launcher --check RECIPE [overrides]             validate and print the resolved recipe
    python -m launcher --list-plugins                         every registered plugin, options, defaults
    python -m launcher --support-table                        which plugin runs under which strategy and precision

The other commands (each with its own --help):

    python -m launcher.shards SOURCE --out DIR                write WebDataset shards (digits, cifar10/100, fashion-mnist, imagefolder, npz)
    python -m launcher.shards index PATTERN                   write each shard's index next to it
    python -m launcher.lr_find RECIPE [overrides]             learning-rate range test
    python -m launcher.evaluate RUN_DIR [--weights ema] [--tta]  loss/top-1/top-5 of the run's weights on any shards
    python -m launcher.predict RUN_DIR IMAGES|SHARDS --out F   classes and probabilities per image, as CSV
    python -m launcher.export RUN_DIR [--format onnx|torchscript]  a timm-loadable folder, ONNX or TorchScript
    python -m launcher.report RUN_DIR                         evaluation report: curves, confusion matrix, PR/ROC
    python -m launcher.slurm submit|status|cancel ...         Slurm jobs that requeue and resume
    python -m launcher.experiment run|submit|status|report|cancel FILE   ladders, grids, seeds, searches
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2

    from launcher.errors import LauncherError, run_command

    def command() -> int:
        if argv[0] in ("--list-plugins", "--support-table") and argv[1:]:
            raise LauncherError(f"{argv[0]} takes no arguments (got '{' '.join(argv[1:])}'): python -m launcher "
                                f"{argv[0]}")
        if argv[0] == "--list-plugins":
            from launcher.registry import describe_plugins

            print(describe_plugins())
            return 0
        if argv[0] == "--support-table":
            from launcher.registry import support_table

            print(support_table())
            return 0
        args = list(argv)
        check_only = args[0] == "--check"
        if check_only:
            args = args[1:]
            if not args:
                raise LauncherError("--check needs a recipe file: python -m launcher --check recipes/digits.yaml")
        if args[0].startswith("-"):
            raise LauncherError(f"Unknown option '{args[0]}'. {USAGE}")
        from launcher.config.load import load_recipe, resolve_lr

        recipe = load_recipe(args[0], args[1:])
        if check_only:
            import yaml

            from launcher.preflight import preflight

            commands = preflight(recipe)  # the model exists, local shards are there
            # optimizer.lr_base: lr for the processes of this launch (WORLD_SIZE under accelerate/torchrun).
            lr_derivation = resolve_lr(recipe, int(os.environ.get("WORLD_SIZE", "1")))
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            if lr_derivation:
                print(f"# {lr_derivation} (the processes: WORLD_SIZE, 1 outside a launcher)")
            for shell_command in dict.fromkeys(commands):
                print(f"# pipe: shards run this shell command: {shell_command}")
            from launcher.data.augment import augment_path

            print("# training augmentation runs on the {}: {}".format(*augment_path(recipe.data)))
            print(f"# recipe OK; run directory: {recipe.run_dir}")
            return 0
        from launcher.loop import train

        # 0 when the run finished; 75 when it checkpointed on a signal and should be relaunched.
        return train(recipe).exit_code

    return run_command(command)

if __name__ == "__main__":
    sys.exit(main())
