"""Distributed strategies, chosen in the recipe's `distributed:` section.

    distributed: {strategy: ddp}                                   # default
    distributed: {strategy: deepspeed, zero_stage: 3, offload: optimizer}
    distributed: {strategy: deepspeed, deepspeed_config: ds.json}  # a DeepSpeed JSON file
    distributed: {strategy: fsdp}                                  # PyTorch FSDP2 (fully_shard)

All run through Accelerate and the same `accelerate launch` command (one or many
machines, GPUs with NCCL or CPUs with gloo); the recipe, not the launch flags, decides
the strategy, so a checkpoint always knows what wrote it.

This module builds the Accelerator (checking the launch flags against the recipe) and picks the
strategy: DataParallel (launcher/strategies/base.py), DeepSpeedZeRO (launcher/strategies/deepspeed.py, with
the DeepSpeed config built from the recipe) or FullyShardedDataParallel (launcher/strategies/fsdp.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from launcher.strategies.deepspeed import DeepSpeedZeRO, deepspeed_config
from launcher.errors import LauncherError
from launcher.strategies.fsdp import FullyShardedDataParallel
from launcher.strategies.base import DataParallel

# Read once, before a DeepSpeed run in this process sets it itself.
LAUNCHED_WITH_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def initial_accelerator_options(recipe) -> dict:
    """The options the core hands to the plugins' accelerator_options hook."""
    options: dict[str, Any] = {"cpu": not torch.cuda.is_available()}
    section = recipe.distributed
    if section.strategy == "deepspeed":
        options["cpu"] = False  # Accelerate's DeepSpeed path is skipped with cpu=True; DeepSpeed has a CPU backend
    return options


def make_accelerator(recipe, options: dict):
    """Accelerator(**options); under DeepSpeed with the config the strategy builds from the recipe."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if "DS_ACCELERATOR" not in os.environ and only_cpu():
        # DeepSpeed, where a run imports it (Accelerate does under strategy deepspeed), on finding no
        # GPU warns "Setting accelerator to CPU. If you have GPU ..." on every rank. Here CPU is
        # the right answer, so say it instead of being told.
        os.environ["DS_ACCELERATOR"] = "cpu"
    options = dict(options)
    # The recipe's precision (plugins.amp) is passed explicitly: Accelerate would otherwise take
    # `accelerate launch --mixed_precision` (or the user's accelerate config) from the environment,
    # and a recipe without amp would train in bf16 without a word.
    options.setdefault("mixed_precision", "no")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", options["mixed_precision"]):
        wanted = options["mixed_precision"] if options["mixed_precision"] != "no" else "fp32 (no amp plugin)"
        raise LauncherError(
            f"accelerate launch was given --mixed_precision {launched} (or an accelerate config that sets it), but "
            f"the recipe trains in {wanted}. The recipe decides: launch with --mixed_precision no, or add "
            f"plugins.amp={{dtype: {launched}}} to the recipe.")
    # Likewise torch.compile: the loop compiles in place for train.compile (plain state_dict keys);
    # Accelerate's --dynamo_backend would wrap the model a second time, with _orig_mod. keys.
    launched = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    wanted = recipe.train.compile.backend.lower() if recipe.train.compile is not None else "no"
    if launched not in ("no", wanted):
        raise LauncherError(
            f"accelerate launch was given --dynamo_backend {launched} (or an accelerate config that sets it), but the "
            f"recipe {'compiles with ' + wanted if wanted != 'no' else 'does not compile'}. The recipe decides: "
            f"launch with --dynamo_backend no, or set train.compile={{backend: {launched}}}.")
    options["dynamo_backend"] = "no"
    if recipe.distributed.strategy != "deepspeed":
        if LAUNCHED_WITH_DEEPSPEED:
            raise LauncherError("accelerate launch was given --use_deepspeed (or a DeepSpeed accelerate config), but "
                                "the recipe's distributed.strategy is ddp. The recipe decides: drop --use_deepspeed, "
                                "or set distributed.strategy=deepspeed (and distributed.deepspeed_config=FILE).")
        return Accelerator(**options)
    from accelerate.utils import DeepSpeedPlugin

    # DeepSpeed calls torch's deprecated collective names from many lines of its own code, so
    # the once-per-line default printed this ~90 times a rank; nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    config = deepspeed_config(recipe, options.get("mixed_precision", "no"))
    if config["fp16"]["enabled"] and not torch.cuda.is_available():
        raise LauncherError("DeepSpeed's fp16 needs a GPU: its CPU backend has no fp16 loss scaling. On the CPU use "
                            "plugins.amp.dtype=bf16, or no amp plugin.")
    if "LOCAL_RANK" not in os.environ:
        # One process without a launcher (python -m launcher): DeepSpeed still needs a process group.
        os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    if not torch.cuda.is_available():
        # Without these Accelerate reports one process on every rank under DeepSpeed on a CPU.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        handlers = list(options.pop("kwargs_handlers", []))
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        options["kwargs_handlers"] = handlers
        _without_deepspeed_shm_allreduce()
    options.pop("cpu", None)
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), **options)


def _without_deepspeed_shm_allreduce() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory allreduce (C++, 30-60 s of compiling at
    the first run in each environment, behind a file lock every other rank and run waits on) that
    only its inference_all_reduce uses: training's collectives go through torch.distributed (gloo)
    either way. Marking the op incompatible is DeepSpeed's own way of running without it
    (deepspeed/comm/torch.py, build_shm_op)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def only_cpu() -> bool:
    """No accelerator torch can see (CUDA/ROCm, Apple MPS, Intel XPU)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_strategy(accelerator, recipe):
    if recipe.distributed.strategy == "deepspeed":
        return DeepSpeedZeRO(accelerator, recipe)
    if recipe.distributed.strategy == "fsdp":
        return FullyShardedDataParallel(accelerator, recipe)
    return DataParallel(accelerator)
