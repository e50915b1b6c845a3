"""The training loop: `train(recipe)` sets up the run (accelerator, strategy, watchdog, run
directory lock), `_train` is the loop itself, readable top to bottom, and `evaluate` scores
the models on the validation set. RunContext holds the run's state, including the progress
a checkpoint saves (progress_state / load_progress_state).

The plugin hooks (launcher.registry.HOOKS) are called at the points marked H below,
each in recipe order. Notify hooks return nothing; transform hooks return their value.

Over 500 lines: the loop, its setup and its evaluation are kept in one file on purpose, so that
one read from top to bottom shows everything a step does and where every plugin hook runs.

    options  = H accelerator_options(ctx, {cpu, ...})     # amp sets mixed_precision
    accelerator = Accelerator(**options); ctx.strategy   # DDP, DeepSpeed ZeRO or FSDP (launcher/strategies/select.py)
    index the shards, build the model (seeded)
    groups = H param_groups(ctx, weight-decay groups)     # discriminative LRs
    optimizer (timm) over the groups, schedule (timm), criterion
    H setup(ctx)                                         # may wrap the model
    ctx.criterion = H criterion(ctx, cross_entropy)      # label smoothing, focal loss, in recipe order
    model, optimizer = ctx.strategy.prepare(model, optimizer)   # accelerator.prepare; FSDP shards here
    train.compile: model.compile() in place (state_dict keys stay plain)
    H after_prepare(ctx)                                 # resume sets ctx.epoch/step here
    for epoch in epochs:
        H on_epoch_start(ctx)                            # may set ctx.image_size (progressive resizing)
        for batch in this rank's batches of the epoch (from ctx.step_in_epoch on), on the device
                (CUDA: uint8, copied and normalised one batch ahead on a side stream):
            batch = H transform_batch(ctx, batch)        # mixup, cutmix...
            k = H micro_batches(ctx, 1)                  # gradient accumulation (its out-of-memory probe)
            for micro in batch.split(k):
                logits = model(micro.images)
                loss = criterion(logits, targets)                   # mean over the micro-batch
                loss = H transform_loss(ctx, loss, micro, logits)   # distillation...
                loss = loss * len(micro) * world / global_count
                ctx.strategy.backward(loss)                 # DeepSpeed: the engine steps at the last one
            (out of memory: k = H micro_batches(ctx, k) with ctx.out_of_memory; a larger k retries)
            accelerator.unscale_gradients()              # fp16 only
            H before_optimizer_step(ctx)                 # grads complete & unscaled; SAM, clipping (not DeepSpeed)
            optimizer.step(); optimizer.zero_grad(); ctx.step += 1; schedule.step_update(ctx.step)
            H after_optimizer_step(ctx)                  # EMA
            every run.log_every steps: row = H log_row(ctx, row) -> metrics.jsonl; H on_log(ctx, row)
            H on_step_end(ctx)                           # step complete and logged: checkpoints
            stop at train.max_steps, when a plugin sets ctx.stop_training, or ctx.interrupted
        every train.eval_every epochs and at the end:
            models = H eval_models(ctx, {"val": model})  # EMA adds "val_ema"
            per batch: outputs = H eval_logits(ctx, {prefix: logits}, images, model, prefix)  # TTA
            metrics reduced over ranks -> row; H on_evaluate(ctx, metrics); H on_log(ctx, row)
        H on_epoch_end(ctx)                              # after the epoch's evaluation
    if ctx.interrupted (preemption): return now, no final evaluation or weights
    write final/model.safetensors; H on_train_end(ctx)

Why the loss is normalised by the global batch: each rank's loss is
mean(micro-batch losses) * micro_batch_size * world_size / samples_in_global_batch, so after DDP averages the
gradients over ranks the update is the mean over the global batch, whatever the number
of ranks or micro-batches, and however unevenly the last step of an epoch is split.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from launcher.strategies.select import initial_accelerator_options, make_accelerator, make_strategy
from launcher.console import Console
from launcher.data import (Batch, EpochPlan, EvalStream, PersistentWorkers, ShardIndex, TrainStream, batches,
                           fetch_options, index_shards, on_device)
from launcher.config.load import resolve_lr
from launcher.errors import LauncherError
from launcher.models.factory import (compile_in_place, compiled_for_inference, create_model, explain_compile_failure,
                             memory_format)
from launcher.optim import create_optimizer, create_schedule, default_param_groups
from launcher.registry import PluginSet, build_plugins
from launcher.runlog import (MetricsLog, RunDirLock, check_writable_run_dir, final_weights, manifest, metrics_file,
                            start_run_dir, write_status)
from launcher.strategies.base import broadcast_buffers
from launcher.throughput import (DataWait, peak_memory_gb, peak_tflops, starved_loader_warning,
                                 training_flops_per_sample)
from launcher.data.transforms import ImageTransform
from launcher.cluster.watchdog import RankWatchdog


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the micro-batch; targets are class indices or soft (N, classes)
    rows (mixup, label smoothing). Every criterion returns the mean over its micro-batch."""
    return F.cross_entropy(logits, targets)


