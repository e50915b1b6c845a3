"""The per-step cost of each training plugin relative to the loop with no plugins, measured
side by side in one run (configurations alternate, so machine noise hits all of them).

    python benchmarks/plugin_cost.py [--steps 25 --repeats 2 --model resnet18]

Expected from the papers and the implementations: label smoothing ~1.0x, EMA a few percent,
SAM about 2x (two forward/backward passes), grad_accum close to 1x (smaller matrix products),
distillation 1x plus one teacher forward. tta acts at evaluation only (no training cost).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.loop_overhead import launcher_run, medians  # noqa: E402
from benchmarks.emit_results import emit  # noqa: E402
from launcher.data.writer import main as write_shards  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "digits.yaml"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    # ResNet-18 at 32 px, the setting of the committed results (the digits demo itself trains a WRN-10-2 at 16 px).
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    assert write_shards(["digits", "--out", str(tmp / "digits")]) == 0
    overrides = [f"data.train={tmp / 'digits' / 'train-{000000..000003}.tar'}", f"run.dir={tmp / 'run'}",
                 "data.num_workers=0", "data.streams=1"]
    overrides += [f"model.name={args.model}", f"data.image_size={args.image_size}"]
    # A teacher of the same architecture: the cost of distillation is one extra forward.
    teacher_model, _, recipe = launcher_run(args.recipe, overrides + [f"run.dir={tmp / 'teacher'}"], 1)
    configs = {
        "none": {},
        "label_smoothing": {"label_smoothing": {"smoothing": 0.1}},
        "ema": {"ema": {"decay": 0.999}},
        "sam": {"sam": {"rho": 0.05}},
        "grad_accum (k=2)": {"grad_accum": {"micro_batches": 2}},
        # On a CPU without native bf16 (no AVX512-BF16/AMX) autocast emulates it: very slow.
        "amp (bf16)": {"amp": {"dtype": "bf16"}},
        "distill": {"distill": {"checkpoint": str(tmp / "teacher")}},
    }
    launcher_run(args.recipe, overrides, args.warmup + 2)  # discarded: the first run in a process is slower
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, plugins in configs.items():
            _, step_times, _ = launcher_run(args.recipe, overrides, args.steps, plugins)
            times[name] += step_times[args.warmup:]
    base_wall, base_cpu = medians(times["none"])
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    lines = [f"# Per-step cost of each plugin ({recipe.model.name}, batch {recipe.data.batch_size}, "
             f"{args.steps} steps x {args.repeats} alternating runs, {device}, torch {torch.__version__})", "",
             "| plugin | median step, wall | relative (wall) | median step, process CPU | relative (CPU) |",
             "|---|---|---|---|---|"]
    for name, ts in times.items():
        wall, cpu = medians(ts)
        lines.append(f"| {name} | {wall * 1e3:.1f} ms | {wall / base_wall:.2f}x | {cpu * 1e3:.1f} ms | "
                     f"{cpu / base_cpu:.2f}x |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
