"""What an experiment costs beyond its trials' training, measured side by side in one run:

1. 4 one-process trials (digits, a WRN-10-1 at 8 px) with `run --parallel 2` against `run`
   one after another: the wall-time ratio (the goal: <= 0.6 on this 2-core machine);
2. the experiment's own cost per trial (driver, start, record): the sequential experiment's wall
   time against the same 4 trials launched directly (`python -m launcher TRIAL.yaml`, the recipe
   each trial froze), divided by 4 (the goal: <= 2 s);
3. `report` over 1,000 finished trials (10 rungs x 100 seeds) in a fresh process (the goal:
   <= 5 s). Their results are made up (random accuracies, written into a record against the
   experiment's own resolved recipes): a timing of the reading and the statistics, not a result.

    python benchmarks/experiment_overhead.py [--out benchmarks/results/experiment_overhead.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402


def experiment_file(folder: Path, data: dict, name: str, seeds: list[int], rungs: int, steps: int) -> Path:
    spec = {"recipe": str(REPO / "recipes" / "digits.yaml"), "dir": str(folder / name),
            "overrides": [f"data.train={data['train']}", f"data.val={data['val']}", f"train.max_steps={steps}",
                          "data.num_workers=0", "~plugins.report", "model.name=wrn10_1", "data.image_size=8",
                          "plugins.checkpoint={every_epochs: 1}"],
            "seeds": seeds, "metric": "val/top1",
            "rungs": [{"name": "baseline"}] + [{"name": f"+ smoothing {i}", "overrides": [
                f"plugins.label_smoothing={{smoothing: {0.01 * i:.2f}}}"]} for i in range(1, rungs)]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trial")
    parser.add_argument("--report-trials", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    work = Path(tempfile.mkdtemp(prefix="experiment-overhead-"))
    try:
        from launcher.data.writer import main as write_shards

        assert write_shards(["digits", "--out", str(work / "digits")]) == 0
        data = json.loads((work / "digits" / "info.json").read_text())
        experiment = [sys.executable, "-m", "launcher.experiment", "run"]
        # 1. parallel against sequential (alternating which goes first would need two more runs: the
        # sequential one goes first, so the page cache favours the parallel one a little, if at all).
        sequential = timed(experiment + [str(experiment_file(work, data, "sequential", [0, 1], 2, args.steps))], env)
        parallel = timed(experiment + [str(experiment_file(work, data, "parallel", [0, 1], 2, args.steps)),
                                       "--parallel", "2"], env)
        # 2. the same 4 trials launched directly, from the recipes the sequential experiment froze.
        direct = 0.0
        for trial in sorted((work / "sequential").glob("*/seed-*/trial.yaml")):
            run_dir = work / "direct" / trial.parent.parent.name / trial.parent.name
            direct += timed([sys.executable, "-m", "launcher", str(trial), f"run.dir={run_dir}"],
                            {**env, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
        per_trial = (sequential - direct) / 4
        # 3. report over many finished trials.
        from launcher.experiment.gather import expected_recipes
        from launcher.experiment.spec import load_experiment

        seeds = list(range(args.report_trials // 10))
        big = load_experiment(experiment_file(work, data, "big", seeds, 10, args.steps))
        trials = big.trials()
        expected = expected_recipes(big, trials)
        rng = random.Random(0)
        entries = [{"trial": t.name, "rung": t.rung, "combo": {}, "seed": t.seed, "recipe": expected[t.group],
                    "result": {"metric": "val/top1", "top1": (value := rng.uniform(0.8, 0.9)), "plain_top1": value,
                               "step": args.steps}} for t in trials]
        big.record.parent.mkdir(parents=True, exist_ok=True)
        big.record.write_text(json.dumps({"trials": entries}))
        report = timed([sys.executable, "-m", "launcher.experiment", "report", str(big.path)], env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    lines = ["# Experiment overhead", "",
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}; digits, WRN-10-1 at 8 px, {args.steps} steps "
             "a trial, one process each.", "",
             "| measure | value | goal |", "|---|---|---|",
             f"| 4 trials: `--parallel 2` / one after another (wall) | {parallel:.1f} s / {sequential:.1f} s = "
             f"{parallel / sequential:.2f} | <= 0.6 |",
             f"| the experiment's own cost per trial: (sequential experiment {sequential:.1f} s - the 4 trials "
             f"launched directly {direct:.1f} s) / 4 | {per_trial:.2f} s | <= 2 s |",
             f"| `report` over {len(trials)} finished trials (fresh process, imports included) | {report:.2f} s | "
             "<= 5 s |"]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