@dataclass
class RunContext:
    """Everything plugins may read or change. Plugins talk to the loop only through this."""

    recipe: Any
    accelerator: Any = None
    strategy: Any = None  # DataParallel (launcher/strategies/base.py), DeepSpeedZeRO or FullyShardedDataParallel
    model: Optional[nn.Module] = None  # the prepared (possibly DDP-wrapped) model
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None  # a timm scheduler, stepped per optimizer step
    criterion: Callable = cross_entropy  # (logits, targets) -> mean loss of the micro-batch
    plugins: Optional[PluginSet] = None
    run_dir: Optional[Path] = None
    world_size: int = 1
    rank: int = 0
    is_main: bool = True
    train_index: Optional[ShardIndex] = None
    val_index: Optional[ShardIndex] = None
    plan: Optional[EpochPlan] = None
    # Per training sample (shard-index order): relative sampling weight; None = each sample
    # exactly once per epoch. Set by a plugin, then ctx.make_plan().
    sample_weights: Optional[Any] = None
    image_size: int = 0  # the training image size of the current epoch (evaluation: data.image_size)
    steps_per_epoch: int = 0
    total_steps: int = 0
    # Progress: optimizer steps done, current epoch, next step inside the epoch.
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    # The step being trained: its batch, its micro-batches and its loss.
    batch: Optional[Batch] = None
    loss: Optional[torch.Tensor] = None
    metrics: dict = field(default_factory=dict)  # the latest evaluation, reduced over ranks
    stop_training: bool = False  # set by a plugin on every rank alike (e.g. from reduced metrics)
    stop_reason: str = ""
    # What status.json says when the run ends normally: "finished", or what the plugin that set
    # stop_training says it is (a search's pruned trial: "pruned").
    end_state: str = "finished"
    # Set (on every rank) when the run must stop before its end, e.g. preemption: no final
    # evaluation, no final weights, and the process exits with `exit_code`.
    interrupted: bool = False
    exit_code: int = 0
    last_eval_step: int = -1
    started: bool = False  # the run directory holds this run's status.json ("running")
    run_lock: Optional[RunDirLock] = None  # held from before resuming until the run ends
    # The training-loss window since the last logged row (per rank; summed at log time).
    loss_window: Optional[torch.Tensor] = None
    loss_window_steps: int = 0
    metrics_log: Optional[MetricsLog] = None
    console: Optional[Console] = None  # the main process's progress bar or log lines
    metrics_rows: int = 0  # rows of metrics.jsonl to keep when the run starts (a resume sets it)
    # Micro-batches the step's batch is split into (the micro_batches hook sets it per step), and
    # whether the hook is being asked because the step ran out of memory.
    micro_batch_count: int = 1
    out_of_memory: bool = False
    memory_format: torch.memory_format = torch.contiguous_format  # of the model and its input batches
    eval_model: Optional[nn.Module] = None  # what evaluation calls for the model (compiled with train.compile)
    # Loader workers kept across epochs (data.persistent_workers), for training and for evaluation.
    train_workers: Optional[PersistentWorkers] = None
    eval_workers: Optional[PersistentWorkers] = None
    train_step: Optional["TrainStep"] = None  # runs the step's passes (ctx.train_step.recompute_gradients())

    def __post_init__(self):
        if self.train_step is None:
            self.train_step = TrainStep(self)

    def progress_state(self) -> dict:
        """Where the run is, as plain JSON values (a checkpoint's meta.json holds them)."""
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "last_eval_step": self.last_eval_step, "metrics": self.metrics,
                "metrics_rows": self.metrics_log.rows if self.metrics_log else 0}

    def load_progress_state(self, state: dict) -> None:
        """Continue from progress_state(): the next step, the rows of metrics.jsonl to keep."""
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.last_eval_step, self.metrics = state["last_eval_step"], state["metrics"]
        self.metrics_rows = state["metrics_rows"]

    def rank_progress_state(self) -> dict:
        """This rank's part: the training-loss window not yet logged (a tensor)."""
        return {"loss_window": self.loss_window.detach().cpu(), "loss_window_steps": self.loss_window_steps}

    def load_rank_progress_state(self, state: dict) -> None:
        self.loss_window = state["loss_window"].to(self.accelerator.device)
        self.loss_window_steps = state["loss_window_steps"]

    def make_plan(self, streams: Optional[int] = None) -> None:
        """(Re)build the epoch plan; a resume may ask for the stream count it was saved with."""
        data = self.recipe.data
        self.plan = EpochPlan(
            shard_sizes=tuple(int(n) for n in self.train_index.shard_sizes),
            global_batch=data.batch_size * self.world_size,
            streams=streams or data.streams or self.world_size,
            world_size=self.world_size,
            seed=self.recipe.seed,
            shuffle=data.shuffle,
            window=data.shuffle_window,
            sample_weights=self.sample_weights,
            aug_repeats=data.aug_repeats,
        )
        self.steps_per_epoch = self.plan.steps_per_epoch()
        self.total_steps = self.recipe.train.epochs * self.steps_per_epoch
        if self.recipe.train.max_steps:
            self.total_steps = min(self.total_steps, self.recipe.train.max_steps)


