"""What every distributed strategy does: DataParallel (DDP, or one process) and the base of the
strategies whose weights live in shards; launcher/strategies/deepspeed.py and launcher/strategies/fsdp.py build
on them, launcher/strategies/select.py picks one for the recipe."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from launcher.runlog import save_state_dict, save_weights


class DataParallel:
    """DDP (or one process): the model is replicated; Accelerate's no_sync skips the gradient
    all-reduce on all but the last micro-batch of a step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def prepare(self, model, optimizer):
        """accelerator.prepare: DDP wraps the model (DeepSpeed builds its engine)."""
        return self.accelerator.prepare(model, optimizer)

    def micro_batch_context(self, model, first: bool, last: bool):
        return nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    @property
    def lockstep_eval(self) -> bool:
        return False

    def unwrap(self, model) -> torch.nn.Module:
        """The model inside DDP's wrapper. Not accelerator.unwrap_model: it checks for a DeepSpeed
        engine, which imports DeepSpeed wherever it is installed (about a second of CPU in every
        process of a run that does not use it); the DeepSpeed strategy uses it."""
        while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return model

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The full fp32 weights and buffers (every rank calls it; here it needs no communication)."""
        return {k: v.detach() for k, v in self.unwrap(model).state_dict().items()}

    def save_full_weights(self, model, path: Path) -> None:
        """The trained weights as one fp32 safetensors file, whatever the strategy: the final weights
        and each checkpoint's model.safetensors. Every rank calls it; the main process writes."""
        if self.accelerator.is_main_process:  # byte for byte the model's own tensors
            save_weights(self.unwrap(model), path)

    def save_checkpoint(self, model, optimizer, folder: Path) -> Optional[dict]:
        """Every rank: write the weights into a checkpoint folder; returns the optimizer state for
        the main process to store in trainer.pt (None where the strategy stores it itself)."""
        self.save_full_weights(model, folder / "model.safetensors")
        return optimizer.state_dict()

    def load_checkpoint(self, model, optimizer, folder: Path, optimizer_state: Optional[dict],
                        saved_world_size: int) -> None:
        """Every rank: the weights and optimizer state of a checkpoint folder (save_checkpoint's)."""
        from safetensors.torch import load_model

        load_model(self.unwrap(model), str(folder / "model.safetensors"))
        optimizer.load_state_dict(optimizer_state)


class GatheredWeights(DataParallel):
    """A strategy whose weights live in shards (ZeRO, FSDP): saving gathers them first (a
    collective: every rank calls it), and the main process writes them."""

    def save_full_weights(self, model, path: Path) -> None:
        state = self.full_state_dict(model)
        if self.accelerator.is_main_process:
            save_state_dict(state, path)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers to every rank, one broadcast per dtype (DDP's broadcast_buffers)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
