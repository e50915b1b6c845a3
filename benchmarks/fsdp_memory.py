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

On GPUs (`make gpu-check` runs it there, section (e)):

    python benchmarks/fsdp_memory.py --gpus 2 --out /tmp/fsdp_gpu.md

a ViT-B/16 at 224 px (86M parameters), AdamW, bf16 (amp), batch 32 per GPU: images/s over the
steps after the warm-up and the peak CUDA memory per rank (torch.cuda.max_memory_allocated), for
DDP, FSDP full sharding (bf16 MixedPrecisionPolicy) and FSDP with activation checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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
        self.step_times = []
        if ctx.accelerator.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(ctx.accelerator.device)

    def before_optimizer_step(self, ctx):
        params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        state = sum(local_bytes(p) for p in params) + sum(local_bytes(p.grad) for p in params if p.grad is not None)
        state += sum(local_bytes(t) for s in ctx.optimizer.state.values() for t in s.values() if hasattr(t, "numel"))
        self.state = state
        if ctx.accelerator.device.type == "cuda":
            import torch

            torch.cuda.synchronize(ctx.accelerator.device)
        self.step_times.append(time.perf_counter())

    def on_train_end(self, ctx):
        rss, peak = resident()
        report = {"state": self.state, "peak_growth": peak - self.start, "start": self.start,
                  "step_times": self.step_times}
        if ctx.accelerator.device.type == "cuda":
            import torch

            report["cuda_peak"] = torch.cuda.max_memory_allocated(ctx.accelerator.device)
        out = Path(os.environ["BENCH_MEMORY_OUT"]) / f"rank{ctx.rank}.json"
        out.write_text(json.dumps(report))


def run(name: str, work: Path, model: dict, data: dict, steps: int, env: dict, processes: int, **sections) -> list[dict]:
    """One launch of `processes` ranks; each rank's bench_memory report."""
    import yaml

    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    recipe = {
        "seed": 0, "run": {"dir": str(out / "run"), "progress": False, "log_every": 1000},
        "model": model, "data": {"val": None, "num_workers": 0, **data},
        "train": {"epochs": 1, "max_steps": steps},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
        "schedule": {"name": "cosine"},
        **sections,
    }
    recipe["plugins"] = {"bench_memory": {}, **sections.get("plugins", {})}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAUNCHER_PLUGINS": "benchmarks.fsdp_memory",
           "BENCH_MEMORY_OUT": str(out), **env}
    from launcher.strategies.select import free_port

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "launcher", str(path)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def synthetic_shards(work: Path, samples: int, size: int, classes: int) -> dict:
    from launcher.data.writer import main as write_shards

    assert write_shards(["synthetic", "--out", str(work / "shards"), "--num-classes", str(classes), "--train",
                         str(samples), "--val", "16", "--size", str(size)]) == 0
    return json.loads((work / "shards" / "info.json").read_text())


def cpu_table(steps: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = synthetic_shards(work, 16 * steps, 32, 10)
        model = {"name": "vit_small_patch16_224", "num_classes": 10, "kwargs": {"img_size": 32, "patch_size": 4}}
        data = {"train": shards["train"], "batch_size": 8, "image_size": 32}
        ranks = {}
        for fixed in (True, False):
            env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                   **({"MALLOC_MMAP_THRESHOLD_": "65536"} if fixed else {})}
            for strategy in ("ddp", "fsdp"):
                ranks[strategy, fixed] = run(f"{strategy}-{fixed}", work, model, data, steps, env, 2,
                                             distributed={"strategy": strategy})

    def worst(strategy: str, key: str, fixed: bool = True) -> int:
        return max(r[key] for r in ranks[strategy, fixed])

    import torch

    lines = ["# Memory per rank: FSDP (full sharding) vs DDP, 2 CPU processes", "",
             f"ViT-S, patches of 4 at 32 px (22M parameters), AdamW, batch 8 per rank, {steps} steps; "
             f"torch {torch.__version__}. The larger of the two ranks.", "",
             "| per rank | DDP | FSDP | FSDP / DDP |", "|---|---|---|---|"]
    for key, name, fixed in (("state", "training state (weights, gradients, AdamW moments)", True),
                             ("peak_growth", "peak RSS growth from the built model (MALLOC_MMAP_THRESHOLD_=65536)", True),
                             ("peak_growth", "peak RSS growth from the built model (glibc's malloc as it comes)", False)):
        ddp, fsdp = worst("ddp", key, fixed), worst("fsdp", key, fixed)
        lines.append(f"| {name} | {ddp / MiB:,.0f} MiB | {fsdp / MiB:,.0f} MiB | {fsdp / ddp:.2f} |")
    return lines