class TrainStep:
    """One optimizer step's forward and backward passes over its micro-batches, with the retry on
    out-of-memory and SAM's second pass. The loop runs it; plugins reach it as ctx.train_step."""

    def __init__(self, ctx: "RunContext"):
        self.ctx = ctx

    def run(self, batch: Batch) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns the summed loss. On an
        out-of-memory error the micro_batches hook may ask for more micro-batches: the step is then
        retried from zeroed gradients (nothing was stepped); otherwise the error propagates."""
        ctx = self.ctx
        while True:
            try:
                return self.once(batch)
            except torch.OutOfMemoryError:
                ctx.optimizer.zero_grad(set_to_none=True)
                ctx.out_of_memory = True
                try:
                    count = ctx.plugins.chain("micro_batches", ctx, ctx.micro_batch_count)
                finally:
                    ctx.out_of_memory = False
                if count <= ctx.micro_batch_count:
                    raise
                ctx.micro_batch_count = count

    def once(self, batch: Batch) -> torch.Tensor:
        """Forward and backward over ctx.micro_batch_count micro-batches, no retry. Gradient
        all-reduce happens only on the last micro-batch."""
        ctx = self.ctx
        micro = batch.split(ctx.micro_batch_count)
        total = torch.zeros((), device=ctx.accelerator.device)
        # fp32 weights (autocast does mixed precision), or DeepSpeed's bf16/fp16 weights: inputs must match.
        low_precision = _param_dtype(ctx.model) if _param_dtype(ctx.model) != torch.float32 else None
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            with ctx.strategy.micro_batch_context(ctx.model, first=i == 0, last=last):
                with ctx.accelerator.autocast():
                    if low_precision is None:
                        logits = ctx.model(mb.images)
                    else:
                        logits = ctx.model(mb.images.to(low_precision)).float()  # the loss in fp32
                    loss = ctx.criterion(logits, mb.targets)  # the mean over this micro-batch
                    loss = ctx.plugins.chain("transform_loss", ctx, loss, mb, logits)
                # Rescaled to the micro-batch's share of the global batch; the factor is exactly
                # 1.0 for a full batch on one process in one micro-batch.
                loss = loss * (len(mb.targets) * ctx.world_size / mb.global_count)
                ctx.strategy.backward(ctx.model, loss, last)  # DeepSpeed also steps at the last one
            total += loss.detach()
        return total

    def recompute_gradients(self) -> torch.Tensor:
        """For before_optimizer_step hooks (SAM): zero the gradients and recompute them on
        the same step's batch (same micro-batches, same transformed targets), unscaled."""
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=True)
        scaler = ctx.accelerator.scaler
        if scaler is not None:
            # fp16: GradScaler allows one unscale_ per step; forget the first pass's so the new
            # gradients are unscaled and checked for overflow in their turn. No public API does this.
            scaler._per_optimizer_states.clear()
        loss = self.run(ctx.batch)
        ctx.accelerator.unscale_gradients()
        return loss


