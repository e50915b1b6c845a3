"""grad_accum: gradient accumulation. Each optimizer step's batch (data.batch_size per
process) is split into k micro-batches; their gradients add up to the gradient of the whole
batch, because the loop scales each micro-batch's mean loss by its share of the global
batch. Only the last micro-batch all-reduces under DDP (Accelerate's no_sync on the others).
A short last batch is split into at most k non-empty parts.

Keeping data.batch_size as the batch per *step* means that switching accumulation on, or
changing k, does not change the data order, the LR schedule or the epoch length. With
BatchNorm, each micro-batch normalises with its own statistics, as with any accumulation.

mode: auto rescues out-of-memory runs. The first step is tried with k micro-batches
locally (no all-reduce); on torch.OutOfMemoryError, k doubles (the micro-batch halves)
down to min_micro_batch. The ranks agree on the largest k any of them needed, the result
is written to <run dir>/grad_accum.json and kept in the plugin's state, and a resumed run
reuses it without probing again. A later OOM on one process retries with a doubled k
too; under several processes it stops with the k to set instead.

Under DeepSpeed, k becomes the engine's gradient_accumulation_steps (a DeepSpeed JSON file
that sets another value is refused); mode auto is refused there, as the engine's
accumulation is fixed when it is built.

Hooks: accelerator_options (DeepSpeed), micro_batches (k for every step; the probe at the
first step with mode auto; a doubled k after an out-of-memory error). State: k.
"""

from __future__ import annotations

import gc
import json
from typing import Literal, Optional

from pydantic import Field

from launcher.errors import LauncherError
from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import atomic_write_text

torch = lazy("torch")


@register("grad_accum")
class GradientAccumulation(Plugin):
    """Split each step's batch into k micro-batches (auto: find k that fits in memory)."""

    class Options(PluginOptions):
        micro_batches: int = Field(2, ge=1, description="k: micro-batches per optimizer step")
        mode: Literal["fixed", "auto"] = Field("fixed", description="auto: double k on out-of-memory")
        min_micro_batch: int = Field(1, ge=1, description="auto: never split below this many samples")

    def __init__(self, options):
        super().__init__(options)
        self.k = options.micro_batches
        self.settled = options.mode == "fixed"

    notes_under = {"deepspeed": "mode fixed only: micro_batches becomes DeepSpeed's gradient_accumulation_steps",
                   "fsdp": "mode fixed only; gradients are reduce-scattered at the step's last micro-batch"}

    @classmethod
    def check_recipe(cls, recipe, options):
        if recipe.distributed.strategy == "deepspeed":
            if options.mode == "auto":
                return ("mode auto probes k at the first step, but DeepSpeed fixes its accumulation steps when the "
                        "engine is built; set mode: fixed with micro_batches")
        if recipe.distributed.strategy == "fsdp" and options.mode == "auto":
            return ("mode auto retries a step that ran out of memory, which is not tested under FSDP yet; set "
                    "mode: fixed with micro_batches")
        if options.micro_batches > recipe.data.batch_size:
            return (f"micro_batches={options.micro_batches} is more than data.batch_size={recipe.data.batch_size}; "
                    "data.batch_size is the batch per optimizer step, which grad_accum splits")
        return None

    @classmethod
    def accumulation_steps(cls, options) -> Optional[int]:
        return options.micro_batches  # DeepSpeed's gradient_accumulation_steps (mode fixed there)

    def micro_batches(self, ctx, count: int) -> int:
        batch = ctx.batch
        if ctx.out_of_memory:  # the step with k micro-batches did not fit: retry with 2k
            if ctx.world_size > 1 or self.options.mode == "fixed":
                raise LauncherError(
                    f"Out of memory with {self.k} micro-batches of about {len(batch.targets) // self.k} "
                    f"samples. Set plugins.grad_accum.micro_batches={self.k * 2} (or mode: auto).") from None
            self._halve(ctx, batch)
        elif not self.settled:
            self._probe(ctx, batch)
        return self.k

    def _probe(self, ctx, batch) -> None:
        """Find the k that fits, without all-reducing, then agree on it across ranks. The probe
        leaves no trace: buffers (BatchNorm statistics) and RNG states are restored, so the
        step that follows is exactly the one a run with that k from the start would take."""
        buffers = {name: b.clone() for name, b in ctx.model.named_buffers()}
        devices = [torch.cuda.current_device()] if ctx.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            while True:
                try:
                    ctx.micro_batch_count = self.k
                    with ctx.accelerator.no_sync(ctx.model):
                        ctx.train_step.once(batch)
                    break
                except torch.OutOfMemoryError:
                    self._halve(ctx, batch)
        with torch.no_grad():
            for name, b in ctx.model.named_buffers():
                b.copy_(buffers[name])
        ctx.optimizer.zero_grad(set_to_none=True)
        needed = torch.tensor(self.k, device=ctx.accelerator.device)
        self.k = int(ctx.accelerator.reduce(needed, "max").item()) if ctx.world_size > 1 else self.k
        self.settled = True
        if ctx.is_main:
            micro = -(-len(batch.targets) // self.k)
            atomic_write_text(ctx.run_dir / "grad_accum.json",
                              json.dumps({"micro_batches": self.k, "micro_batch_size": micro}) + "\n")

    def _halve(self, ctx, batch) -> None:
        ctx.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        micro = -(-len(batch.targets) // (self.k * 2))
        if micro < self.options.min_micro_batch or self.k >= len(batch.targets):
            raise LauncherError(
                f"Out of memory even with micro-batches of {-(-len(batch.targets) // self.k)} samples "
                f"(plugins.grad_accum.min_micro_batch={self.options.min_micro_batch}). Use a smaller model or "
                "image size, mixed precision (plugins.amp), or more devices.") from None
        self.k *= 2

    def state_dict(self) -> dict:
        return {"micro_batches": self.k, "settled": self.settled}

    def load_state_dict(self, state: dict) -> None:
        self.k, self.settled = state["micro_batches"], state["settled"]
