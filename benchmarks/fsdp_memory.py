"""Memory per rank: FSDP (full sharding) against DDP, 2 CPU processes, side by side in one run.

    python benchmarks/fsdp_memory.py --out benchmarks/results/fsdp_memory_cpu.md

A model whose optimizer state dominates: a ViT-S with 4-pixel patches at 32 px (22M
parameters) trained with AdamW (weights, gradients and two moments: 16 bytes a parameter),
a few steps of batch 8 per rank on synthetic shards. Each rank reports, through the
bench_memory plugin below (loaded with LAUNCHER_PLUGINS):

  training state   the bytes of this rank's parameters, gradients and optimizer state
                   (under FSDP the local shards), at the last step's optimizer step
  peak RSS growth  the process's peak resident memory (VmHWM) from the moment the model is
                   built (the peak is reset then: /proc/self/clear_refs) to the end of training,
                   minus its resident memory at that moment: what training added, DDP's
                   buckets, FSDP's gathered parameters and the activations included. Measured
                   twice: with glibc's malloc as it comes, and with MALLOC_MMAP_THRESHOLD_=65536,
                   which serves every block of 64 KiB or more by mmap and returns it when freed.
                   As it comes, glibc raises its mmap threshold after the first large frees and
                   then keeps freed blocks in its heap, so the RSS also counts what the allocator
                   holds for reuse (FSDP frees each block's gathered weights after using them);
                   the fixed threshold measures what training itself holds.

The ratio column is FSDP / DDP (the issue's goal: peak memory per rank <= 0.6x DDP with full
sharding). Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402
from launcher.registry import Plugin, register  # noqa: E402

MiB = 2 ** 20


def resident() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard
    return local.numel() * local.element_size()


@register("bench_memory")
class MemoryReport(Plugin):
    """Benchmark helper: this rank's training-state bytes and peak RSS growth (see above)."""

    def setup(self, ctx):  # the model is built; DDP's buckets and FSDP's sharding come after
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.start = resident()[0]
        self.state = 0

    def before_optimizer_step(self, ctx):
        params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        state = sum(local_bytes(p) for p in params) + sum(local_bytes(p.grad) for p in params if p.grad is not None)
        state += sum(local_bytes(t) for s in ctx.optimizer.state.values() for t in s.values() if hasattr(t, "numel"))
        self.state = state

    def on_train_end(self, ctx):
        rss, peak = resident()
        out = Path(os.environ["BENCH_MEMORY_OUT"]) / f"rank{ctx.rank}.json"
        out.write_text(json.dumps({"state": self.state, "peak_growth": peak - self.start, "start": self.start}))


def run(strategy: str, work: Path, shards: dict, steps: int, fixed_threshold: bool) -> list[dict]:
    import yaml

    out = work / f"{strategy}-{fixed_threshold}"
    out.mkdir(parents=True, exist_ok=True)
    recipe = {
        "seed": 0, "run": {"dir": str(out / "run"), "progress": False, "log_every": 1000},
        "model": {"name": "vit_small_patch16_224", "num_classes": 10, "kwargs": {"img_size": 32, "patch_size": 4}},
        "data": {"train": shards["train"], "val": None, "batch_size": 8, "num_workers": 0, "image_size": 32},
        "train": {"epochs": 1, "max_steps": steps},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
        "schedule": {"name": "cosine"},
        "distributed": {"strategy": strategy},
        "plugins": {"bench_memory": {}},
    }
    path = work / f"{strategy}-{fixed_threshold}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "LAUNCHER_PLUGINS": "benchmarks.fsdp_memory",
           "BENCH_MEMORY_OUT": str(out), "OMP_NUM_THREADS": "1"}
    if fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    from launcher.distributed import free_port

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "launcher", str(path)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{strategy} run failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from launcher.shards import main as write_shards

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assert write_shards(["synthetic", "--out", str(work / "shards"), "--num-classes", "10", "--train",
                             str(16 * args.steps), "--val", "16", "--size", "32"]) == 0
        shards = json.loads((work / "shards" / "info.json").read_text())
        ranks = {(strategy, fixed): run(strategy, work, shards, args.steps, fixed)
                 for fixed in (True, False) for strategy in ("ddp", "fsdp")}

    def worst(strategy: str, key: str, fixed: bool = True) -> int:
        return max(r[key] for r in ranks[strategy, fixed])

    import torch

    lines = ["# Memory per rank: FSDP (full sharding) vs DDP, 2 CPU processes", "",
             f"ViT-S, patches of 4 at 32 px (22M parameters), AdamW, batch 8 per rank, {args.steps} steps; "
             f"torch {torch.__version__}. The larger of the two ranks.", "",
             "| per rank | DDP | FSDP | FSDP / DDP |", "|---|---|---|---|"]
    for key, name, fixed in (("state", "training state (weights, gradients, AdamW moments)", True),
                             ("peak_growth", "peak RSS growth from the built model (MALLOC_MMAP_THRESHOLD_=65536)", True),
                             ("peak_growth", "peak RSS growth from the built model (glibc's malloc as it comes)", False)):
        ddp, fsdp = worst("ddp", key, fixed), worst("fsdp", key, fixed)
        lines.append(f"| {name} | {ddp / MiB:,.0f} MiB | {fsdp / MiB:,.0f} MiB | {fsdp / ddp:.2f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