def train(recipe) -> RunContext:
    """Run a validated recipe to the end; returns the final context (tests read it)."""
    from accelerate.state import AcceleratorState

    # Accelerate keeps its settings in a process-wide singleton; a second run in the same
    # process (tests, notebooks) must not inherit the first one's precision. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    set_gpu_numerics(recipe.train)
    plugins = build_plugins(recipe)
    ctx = RunContext(recipe=recipe, plugins=plugins, run_dir=recipe.run_dir)
    options = plugins.chain("accelerator_options", ctx, initial_accelerator_options(recipe))
    ctx.accelerator = make_accelerator(recipe, options)
    ctx.strategy = make_strategy(ctx.accelerator, recipe)
    ctx.world_size, ctx.rank = ctx.accelerator.num_processes, ctx.accelerator.process_index
    ctx.is_main = ctx.accelerator.is_main_process
    lr_derivation = resolve_lr(recipe, ctx.world_size)  # optimizer.lr_base: lr from the global batch
    if lr_derivation and ctx.is_main:
        print(f"[launcher] {lr_derivation}", flush=True)
    # If another rank dies, this one stops within distributed.failure_timeout and names it.
    watchdog = RankWatchdog.start_for(ctx.world_size, ctx.rank, recipe.distributed.failure_timeout)
    if watchdog is not None:  # status.json names the rank that failed first
        watchdog.on_abort = lambda why: _record_failure(ctx, RuntimeError(why), message=why)
    try:
        try:
            _train(ctx)
        except Exception as exc:
            explained = explain_compile_failure(recipe.train.compile, exc)
            if explained is None:
                raise
            raise explained from None
    except BaseException as exc:
        _record_failure(ctx, exc)
        if watchdog is not None:
            watchdog.report_failure(exc)
            if watchdog.verdict and isinstance(exc, Exception):
                _record_failure(ctx, exc, message=watchdog.verdict)  # another rank failed first
            if isinstance(exc, LauncherError):
                # The rank that failed first prints the paragraph: rank 0 may be stopped by its
                # watchdog before its own error comes (run_command).
                exc.failed_first = watchdog.verdict is None
        raise
    finally:
        for workers in (ctx.train_workers, ctx.eval_workers):
            if workers is not None:
                workers.close()
        if ctx.run_lock is not None:
            ctx.run_lock.release()
        if watchdog is not None:
            watchdog.on_abort = None  # let go of ctx: the process group must not outlive the run
    if watchdog is not None:
        watchdog.finished()
    return ctx


