"""Where the digits demo's step time goes: train/data_wait with 0 and 2 loader workers, side by
side in one run, and what measuring it costs per step.

    python benchmarks/data_wait.py [--epochs 2] [--out benchmarks/results/data_wait.md]

recipes/digits.yaml on one CPU process (its batch of 32, its augmentation), the shards written
here. data_wait is the share of step time the loop waited for its next batch (rank 0, per
logged row); the table gives its mean over the rows after the first (the first holds the
loader's start) and whether the run warned that the loader starves it. The cost is the meter's
own time per step (timing a pass of dummy items through it) against the measured step time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402
from launcher.config.load import load_recipe  # noqa: E402
from launcher.data.writer import main as write_shards  # noqa: E402
from launcher.loop import train  # noqa: E402
from launcher.throughput import DataWait  # noqa: E402


def meter_seconds_per_step(steps: int = 200_000) -> float:
    meter = DataWait()
    start = time.perf_counter()
    for _ in meter.batches(range(steps)):
        meter.step_done()
        meter.starved_share()  # the loop asks every step
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run earlier (the tests' cheap setting)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert write_shards(["digits", "--out", str(tmp / "digits")]) == 0
    info = json.loads((tmp / "digits" / "info.json").read_text())
    rows = []
    for workers in (0, 2):
        overrides = [f"data.train={info['train']}", f"data.val={info['val']}", f"data.num_workers={workers}",
                     f"train.epochs={args.epochs}", "run.progress=false", f"run.dir={tmp / f'w{workers}'}",
                     "~plugins.report"] + ([f"train.max_steps={args.max_steps}"] if args.max_steps else [])
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            train(load_recipe(REPO / "recipes" / "digits.yaml", overrides))
        logged = [json.loads(line) for line in (tmp / f"w{workers}" / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in logged if "train/data_wait" in r]
        steady = logged[1:] or logged
        rate = statistics.median(r["train/samples_per_s"] for r in steady)
        rows.append((workers, statistics.mean(r["train/data_wait"] for r in steady),
                     max(r["train/data_wait"] for r in steady), rate, "waited for data" in err.getvalue()))
    meter = meter_seconds_per_step()
    step_seconds = 32 / max(rate for *_, rate, _ in rows)  # the faster configuration's step
    lines = [f"# data_wait: recipes/digits.yaml on 1 CPU process ({platform.processor() or platform.machine()}, "
             f"{__import__('os').cpu_count()} cores, {time.strftime('%Y-%m-%d')})", "",
             "| data.num_workers | mean data_wait | max data_wait (a row) | samples/s (median) | starved-loader warning |",
             "|---|---|---|---|---|"]
    for workers, mean, peak, rate, warned in rows:
        lines.append(f"| {workers} | {100 * mean:.1f}% | {100 * peak:.1f}% | {rate:,.0f} | {'yes' if warned else 'no'} |")
    lines += ["", f"The meter's own cost: {meter * 1e6:.2f} us per step, {100 * meter / step_seconds:.3f}% of a "
                  f"{step_seconds * 1e3:.1f} ms step (the goal: at most 1%)."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
