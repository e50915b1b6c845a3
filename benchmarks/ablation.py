"""The ablation ladder on real data: recipes/digits.yaml with tricks added one rung at a
time, in the style of the reference CIFAR-100 table (../shared/TRICKS.md), 3 seeds each.

    python benchmarks/ablation.py [--seeds 0 1 2] [--epochs 10] [--out benchmarks/results/ablation.md]

Each run trains the full digits recipe on one process (global batch 64, as `make demo` on 2
processes) and reports the final validation top-1 (of the EMA model where EMA is on, as
that is the model one would ship) and the wall time of the run. Rungs alternate within a
seed, so slow phases of a shared machine spread over all rungs. Results are appended to a
JSON file as they come, so an interrupted ladder keeps its finished runs (--resume).

Digits adaptations of the reference rungs, each said in the table: AutoAugment uses the
SVHN policy (digit images; the CIFAR policy flips), TTA uses shifted views, not flips (a
mirrored digit is another symbol), EMA uses decay 0.99 with warmup (the run has 230 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402

# (rung, what it adds, overrides); each rung keeps the ones above it, as in the reference table.
LADDER = [
    ("baseline", "digits.yaml: crop + rotation, SGD, cosine", []),
    ("+ random erasing", "p = 0.25", ["data.augment.random_erasing=0.25"]),
    ("+ AutoAugment", "SVHN policy", ["data.augment.auto_augment=svhn"]),
    ("+ SAM", "rho 0.05", ["plugins.sam={rho: 0.05}"]),
    ("+ label smoothing", "0.1", ["plugins.label_smoothing={smoothing: 0.1}"]),
    ("+ TTA", "5 shifted views (2 px)", ["plugins.tta={flip: false, shift: 2}"]),
    ("+ EMA", "decay 0.99, warmup", ["plugins.ema={decay: 0.99, warmup: true}"]),
    ("+ mixup", "alpha 0.2 (no cutmix)", ["plugins.mixup={mixup_alpha: 0.2, cutmix_alpha: 0.0}"]),
]


def rung_overrides(index: int) -> list[str]:
    return [o for _, _, overrides in LADDER[:index + 1] for o in overrides]


def final_top1(run_dir: Path) -> tuple[str, float]:
    """The last evaluation's top-1 of the model one would ship: EMA and TTA where they are on."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val/top1" in r][-1]
    key = next(k for k in ("val_ema_tta/top1", "val_ema/top1", "val_tta/top1", "val/top1") if k in last)
    return key, last[key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (10)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "ablation.json")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs in --results")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table-only", action="store_true", help="print the table of --results; train nothing")
    args = parser.parse_args()

    from launcher.loop import train
    from launcher.recipe import load_recipe
    from launcher.shards import main as write_shards

    results = json.loads(args.results.read_text()) if (args.resume or args.table_only) and args.results.exists() else []
    if args.table_only:
        return table(results, args)
    tmp = Path(tempfile.mkdtemp(prefix="ablation-"))
    assert write_shards(["digits", "--out", str(tmp / "digits")]) == 0
    data = [f"data.train={tmp / 'digits' / 'train-{000000..000003}.tar'}",
            f"data.val={tmp / 'digits' / 'val-{000000..000000}.tar'}", "data.batch_size=64",
            "run.progress=false", "~plugins.report"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    done = {(r["rung"], r["seed"]) for r in results}
    for seed in args.seeds:
        for index, (rung, _, _) in enumerate(LADDER):
            if (rung, seed) in done:
                continue
            run_dir = tmp / f"{index}-{seed}"
            recipe = load_recipe(REPO / "recipes" / "digits.yaml",
                                 data + rung_overrides(index) + [f"seed={seed}", f"run.dir={run_dir}"])
            start = time.perf_counter()
            train(recipe)
            seconds = time.perf_counter() - start
            metric, top1 = final_top1(run_dir)
            results.append({"rung": rung, "seed": seed, "metric": metric, "top1": top1, "seconds": seconds})
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            print(f"[ablation] {rung:20s} seed {seed}: top-1 {top1:.4f} in {seconds:.0f} s", flush=True)
    return table(results, args)


def table(results: list[dict], args) -> int:
    from launcher.recipe import load_recipe

    seeds = sorted({r["seed"] for r in results})
    lines = [f"# Ablation ladder: digits (real data, 1,437 train / 360 val), seeds {seeds}", "",
             "Each rung adds one trick to the rung above (cumulative), as in the reference CIFAR-100 table.",
             "Top-1 is the final validation accuracy of the model one would ship (the metric column: EMA",
             "and TTA where they are on);",
             "360 validation images, so one image is 0.28 points.", "",
             "| rung | adds | metric | val top-1 % (mean ± std) | seeds | wall time per run (mean) | vs baseline |",
             "|---|---|---|---|---|---|---|"]
    base_time = None
    for rung, adds, _ in LADDER:
        runs = [r for r in results if r["rung"] == rung]
        if not runs:
            continue
        top1 = [100 * r["top1"] for r in runs]
        secs = statistics.mean(r["seconds"] for r in runs)
        base_time = base_time or secs
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        lines.append(f"| {rung} | {adds} | {runs[0]['metric']} | {statistics.mean(top1):.2f} ± {std:.2f} | {len(runs)} | "
                     f"{secs:.0f} s | {secs / base_time:.2f}x |")
    import torch

    epochs = args.epochs or load_recipe(REPO / "recipes" / "digits.yaml").train.epochs
    lines += ["", f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}; one process, "
              f"global batch 64, {epochs} epochs ({epochs * 23} optimizer steps)."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