def _lock_run_dir(ctx: RunContext) -> None:
    """Refuse to start when another run (or an orphaned rank of a killed launch) is still
    working in this run directory: two runs would overwrite each other's checkpoints."""
    lock = RunDirLock(ctx.run_dir)
    problem = lock.acquire_main() if ctx.is_main else None
    if ctx.world_size > 1:
        from accelerate.utils import broadcast_object_list, gather_object

        problem = broadcast_object_list([problem])[0]  # the other ranks lock after rank 0
        if problem is None and not ctx.is_main:
            problem = lock.acquire_rank(ctx.rank)
        problem = next((p for p in gather_object([problem]) if p), None)
    if problem:
        lock.release()
        raise LauncherError(problem)
    ctx.run_lock = lock


def _record_failure(ctx: RunContext, exc: BaseException, message: Optional[str] = None) -> None:
    """status.json says "failed" with the reason, written by the rank that failed (the others may
    be stopped by the watchdog before they get here), once the run directory exists."""
    if not ctx.started:
        return
    try:
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C with no plugin handling it (no checkpoint)
            write_status(ctx.run_dir, "interrupted", step=ctx.step, reason="Ctrl-C", exit_code=130)
        elif isinstance(exc, Exception):
            if message is None:
                message = str(exc) if isinstance(exc, LauncherError) else f"{type(exc).__name__}: {exc}"
            write_status(ctx.run_dir, "failed", step=ctx.step, rank=ctx.rank, error=message[:2000])
    except OSError:
        pass  # the original error matters more