def gpu_table(gpus: int, steps: int, warmup: int, batch: int, model_name: str, size: int) -> list[str]:
    """ViT-B/16 at 224 px, bf16: images/s and peak CUDA memory per rank, DDP vs FSDP (see above).
    Without CUDA it runs on CPU processes (a smoke test of this code; no memory column)."""
    import torch

    legs = [("DDP", {"strategy": "ddp"}), ("FSDP full, bf16 policy", {"strategy": "fsdp"}),
            ("FSDP full, bf16 policy, activation checkpointing",
             {"strategy": "fsdp", "fsdp_activation_checkpointing": True})]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = synthetic_shards(work, batch * gpus * (steps + 1), size, 1000)
        model = {"name": model_name, "num_classes": 1000, "kwargs": {"img_size": size}}
        data = {"train": shards["train"], "batch_size": batch, "image_size": size, "streams": gpus}
        for i, (label, distributed) in enumerate(legs):
            results[label] = run(f"leg{i}", work, model, data, steps, {"CUDA_VISIBLE_DEVICES": ",".join(
                str(g) for g in range(gpus))}, gpus, distributed=distributed, plugins={"amp": {"dtype": "bf16"}})
    lines = [f"## (e) FSDP vs DDP on {gpus} GPU(s): {model_name}, {size} px, AdamW, bf16, batch {batch} per GPU", "",
             "| strategy | images/s | peak CUDA memory per rank | vs DDP: speed | vs DDP: memory |",
             "|---|---|---|---|---|"]
    base_rate = base_memory = None
    for label, ranks in results.items():
        times = ranks[0]["step_times"]
        rate = batch * gpus * (len(times) - 1 - warmup) / (times[-1] - times[warmup])
        memory = max(r.get("cuda_peak", 0) for r in ranks)
        base_rate, base_memory = base_rate or rate, base_memory or memory
        shown = f"{memory / 2 ** 30:.2f} GiB | " if memory else "n/a (CPU) | "
        lines.append(f"| {label} | {rate:,.0f} | {shown}{rate / base_rate:.2f}x | "
                     + (f"{memory / base_memory:.2f}x |" if memory else "n/a |"))
    lines += ["", f"Steps {warmup + 1}..{steps} timed; torch {torch.__version__}. "
              + ("One GPU shards nothing: FSDP's memory saving needs 2 or more." if gpus == 1 else "")]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (CPU 4, GPU 30)")
    parser.add_argument("--gpus", type=int, default=0, help="run the GPU comparison on this many GPUs")
    parser.add_argument("--warmup", type=int, default=10, help="GPU: steps left out of the timing")
    parser.add_argument("--batch", type=int, default=32, help="GPU: batch per GPU")
    parser.add_argument("--model", default="vit_base_patch16_224", help="GPU: a timm ViT")
    parser.add_argument("--image-size", type=int, default=224, help="GPU: image size")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.gpus:
        lines = gpu_table(args.gpus, args.steps or 30, args.warmup, args.batch, args.model, args.image_size)
    else:
        lines = cpu_table(args.steps or 4)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
