"""Resume seeks, it does not replay: the time from launch to the first resumed step, for a
checkpoint taken at 10% and at 90% of an epoch, side by side in one run.

    python benchmarks/resume_time.py [--samples 20000]

A replaying resume would read and discard 90% of the epoch in the second case; here both
resumes jump straight to the next step, so the two times should be about equal.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402
from launcher.loop import train  # noqa: E402
from launcher.config.load import load_recipe  # noqa: E402
from launcher.registry import Plugin, register  # noqa: E402
from launcher.data.writer import main as write_shards  # noqa: E402


ACTIVE = False  # set while timing resumes; the plugin is in both runs so their recipes match


@register("bench_first_step")
class FirstStep(Plugin):
    """Benchmark helper: notes when the first optimizer step of a run ends (and stops it)."""

    at = None

    def after_optimizer_step(self, ctx):
        if ACTIVE and self.at is None:
            self.at = time.perf_counter()
            ctx.stop_training = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    assert write_shards(["synthetic", "--out", str(tmp / "data"), "--num-classes", "10", "--train",
                         str(args.samples), "--val", "64", "--shard-size", "1000"]) == 0
    last_shard = f"{args.samples // 1000 - 1:06d}"
    base = [f"data.train={tmp / 'data'}/train-{{000000..{last_shard}}}.tar",
            "data.val=null", "model.name=wrn10_1", "data.image_size=32", "data.num_workers=2", "data.batch_size=64",
            "run.progress=false", "train.epochs=1", "schedule.warmup_epochs=0"]
    steps = -(-args.samples // 64)
    results = {}
    for fraction in (0.1, 0.9):
        at = max(1, int(fraction * steps))
        run = tmp / f"run{fraction}"
        # Train up to the checkpoint once...
        plugins = f"plugins={{checkpoint: {{every_steps: {at}, keep_last: 5}}, bench_first_step: {{}}}}"
        global ACTIVE
        ACTIVE = False
        train(load_recipe(REPO / "recipes" / "digits.yaml", base + [f"run.dir={run}", f"train.max_steps={at}", plugins]))
        ACTIVE = True
        times = []
        for _ in range(args.repeats):
            # ...then resume from it, timing launch -> first resumed step (the run stops there,
            # before any new checkpoint, so every repeat resumes from the same one).
            recipe = load_recipe(REPO / "recipes" / "digits.yaml",
                                 base + [f"run.dir={run}", f"train.max_steps={at + 1}", plugins])
            start = time.perf_counter()
            ctx = train(recipe)
            assert ctx.step == at + 1
            times.append(next(p for p in ctx.plugins if p.name == "bench_first_step").at - start)
            for newer in (run / "checkpoints").glob("step-*"):  # the run's end-of-run checkpoint
                if int(newer.name.split("-")[1]) > at:
                    shutil.rmtree(newer)
        results[fraction] = (at, statistics.median(times))
    lines = [f"# Time from launch to the first resumed step ({args.samples} samples, {steps} steps per epoch, "
             "2 loader workers; median of {} resumes)".format(args.repeats), "",
             "| checkpoint position | step | launch -> first resumed step |", "|---|---|---|"]
    for fraction, (at, seconds) in results.items():
        lines.append(f"| {fraction:.0%} of the epoch | {at} | {seconds:.2f} s |")
    lines.append(f"| ratio 90% / 10% | | {results[0.9][1] / results[0.1][1]:.2f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