def set_gpu_numerics(section) -> None:
    """Fast GPU math by default, as timm's train.py (cuDNN autotunes its kernels, TF32 on
    Ampere+); train.deterministic makes two runs on the same GPU bit-identical, train.tf32=false
    keeps full fp32. Process-wide torch settings, so each run sets all of them."""
    torch.backends.cuda.matmul.allow_tf32 = section.tf32
    torch.backends.cudnn.allow_tf32 = section.tf32
    torch.backends.cudnn.benchmark = not section.deterministic
    torch.backends.cudnn.deterministic = section.deterministic
    if section.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: some kernels common in timm models (AdaptiveAvgPool2d's backward on CUDA) have no
    # deterministic form; torch warns about them instead of refusing the run.
    torch.use_deterministic_algorithms(section.deterministic, warn_only=True)


def _train(ctx: RunContext) -> None:
    from accelerate.utils import set_seed

    recipe, plugins, accelerator = ctx.recipe, ctx.plugins, ctx.accelerator

    # Everything that can fail on bad input is checked before the run directory exists.
    check_writable_run_dir(ctx.run_dir)
    data = recipe.data
    ctx.train_index = index_shards(data.train, "data.train", data.cache_dir, recipe.model.num_classes,
                                   fetch_options(data))
    if data.val:
        ctx.val_index = index_shards(data.val, "data.val", data.cache_dir, recipe.model.num_classes,
                                     fetch_options(data))
    ctx.make_plan()
    # CUDA: batches cross as uint8 and are normalised on the GPU (ImageTransform.finish).
    on_cuda = accelerator.device.type == "cuda"
    eval_transform = ImageTransform(data, recipe.model.in_chans, train=False, normalize_on_device=on_cuda)
    if data.num_workers and (data.persistent_workers if data.persistent_workers is not None else on_cuda):
        ctx.train_workers, ctx.eval_workers = PersistentWorkers(data.num_workers, on_cuda), \
            PersistentWorkers(data.num_workers, on_cuda)

    set_seed(recipe.seed)  # the same initial weights on every rank
    ctx.memory_format = memory_format(recipe.model, accelerator.device, str(accelerator.mixed_precision))
    ctx.model = create_model(recipe.model).to(accelerator.device, memory_format=ctx.memory_format)
    groups = plugins.chain("param_groups", ctx, default_param_groups(ctx.model, recipe.optimizer))
    # Fused optimizer kernels on CUDA, except where DeepSpeed steps a CPU copy (offload).
    fused = accelerator.device.type == "cuda" and recipe.distributed.offload == "none"
    ctx.optimizer = create_optimizer(recipe.optimizer, groups, fused=fused)
    ctx.scheduler = create_schedule(recipe.schedule, ctx.optimizer, recipe.train.epochs, ctx.steps_per_epoch)
    plugins.call("setup", ctx)
    ctx.criterion = plugins.chain("criterion", ctx, cross_entropy)
    ctx.model, ctx.optimizer = ctx.strategy.prepare(ctx.model, ctx.optimizer)  # DDP wraps, FSDP shards
    if recipe.train.compile is not None:  # after the plugins' setup: EMA copies the plain model
        compile_in_place(ctx.model, recipe.train.compile)
    set_seed(recipe.seed + ctx.rank)  # dropout and other draws differ per rank
    _lock_run_dir(ctx)  # before anything reads or writes the run directory (resume)
    # A run directory that already holds a status (a relaunch) must not go on saying "finished"
    # when this launch fails to resume: failures from here on are written to it.
    ctx.started = (ctx.run_dir / "status.json").is_file()
    plugins.call("after_prepare", ctx)

    if ctx.is_main:
        start_run_dir(ctx.run_dir, recipe, manifest(recipe, ctx.world_size, str(accelerator.device),
                                                     str(accelerator.mixed_precision)))
        write_status(ctx.run_dir, "running", step=ctx.step)
    ctx.started = True
    ctx.metrics_log = log = MetricsLog(metrics_file(ctx.run_dir) if ctx.is_main else None,
                                       keep_rows=ctx.metrics_rows)
    console = ctx.console = Console.for_run(ctx)
    if ctx.scheduler is not None:
        ctx.scheduler.step_update(ctx.step)

    if ctx.loss_window is None:
        ctx.loss_window = torch.zeros((), device=accelerator.device)
    data_wait = DataWait()  # train/data_wait in every row; one warning when the loader starves the steps
    peak = peak_tflops(accelerator.device)  # train/mfu on a CUDA device whose peak is known
    flops_per_sample: dict[int, float] = {}  # by training image size (progressive resizing changes it)
    while ctx.epoch < recipe.train.epochs and not _done(ctx):
        ctx.image_size = data.image_size
        plugins.call("on_epoch_start", ctx)  # may change ctx.image_size (progressive resizing)
        train_transform = ImageTransform(data, recipe.model.in_chans, train=True, image_size=ctx.image_size,
                                         normalize_on_device=on_cuda, batched=data.augment_on == "device")
        stream = TrainStream(ctx.train_index, ctx.plan, train_transform, ctx.epoch, ctx.rank, ctx.step_in_epoch)
        for batch in data_wait.batches(on_device(batches(stream, data.num_workers, pin_memory=on_cuda,
                                                         workers=ctx.train_workers),
                                                 accelerator.device, ctx.memory_format, train_transform.finish)):
            ctx.model.train()
            ctx.batch = plugins.chain("transform_batch", ctx, batch)
            ctx.micro_batch_count = plugins.chain("micro_batches", ctx, 1)
            ctx.loss = ctx.train_step.run(ctx.batch)
            accelerator.unscale_gradients()  # fp16: hooks see true gradients (no-op otherwise)
            plugins.call("before_optimizer_step", ctx)
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.step += 1
            ctx.step_in_epoch = batch.step_in_epoch + 1
            if ctx.scheduler is not None:
                ctx.scheduler.step_update(ctx.step)
            plugins.call("after_optimizer_step", ctx)
            data_wait.step_done()

            ctx.loss_window += ctx.loss
            ctx.loss_window_steps += 1
            console.step_done(batch.global_count)
            if ctx.step % recipe.run.log_every == 0 or _done(ctx):
                # One all-reduce per logged row, not per step: .item() is a sync point.
                window = accelerator.reduce(ctx.loss_window, "sum").item()
                mean_loss = window / (ctx.world_size * ctx.loss_window_steps)
                row = {"step": ctx.step, "epoch": ctx.epoch, "train/loss": mean_loss,
                       "train/lr": ctx.optimizer.param_groups[0]["lr"],
                       "train/samples_per_s": console.samples_per_second(),
                       "train/data_wait": data_wait.row_share(), "train/peak_memory_gb": peak_memory_gb(accelerator.device)}
                if peak:
                    if ctx.image_size not in flops_per_sample:
                        plain = recipe.model.model_copy(update={"pretrained": False, "pretrained_file": None,
                                                                "grad_checkpointing": False})
                        flops_per_sample[ctx.image_size] = training_flops_per_sample(
                            lambda: create_model(plain), ctx.image_size, recipe.model.in_chans)
                    row["train/mfu"] = round(flops_per_sample[ctx.image_size] * row["train/samples_per_s"]
                                             / (peak * 1e12 * ctx.world_size), 4)
                _emit(ctx, log, row)
                console.row(row)
                ctx.loss_window.zero_()
                ctx.loss_window_steps = 0
            starved = data_wait.starved_share()
            if starved is not None and ctx.is_main:
                print(starved_loader_warning(starved, len(data_wait.recent), data.num_workers, data.augment_on),
                      file=sys.stderr, flush=True)
            plugins.call("on_step_end", ctx)  # the step is complete and logged (checkpoints go here)
            if _done(ctx) or ctx.interrupted:
                break
        if ctx.interrupted:
            break
        epoch_finished = ctx.step_in_epoch >= ctx.steps_per_epoch
        if epoch_finished:
            ctx.epoch += 1
            ctx.step_in_epoch = 0
        if ctx.val_index is not None and ((epoch_finished and ctx.epoch % recipe.train.eval_every == 0)
                                          or _done(ctx)):
            evaluate(ctx, eval_transform, log)
        if epoch_finished:
            plugins.call("on_epoch_end", ctx)  # after the epoch's evaluation is logged
    console.close()
    if ctx.interrupted:
        log.close()
        if ctx.is_main:
            write_status(ctx.run_dir, "interrupted", step=ctx.step, reason=ctx.stop_reason, exit_code=ctx.exit_code)
        return
    if ctx.val_index is not None and ctx.last_eval_step != ctx.step:
        evaluate(ctx, eval_transform, log)

    ctx.strategy.save_full_weights(ctx.model, final_weights(ctx.run_dir))
    accelerator.wait_for_everyone()
    plugins.call("on_train_end", ctx)
    log.close()
    if ctx.is_main:
        write_status(ctx.run_dir, ctx.end_state, step=ctx.step,
                     **({"reason": ctx.stop_reason} if ctx.end_state != "finished" else {}))


def _done(ctx: RunContext) -> bool:
    return ctx.stop_training or ctx.step >= ctx.total_steps


def _emit(ctx: RunContext, log: MetricsLog, row: dict) -> None:
    row = {**row, "time": round(time.time(), 3)}  # wall clock (Unix seconds) when the row was logged
    row = ctx.plugins.chain("log_row", ctx, row)
    log.write(row)
    ctx.plugins.call("on_log", ctx, row)


@torch.no_grad()
def evaluate(ctx: RunContext, transform: ImageTransform, log: MetricsLog) -> dict:
    """Loss, top-1 and top-5 of every model plugins ask for, each validation sample counted
    exactly once across ranks (rank shares are disjoint, unpadded; sums are all-reduced)."""
    recipe, accelerator = ctx.recipe, ctx.accelerator
    started = time.perf_counter()
    if ctx.eval_model is None:  # the weights are the trained model's; with train.compile, a compiled call
        ctx.eval_model = compiled_for_inference(ctx.strategy.unwrap(ctx.model), recipe.train.compile)
    models = ctx.plugins.chain("eval_models", ctx, {"val": ctx.eval_model})
    batch_size = recipe.data.eval_batch_size or 2 * recipe.data.batch_size
    # Per output name: [loss sum, top-1 hits, top-5 hits, samples].
    sums: dict[str, torch.Tensor] = {}
    was_training = {prefix: m.training for prefix, m in models.items()}
    for m in models.values():
        m.eval()
        if ctx.world_size > 1:
            # Each rank's BatchNorm statistics saw only its own batches; rank 0's are the ones saved
            # (final weights, checkpoints, EMA). Evaluate with those on every rank, so the metrics are
            # those of the saved model. Broadcast, not averaged (timm's distribute_bn offers both):
            # DDP itself broadcasts rank 0's buffers before every training forward, so this changes
            # nothing in training, and the run stays independent of when it evaluates.
            broadcast_buffers(m)
    stream = EvalStream(ctx.val_index, transform, batch_size, ctx.rank, ctx.world_size)
    repeats = 0
    if ctx.strategy.lockstep_eval:
        # ZeRO-3: forward passes are collectives, so every rank must run as many; a rank with
        # fewer batches repeats its last one that many times, uncounted.
        most = accelerator.reduce(torch.tensor(len(stream), device=accelerator.device), "max").item()
        repeats = most - len(stream)
        if repeats and not len(stream):
            raise LauncherError(f"ZeRO-3 evaluation needs a validation sample per process: data.val has "
                                f"{len(ctx.val_index)} for {ctx.world_size} processes.")

    def forward(batch: Batch, count: bool) -> None:
        for prefix, model in models.items():
            images = batch.images.to(_param_dtype(model))
            with accelerator.autocast():
                logits = model(images)
                outputs = ctx.plugins.chain("eval_logits", ctx, {prefix: logits}, images, model, prefix)
            for name, out in outputs.items() if count else ():
                sums.setdefault(name, torch.zeros(4, device=accelerator.device, dtype=torch.float64))
                sums[name] += eval_sums(out.float(), batch.targets)

    batch = None
    for batch in on_device(batches(stream, recipe.data.num_workers, pin_memory=accelerator.device.type == "cuda",
                                   workers=ctx.eval_workers), accelerator.device, ctx.memory_format, transform.finish):
        forward(batch, count=True)
    for _ in range(repeats):
        forward(batch, count=False)
    for prefix, m in models.items():
        m.train(was_training[prefix])
    metrics = eval_metrics({name: accelerator.reduce(total, "sum") for name, total in sums.items()})
    ctx.metrics = metrics
    ctx.last_eval_step = ctx.step
    ctx.plugins.call("on_evaluate", ctx, metrics)
    _emit(ctx, log, {"step": ctx.step, "epoch": ctx.epoch, **metrics})
    if ctx.console is not None:
        ctx.console.evaluation(ctx.step, ctx.epoch, metrics, seconds=time.perf_counter() - started)
    return metrics


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def eval_metrics(sums: dict[str, torch.Tensor]) -> dict:
    """{name}/loss, /top1, /top5, /samples from each output's eval_sums totals (also launcher.evaluate)."""
    metrics = {}
    for name in sorted(sums):
        loss_sum, top1, top5, count = sums[name].tolist()
        metrics.update({f"{name}/loss": loss_sum / count, f"{name}/top1": top1 / count,
                        f"{name}/top5": top5 / count, f"{name}/samples": int(count)})
    return metrics


def eval_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, samples] of a batch, in float64 (also launcher.evaluate)."""
    k = min(5, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    hits = topk == targets[:, None]
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(-1).sum().double(),
                        torch.tensor(float(len(targets)), device=logits.device, dtype=torch.float64)])
