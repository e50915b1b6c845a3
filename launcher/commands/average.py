"""Average the weights of finished runs and their checkpoints: timm's checkpoint averaging
(avg_checkpoints.py) and model soups (Wortsman et al. 2022, "Model soups").

    python -m launcher.average RUN_DIR [RUN_DIR ...]                  # each run's final weights, averaged
    python -m launcher.average RUN_DIR --last 3                       # its 3 newest (final + checkpoints)
    python -m launcher.average RUN_A RUN_B RUN_C --best 2 --metric val/top1
    python -m launcher.average RUN_A RUN_B RUN_C --greedy             # a greedy soup

The ingredients: each run's final weights and its intact checkpoints (one per step); --last K
takes each run's K newest, --best K the K best overall by the metric its run logged at their
step. The uniform average is the mean of every floating tensor (integer buffers are the first
ingredient's). --greedy is the paper's greedy soup: the ingredients ranked by their own metric
on data.val, each added only if the soup's metric does not get worse, so the soup is never
worse than the best ingredient on data.val. Averaging moves the weights under the BatchNorm
statistics: they are recomputed over the training images (torch's update_bn, without
augmentation; --no-update-bn keeps the averaged ones). The weights go to --out (default
FIRST_RUN/final/average.safetensors) with a JSON record beside them; `python -m launcher.evaluate
RUN_DIR --weights PATH` and `python -m launcher.export ... --weights PATH` take them. Runs of
another architecture, class count or input channels are refused, naming the difference. One
process; the first run's recipe gives the data (key=value overrides as for evaluate).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from launcher.commands.finished_run import evaluate_weights, load_run_model
from launcher.data.loader import recompute_batchnorm
from launcher.errors import LauncherError, run_command, whole_number


@dataclass
class Ingredient:
    run_dir: Path
    step: int
    path: Path
    logged: Optional[float] = None  # the run's metric at this step, if it evaluated then
    score: Optional[float] = None  # evaluated now (--greedy)

    def name(self) -> str:
        return f"{self.run_dir}@{self.step}"


def ingredients_of(run_dir: Path, metric: str) -> list[Ingredient]:
    """The run's final weights and intact checkpoints, newest first, one per step."""
    from launcher.checkpoints import list_checkpoints, verify
    from launcher.runlog import final_weights, metrics_file, status_file

    logged = {}
    if metrics_file(run_dir).is_file():
        for line in metrics_file(run_dir).read_text().splitlines():
            row = json.loads(line)
            if metric in row:
                logged[row["step"]] = row[metric]
    found: dict[int, Ingredient] = {}
    final = final_weights(run_dir)
    if final.is_file():
        step = json.loads(status_file(run_dir).read_text()).get("step", 0) if status_file(run_dir).is_file() else 0
        found[step] = Ingredient(run_dir, step, final, logged.get(step))
    for folder in list_checkpoints(run_dir):
        step = int(folder.name.removeprefix("step-"))
        if step in found:
            continue
        problem = verify(folder)
        if problem:
            print(f"[average] skipping {folder}: {problem}", file=sys.stderr)
            continue
        found[step] = Ingredient(run_dir, step, folder / "model.safetensors", logged.get(step))
    return [found[step] for step in sorted(found, reverse=True)]


def same_architecture(recipes: dict[Path, object]) -> None:
    """Refuse runs whose weights cannot be averaged: another model, class count or input."""
    def shape(recipe):
        m = recipe.model
        return {"model.name": m.name, "model.num_classes": m.num_classes, "model.in_chans": m.in_chans,
                "model.kwargs": m.kwargs}

    (first_dir, first), *others = recipes.items()
    for run_dir, recipe in others:
        differ = [f"{key} {shape(first)[key]!r} vs {value!r}" for key, value in shape(recipe).items()
                  if shape(first)[key] != value]
        if differ:
            raise LauncherError(f"{run_dir} and {first_dir} train different models ({'; '.join(differ)}): weights "
                                "of different architectures or class counts cannot be averaged. Give runs of one model.")


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of every floating tensor (in float64, cast back); other tensors from the first."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.average", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="+", metavar="RUN_DIR",
                        help="run directories, and key=value overrides of the first one's data (e.g. data.val=PATTERN)")
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--last", type=whole_number(1), default=None, help="each run's K newest weights (default 1)")
    choose.add_argument("--best", type=whole_number(1), default=None, help="the K best weights by --metric")
    parser.add_argument("--metric", default="val/top1", help="a metric of the runs' evaluation rows (default val/top1)")
    parser.add_argument("--mode", choices=("max", "min"), default=None, help="max for accuracies, min for losses "
                                                                             "(default: min for */loss, else max)")
    parser.add_argument("--greedy", action="store_true", help="a greedy soup: add an ingredient only if data.val "
                                                              "does not get worse")
    parser.add_argument("--no-update-bn", dest="update_bn", action="store_false",
                        help="keep the averaged BatchNorm statistics instead of recomputing them")
    parser.add_argument("--out", type=Path, default=None, help="default FIRST_RUN/final/average.safetensors")
    parser.add_argument("--allow-pipe", action="store_true", help="run the pipe: shard commands of the run's recipe")
    args = parser.parse_intermixed_args(argv)
    args.overrides = [item for item in args.items if "=" in item]
    args.run_dirs = [Path(item) for item in args.items if "=" not in item]
    if not args.run_dirs:
        parser.error("give at least one RUN_DIR")
    return run_command(lambda: _average_command(args))


