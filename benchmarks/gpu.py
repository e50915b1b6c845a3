"""The one-command GPU check (`make gpu-check`): the GPU tests, then training speed side by side.

    python benchmarks/gpu.py --out benchmarks/results/gpu.md     # on a GPU (budget: 8 minutes)
    python benchmarks/gpu.py --tiny --out /tmp/gpu.md            # anywhere: the same code, tiny sizes

In one process, on one device, on the same synthetic raw-uint8 shards:
  (a) tests/test_gpu.py (pytest -m gpu; skipped without CUDA), its summary and measured differences;
  (b) training images/s for each model config (resnet50 at 224, wrn28_10 at 32; bf16 autocast,
      channels_last), eager and compiled, for three loops: the launcher (train() with the amp
      plugin), a plain PyTorch loop and a timm train.py-style loop (timm's optimizer factory and
      PrefetchLoader, torch.compile as train.py --torchcompile), reading the same stream; their
      ratios; model FLOPs utilisation (training FLOPs per image from torch.utils.flop_counter,
      against the device's dense bf16 peak from launcher.throughput.PEAK_TFLOPS);
  (c) whether two deterministic runs, the launcher and the plain loop, end with bit-identical weights;
  (d) loader-only images/s (the launcher's workers, CIFAR-style augmentation) against the training
      images/s, and the time to an epoch's first batch with workers forked for it and persistent;
  (e) with CUDA: FSDP (full sharding, bf16 policy, with and without activation checkpointing)
      against DDP on every GPU (up to 8): ViT-B/16 images/s and peak memory per rank;
  (f) small images at device speed: the WRN config trained by the launcher with CIFAR augmentation
      (crop 4 + flip + AutoAugment cifar10 + random erasing 0.5, data.augment_on: device) against
      the same model on uint8 batches already in device memory with the same batched ops;
and writes it all, with the device name and versions, as markdown.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.emit_results import emit  # noqa: E402
from launcher.data import EpochPlan, TrainStream, batches, index_shards, on_device  # noqa: E402
from launcher.loop import set_gpu_numerics, train  # noqa: E402
from launcher.models.factory import create_model, memory_format  # noqa: E402
from launcher.optim import create_optimizer, default_param_groups  # noqa: E402
from launcher.config.load import validate_recipe  # noqa: E402
from launcher.registry import Plugin, PluginOptions, register  # noqa: E402
from launcher.data.transforms import ImageTransform  # noqa: E402
from launcher.throughput import peak_tflops  # noqa: E402

@dataclass
class Config:
    model: str
    size: int
    batch: int
    classes: int


FULL = [Config("resnet50", 224, 256, 1000), Config("wrn28_10", 32, 128, 100)]
# resnet10t at 32px, not 16: at 16px its layer4 conv (3x3, stride 2) sees 1x1 maps, and torch 2.14's CPU
# bf16 kernel for that conv's weight gradient returns garbage on AMX Xeons (up to 1e37, a different
# value each run: an upstream oneDNN bug, reproduced with F.conv2d alone; 2x2 maps and stride 1 are
# fine; oneDNN has fixed strided AMX conv bugs of this kind before, e.g. uxlfoundation/oneDNN#5494),
# which made (c) report a launcher/plain-loop difference that neither loop caused.
TINY = [Config("resnet10t", 32, 4, 10), Config("wrn10_1", 16, 8, 10)]


@register("gpu_bench_timer")
class Timer(Plugin):
    """Benchmark helper: wall time of optimizer steps warmup+1..end, synchronised at both ends."""

    class Options(PluginOptions):
        warmup: int = 1

    def __init__(self, options):
        super().__init__(options)
        self.start, self.seconds = None, None

    def after_optimizer_step(self, ctx):
        if ctx.step == self.options.warmup:
            self.start = synced_clock()
        elif ctx.step == ctx.total_steps:
            self.seconds = synced_clock() - self.start


def synced_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def write_shards(folder: Path, samples: int, size: int, classes: int) -> str:
    """Random uint8 images as raw .npy WebDataset samples (no decode cost), written with tarfile."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_shard = 512
    shards = -(-samples // per_shard)
    for s in range(shards):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                buffer = io.BytesIO()
                np.save(buffer, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                for ext, data in (("npy", buffer.getvalue()), ("cls", str(i % classes).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"train-{{000000..{shards - 1:06d}}}.tar")


def recipe_for(cfg: Config, pattern: str, run_dir: Path, steps: int, warmup: int, workers: int, compile_option,
               deterministic: bool = False, augment: dict | None = None):
    return validate_recipe({
        "seed": 0,
        "run": {"dir": str(run_dir), "log_every": 10 ** 6, "progress": False},
        "model": {"name": cfg.model, "num_classes": cfg.classes},
        "data": {"train": pattern, "batch_size": cfg.batch, "num_workers": workers, "image_size": cfg.size,
                 "streams": 1, "augment": augment or {"hflip": 0.5}},
        "train": {"epochs": 1, "max_steps": steps, "compile": compile_option, "deterministic": deterministic},
        "optimizer": {"name": "momentum", "lr": 0.1, "weight_decay": 5e-5},
        "schedule": {"name": "constant"},
        "plugins": {"amp": {"dtype": "bf16"}, "gpu_bench_timer": {"warmup": warmup}},
    })


def launcher_loop(recipe):
    """images/s of the launcher itself, and its final weights."""
    ctx = train(recipe)
    timer = next(p for p in ctx.plugins if p.name == "gpu_bench_timer")
    images = (ctx.total_steps - timer.options.warmup) * recipe.data.batch_size
    return images / timer.seconds, ctx.accelerator.unwrap_model(ctx.model).state_dict()


def the_stream(recipe, uint8: bool):
    """The launcher's training stream of epoch 0 (the same one train() reads); uint8 samples
    (normalised by transform.finish) as the launcher does on CUDA."""
    data = recipe.data
    index = index_shards(data.train, "data.train", data.cache_dir)
    plan = EpochPlan(tuple(int(n) for n in index.shard_sizes), global_batch=data.batch_size, streams=1,
                     world_size=1, seed=recipe.seed, shuffle=data.shuffle, window=data.shuffle_window)
    # The path the launcher takes for this recipe (data.augment_on: auto picks the device for flips).
    transform = ImageTransform(data, recipe.model.in_chans, train=True, normalize_on_device=uint8,
                               batched=data.augment_on == "device")
    return TrainStream(index, plan, transform, epoch=0, rank=0), transform


def plain_loop(recipe, device: torch.device):
    """A hand-written loop doing what the launcher does for this recipe (same initial weights,
    batches, optimizer, autocast and normalisation), without Accelerate or plugins."""
    from accelerate.utils import set_seed

    set_gpu_numerics(recipe.train)
    set_seed(recipe.seed)
    fmt = memory_format(recipe.model, device, "bf16")
    model = create_model(recipe.model).to(device, memory_format=fmt)
    groups = default_param_groups(model, recipe.optimizer)
    optimizer = create_optimizer(recipe.optimizer, groups, fused=device.type == "cuda")
    if recipe.train.compile is not None:
        model.compile(**recipe.train.compile.kwargs())
    set_seed(recipe.seed)  # the launcher reseeds after setup too (rank 0: the same seed)
    stream, transform = the_stream(recipe, uint8=device.type == "cuda")
    start, step, warmup = None, 0, recipe.plugins["gpu_bench_timer"]["warmup"]
    model.train()
    for batch in on_device(batches(stream, recipe.data.num_workers, pin_memory=device.type == "cuda"), device, fmt,
                           transform.finish):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(batch.images), batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step == warmup:
            start = synced_clock()
        if step == recipe.train.max_steps:
            break
    seconds = synced_clock() - start
    return (step - warmup) * recipe.data.batch_size / seconds, model.state_dict()


class _Pairs:
    """The stream's batches as (uint8 images, targets) pairs, as timm's loaders yield them."""

    def __init__(self, stream, workers: int, pin: bool):
        self.stream, self.workers, self.pin = stream, workers, pin

    def __iter__(self):
        for batch in batches(self.stream, self.workers, pin_memory=self.pin):
            yield batch.images, batch.targets

    def __len__(self):
        return len(self.stream)


def timm_loop(recipe, device: torch.device):
    """timm train.py's step (train_one_epoch without logging): timm's optimizer factory, its
    PrefetchLoader (uint8 -> normalised on the device on a side stream), autocast, backward,
    step; `torch.compile(model)` as train.py --torchcompile."""
    import timm
    from timm.data.loader import PrefetchLoader
    from timm.optim import create_optimizer_v2

    torch.manual_seed(recipe.seed)
    m, o = recipe.model, recipe.optimizer
    model = timm.create_model(m.name, num_classes=m.num_classes).to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    if recipe.train.compile is not None:
        model = torch.compile(model, backend=recipe.train.compile.backend, mode=recipe.train.compile.mode)
    data = recipe.data
    stream, _ = the_stream(recipe, uint8=True)  # PrefetchLoader normalises on the device
    loader = _Pairs(stream, data.num_workers, device.type == "cuda")
    if device.type == "cuda":
        loader = PrefetchLoader(loader, mean=data.mean, std=data.std, device=device)
    start, step, warmup = None, 0, recipe.plugins["gpu_bench_timer"]["warmup"]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255  # off CUDA: PrefetchLoader's normalisation by hand
    std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
    model.train()
    for images, targets in loader:
        if device.type != "cuda":
            images = images.float().sub_(mean).div_(std)
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == warmup:
            start = synced_clock()
        if step == recipe.train.max_steps:
            break
    return (step - warmup) * recipe.data.batch_size / (synced_clock() - start)


CIFAR_AUGMENT = {"crop_padding": 4, "hflip": 0.5, "auto_augment": "cifar10", "random_erasing": 0.5}


def in_memory_loop(recipe, device: torch.device) -> float:
    """(f) images/s of the same model, optimizer and autocast on uint8 batches already in device
    memory (no loader at all), augmented by the same batched ops the launcher's device path runs."""
    from accelerate.utils import set_seed

    from launcher.data import decode_image
    from launcher.data.augment import BatchAugment, sample_keys

    data = recipe.data
    index = index_shards(data.train, "data.train", data.cache_dir)
    files: dict = {}
    images = torch.stack([decode_image(*index.read_image(i, files)) for i in range(len(index))]).to(device)
    labels = torch.from_numpy(index.labels.astype(np.int64)).to(device)
    set_gpu_numerics(recipe.train)
    set_seed(recipe.seed)
    fmt = memory_format(recipe.model, device, "bf16")
    model = create_model(recipe.model).to(device, memory_format=fmt)
    optimizer = create_optimizer(recipe.optimizer, default_param_groups(model, recipe.optimizer),
                                 fused=device.type == "cuda")
    augment = BatchAugment(data.augment, data.image_size, data.mean, data.std)
    start, warmup, batch = None, recipe.plugins["gpu_bench_timer"]["warmup"], data.batch_size
    model.train()
    for step in range(1, recipe.train.max_steps + 1):
        ids = (torch.arange(batch) + step * batch) % len(images)
        params = {k: v.to(device) for k, v in augment.params(sample_keys(recipe.seed, 0, ids.numpy()),
                                                               data.image_size, data.image_size).items()}
        x = augment.apply(images[ids.to(device)], params).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), labels[ids.to(device)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == warmup:
            start = synced_clock()
    return (recipe.train.max_steps - warmup) * batch / (synced_clock() - start)


def training_flops_per_image(cfg: Config, device: torch.device) -> float:
    """Forward + backward FLOPs of one image (torch.utils.flop_counter: matmuls and convolutions)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model(cfg.model, num_classes=cfg.classes).to(device)
    images = torch.randn(2, 3, cfg.size, cfg.size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        F.cross_entropy(model(images), torch.zeros(2, dtype=torch.long, device=device)).backward()
    return counter.get_total_flops() / 2


def loader_only(recipe, device: torch.device, batches_to_read: int) -> tuple[float, float, float]:
    """(images/s of the launcher's loader workers with nothing training, seconds to an epoch's first
    batch with workers forked for it, and with persistent workers kept from the epoch before)."""
    from launcher.data import PersistentWorkers

    stream, transform = the_stream(recipe, uint8=device.type == "cuda")
    workers = PersistentWorkers(recipe.data.num_workers, device.type == "cuda")
    firsts = []
    try:
        for epoch in range(2):
            stream.epoch = epoch
            start = time.perf_counter()
            iterator = on_device(batches(stream, recipe.data.num_workers, pin_memory=device.type == "cuda",
                                         workers=workers), device, torch.contiguous_format, transform.finish)
            next(iterator)
            firsts.append(time.perf_counter() - start)
            start, n = synced_clock(), 0
            for i, batch in enumerate(iterator):
                n += len(batch.targets)
                if i + 1 >= batches_to_read:
                    break
            rate = n / (synced_clock() - start)
            iterator.close()
    finally:
        workers.close()
    return rate, firsts[0], firsts[1]


def run_gpu_tests(timeout: int) -> list[str]:
    """(a) tests/test_gpu.py: its summary line and the differences it prints."""
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-s", "-m", "gpu", "tests/test_gpu.py",
                                 "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out = result.stdout.splitlines()
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace").splitlines() + [f"TIMED OUT after {timeout} s"]
    measured = [line.strip() for line in out if line.strip().startswith("[gpu]")]
    summary = [line for line in out if " passed" in line or " failed" in line or " skipped" in line
               or "error" in line.lower() or "TIMED OUT" in line][-3:]
    return [f"- {line}" for line in measured + summary] or ["- (no output)"]


def fsdp_against_ddp(timeout: int) -> list[str]:
    """(e) benchmarks/fsdp_memory.py --gpus N: ViT-B images/s and peak memory, FSDP vs DDP."""
    gpus = torch.cuda.device_count()
    if not gpus:
        return ["- skipped: needs CUDA GPUs (the CPU measurement is benchmarks/results/fsdp_memory_cpu.md)"]
    out = Path(tempfile.mkdtemp(prefix="fsdp-gpu-")) / "fsdp.md"
    try:
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fsdp_memory.py"), "--gpus", str(min(gpus, 8)),
                                 "--steps", "25", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"- TIMED OUT after {timeout} s"]
    if result.returncode != 0 or not out.is_file():
        return ["- FAILED:", "", "```", *result.stderr.splitlines()[-15:], "```"]
    return out.read_text().splitlines()[2:]  # without its own heading


def versions() -> str:
    import accelerate
    import timm

    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, "
            f"accelerate {accelerate.__version__}, Python {platform.python_version()}")


def device_description(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", None
    return torch.cuda.get_device_name(device), peak_tflops(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, images and step counts (CPU tests)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default 40; tiny 4)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 15; tiny 2)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: CPU cores - 2, at most 12)")
    parser.add_argument("--compile-backend", default=None, help="default inductor (tiny: aot_eager)")
    parser.add_argument("--no-tests", action="store_true", help="skip (a), tests/test_gpu.py")
    parser.add_argument("--test-timeout", type=int, default=200, help="seconds for (a)")
    parser.add_argument("--fsdp-timeout", type=int, default=240, help="seconds for (e)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    note = ""
    if device.type != "cuda" and not args.tiny:
        args.tiny = True
        note = "No CUDA device here: the same check at tiny sizes on the CPU (figures say nothing about a GPU)."
        print(note, flush=True)
    configs = TINY if args.tiny else FULL
    steps = args.steps or (4 if args.tiny else 40)
    warmup = args.warmup or (2 if args.tiny else 15)
    workers = args.workers if args.workers is not None else (1 if args.tiny else max(1, min(12, os.cpu_count() - 2)))
    backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    name, peak = device_description(device)
    started = time.perf_counter()
    lines = [f"# GPU check: {name}", "", versions(), *(["", note] if note else []), ""]

    lines += ["## (a) tests/test_gpu.py", ""]
    lines += ["- skipped (--no-tests)"] if args.no_tests else run_gpu_tests(args.test_timeout)
    print("\n".join(lines), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("LAUNCHER_CACHE_DIR", str(tmp / "cache"))
    rows, loader_rows, identical_rows, patterns = [], [], [], {}
    for cfg in configs:
        pattern = patterns[cfg.model] = write_shards(tmp / f"{cfg.model}-{cfg.size}", cfg.batch * (steps + 1),
                                                     cfg.size, cfg.classes)
        flops = training_flops_per_image(cfg, device)
        rates = {}
        for compiled in (False, True):
            option = {"backend": backend} if compiled else None
            recipe = recipe_for(cfg, pattern, tmp / f"run-{cfg.model}-{compiled}", steps, warmup, workers, option)
            ours, _ = launcher_loop(recipe)
            plain, _ = plain_loop(recipe, device)
            timm_rate = timm_loop(recipe, device)
            rates[compiled] = ours
            mfu = f"{100 * ours * flops / (peak * 1e12):.1f}%" if peak else "n/a (no peak known for this device)"
            mode = f"compiled ({backend})" if compiled else "eager"
            rows.append(f"| {cfg.model} {cfg.size}px, batch {cfg.batch} | {mode} | {ours:,.0f} | {plain:,.0f} | "
                        f"{timm_rate:,.0f} | {plain / ours:.3f} | {timm_rate / ours:.3f} | {flops / 1e9:.2f} | {mfu} |")
            print(rows[-1], flush=True)
        rows.append(f"| {cfg.model} {cfg.size}px | compiled / eager, launcher | {rates[True] / rates[False]:.2f}x "
                    f"| | | | | | |")
        # (c) bit-identity in deterministic mode (eager): the launcher and the plain loop.
        recipe = recipe_for(cfg, pattern, tmp / f"det-{cfg.model}", warmup + 3, warmup, workers, None,
                            deterministic=True)
        _, ours_weights = launcher_loop(recipe)
        _, plain_weights = plain_loop(recipe, device)
        same = ours_weights.keys() == plain_weights.keys() and all(
            torch.equal(v, ours_weights[k]) for k, v in plain_weights.items())
        worst = max((v.double() - ours_weights[k].double()).abs().max().item() for k, v in plain_weights.items()
                    if v.is_floating_point())
        identical_rows.append(f"| {cfg.model} {cfg.size}px | {warmup + 3} | {same} | {worst:.3g} |")
        # (d) the loader alone, CIFAR-style augmentation (pad-4 crop, flip), against training.
        cifar = recipe_for(cfg, pattern, tmp / "loader", steps, warmup, workers, None,
                           augment={"crop_padding": 4, "hflip": 0.5})
        rate, forked, kept = loader_only(cifar, device, batches_to_read=steps - 1)
        best = max(rates.values())
        loader_rows.append(f"| {cfg.model} {cfg.size}px, {workers} workers | {rate:,.0f} | {best:,.0f} | "
                           f"{rate / best:.2f} | {'yes' if rate >= best else 'NO: loader-bound'} | {forked:.2f} | {kept:.2f} |")

    lines += ["", "## (b) Training images/s, bf16 autocast, channels_last, one device", "",
              "| model | mode | launcher | plain loop | timm train.py-style | plain / launcher | timm / launcher "
              "| GFLOPs per image (fwd+bwd) | MFU, launcher |",
              "|---|---|---|---|---|---|---|---|---|", *rows, "",
              f"Steps {warmup + 1}..{steps} timed (the first {warmup} include compilation), synchronised at both ends. "
              f"Peak used for MFU: {f'{peak:g} TFLOP/s dense bf16' if peak else 'none known for this device'}. Goals: plain / launcher <= 1.03 "
              "(the launcher at most 3% slower); compiled >= 1.2x eager for resnet50.",
              "", "## (c) Deterministic mode: launcher vs plain loop (eager, train.deterministic=true)", "",
              "| model | steps | final weights bit-identical | largest difference |", "|---|---|---|---|",
              *identical_rows,
              "", "## (d) Does loading keep up? (raw uint8 shards, pad-4 crop + flip, loader only)", "",
              "| config | loader images/s | best training images/s | ratio | keeps up | first batch, workers forked s "
              "| first batch, persistent workers s |",
              "|---|---|---|---|---|---|---|", *loader_rows, ""]
    lines += ["## (e) FSDP vs DDP: ViT-B/16 at 224 px, bf16, AdamW (benchmarks/fsdp_memory.py --gpus N)", "",
              *fsdp_against_ddp(args.fsdp_timeout), ""]
    # (f) the WRN config with CIFAR augmentation on the device, against in-memory batches
    cfg = configs[-1]
    cifar = recipe_for(cfg, patterns[cfg.model], tmp / "device-augment", steps, warmup, workers, None, augment=CIFAR_AUGMENT)
    assert cifar.data.augment_on == "device", cifar.data.augment_on
    ours, _ = launcher_loop(cifar)
    memory = in_memory_loop(cifar, device)
    lines += ["## (f) Small images at device speed: CIFAR augmentation on the device (eager, bf16)", "",
              "| config | augmentation | launcher images/s | in-memory batches images/s | launcher / in-memory |",
              "|---|---|---|---|---|",
              f"| {cfg.model} {cfg.size}px, batch {cfg.batch}, {workers} workers | crop 4 + flip + AutoAugment cifar10 "
              f"+ erasing 0.5 | {ours:,.0f} | {memory:,.0f} | {ours / memory:.3f} |", "",
              "In-memory: the same model, optimizer and batched ops on uint8 batches already on the device (no "
              "loader). Goal: launcher / in-memory >= 0.95.", "",
              f"Whole check: {time.perf_counter() - started:.0f} s."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