def _average_command(args) -> int:
    from launcher.config.load import load_run_recipe
    from launcher.runlog import atomic_write_text, final_weights, save_weights

    if args.greedy and args.metric not in ("val/loss", "val/top1", "val/top5"):
        raise LauncherError(f"--greedy judges each soup on data.val by val/top1, val/top5 or val/loss, not "
                            f"{args.metric!r}: choose one of those for --metric.")
    mode = args.mode or ("min" if args.metric.endswith("loss") else "max")
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    recipes = {run_dir: load_run_recipe(run_dir, args.overrides, args.allow_pipe) for run_dir in args.run_dirs}
    same_architecture(recipes)
    pool = {run_dir: ingredients_of(run_dir, args.metric) for run_dir in args.run_dirs}
    for run_dir, found in pool.items():
        if not found:
            raise LauncherError(f"{run_dir} holds no weights to average (no final/model.safetensors, no intact "
                                "checkpoint): let the run finish or checkpoint.")
    if args.best is not None:
        scored = [i for found in pool.values() for i in found if i.logged is not None]
        if not scored:
            raise LauncherError(f"--best: no run logged {args.metric} at the step of its weights; choose --metric "
                                "from their metrics.jsonl, or use --last.")
        chosen = sorted(scored, key=lambda i: i.logged, reverse=mode == "max")[:args.best]
    else:
        chosen = [i for found in pool.values() for i in found[:args.last or 1]]

    recipe, model, device, _ = load_run_model(args.run_dirs[0], "model", args.overrides, args.allow_pipe,
                                              ("train", "val"))
    from launcher.models.weights import read_state_dict

    states = {i.name(): read_state_dict(i.path, "--average") for i in chosen}
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    train_index = None
    if args.update_bn and has_batchnorm:  # indexed once for every soup's statistics
        from launcher.data import fetch_options, index_shards

        data = recipe.data
        train_index = index_shards(data.train, "data.train", data.cache_dir, recipe.model.num_classes,
                                   fetch_options(data))

    def soup(members: list[Ingredient]) -> dict:
        model.load_state_dict(average([states[i.name()] for i in members]))
        if train_index is not None:
            recompute_batchnorm(model, train_index, recipe.data, recipe.model.in_chans, device)
            model.eval()
        return evaluate_weights(recipe, model, device) if recipe.data.val else {}

    decisions = []
    if args.greedy:
        if not recipe.data.val:
            raise LauncherError("--greedy needs data.val to judge each addition; give data.val=PATTERN.")
        for ingredient in chosen:  # each alone, on data.val now, judged as the soups are
            ingredient.score = soup([ingredient])[args.metric]
        chosen.sort(key=lambda i: i.score, reverse=mode == "max")
        members, best = [chosen[0]], chosen[0].score
        for ingredient in chosen[1:]:
            score = soup(members + [ingredient])[args.metric]
            kept = not better(best, score)  # not worse: the paper's >=
            decisions.append({"ingredient": ingredient.name(), "alone": ingredient.score, "soup with it": score,
                              "added": kept})
            if kept:
                members, best = members + [ingredient], score
    else:
        members = chosen
    metrics = soup(members)
    out = args.out or final_weights(args.run_dirs[0], "average")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, out)
    record = {"weights": str(out), "ingredients": [i.name() for i in members], "metric": args.metric, "mode": mode,
              "greedy": {"first": chosen[0].name(), "alone": chosen[0].score, "steps": decisions} if args.greedy else None,
              "batchnorm": "recomputed over data.train" if args.update_bn and has_batchnorm else "averaged",
              **metrics}
    text = json.dumps(record, indent=1)
    atomic_write_text(out.with_suffix(".json"), text + "\n")
    print(text)
    return 0
