"""PyTorch FSDP2 (`distributed.strategy: fsdp`): torch.distributed.fsdp.fully_shard, applied here rather than
through Accelerate's FSDP plugin: Accelerate leaves a CPU run as plain multi-CPU DDP whatever
its FSDP settings, and the same code path on CPUs (the tests) and GPUs is the one that is
tested. What Accelerate's FSDP2 support does at prepare is done here the same way: the units
(repeated blocks, or size-based) and then the root are sharded with the recipe's mesh, mixed
precision and offload policies, and the optimizer's parameters are swapped for the sharded
ones (its state is still empty). Weights are gathered for EMA and for each
model.safetensors; checkpoints are sharded with torch.distributed.checkpoint (each rank
writes its shard; DCP reshards on load, so a run resumes on another process count).
"""

from __future__ import annotations

import os
import pickle
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import torch

from launcher.strategies.base import GatheredWeights, broadcast_buffers
from launcher.errors import LauncherError


class FullyShardedDataParallel(GatheredWeights):
    """PyTorch FSDP2 (see the module docstring): parameters, gradients and optimizer state
    sharded over the ranks; each unit's parameters all-gathered for its forward and backward."""

    def __init__(self, accelerator, recipe):
        super().__init__(accelerator)
        import torch.distributed as dist

        if not dist.is_initialized():
            # One process without a launcher: FSDP still needs a (one-rank) process group.
            backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.options = recipe.distributed

    def mesh_shape(self) -> tuple[int, ...]:
        """(shard,) for full and grad_op; (replicate, shard) for hybrid (shard within a machine) and
        no_shard (shard over 1 rank: FSDP2 has no NO_SHARD, a 1-wide shard dimension is it)."""
        world = self.accelerator.num_processes
        sharding = self.options.fsdp_sharding
        if sharding == "no_shard":
            return (world, 1)
        if sharding == "hybrid":
            per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            if world % per_machine:
                raise LauncherError(f"distributed.fsdp_sharding=hybrid needs the same number of processes on every "
                                    f"machine ({world} in all, {per_machine} on this one).")
            return (world // per_machine, per_machine)
        return (world,)

    def prepare(self, model, optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        options = self.options
        names = {id(p): n for n, p in model.named_parameters()}
        shape = self.mesh_shape()
        mesh = init_device_mesh(self.accelerator.device.type, shape,
                                mesh_dim_names=("shard",) if len(shape) == 1 else ("replicate", "shard"))
        min_params = options.fsdp_min_params or 10 ** 8
        units = size_based_units(model, min_params) if options.fsdp_wrap == "size" else repeated_blocks(model)
        if not units:
            self.no_units(model, min_params)
        if options.fsdp_activation_checkpointing:
            checkpoint_activations(innermost(units))
        policy = MixedPrecisionPolicy()
        if self.accelerator.mixed_precision == "bf16" and options.fsdp_mixed_precision == "policy":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=self.accelerator.device.type == "cuda") if options.fsdp_cpu_offload \
            else OffloadPolicy()
        shard = dict(mesh=mesh, reshard_after_forward=options.fsdp_sharding != "grad_op", mp_policy=policy,
                     offload_policy=offload)
        if policy.param_dtype is not None:
            # BatchNorm keeps fp32 weights (its kernels refuse bf16 weights with fp32 running
            # statistics): each is its own unit without the policy, as FSDP1's MixedPrecision does
            # by default (_module_classes_to_ignore).
            for norm in [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
                fully_shard(norm, **{**shard, "mp_policy": MixedPrecisionPolicy()})
        for unit in reversed(units):  # inner units before the ones holding them
            fully_shard(unit, **shard)
        fully_shard(model, **shard)
        # fully_shard replaced the parameters by sharded ones (DTensors): the optimizer, built by
        # the recipe on the plain model, takes them instead (same names, nothing stepped yet).
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        if self.accelerator.mixed_precision != "no":
            # As Accelerate's prepare does for DDP: the model's outputs in fp32, so that the loss and
            # what plugins compute from the logits (distillation's logits / T) are not rounded to bf16.
            from accelerate.utils import convert_outputs_to_fp32

            model.forward = convert_outputs_to_fp32(model.forward)
        return model, self.accelerator.prepare(optimizer)

    def no_units(self, model, min_params: int) -> None:
        """The wrap policy found no unit below the root: the model is one unit, gathered whole for
        every forward, and activation checkpointing (which recomputes units) would do nothing. That
        was silent (fsdp_wrap=size on a model under the 100M default); now it is refused with
        activation checkpointing and a warning without."""
        options = self.options
        if options.fsdp_wrap == "size":
            largest = max((sum(p.numel() for p in m.parameters()) for m in model.children()), default=0)
            hint = (f"no module of {type(model).__name__} reaches distributed.fsdp_min_params={min_params:,} parameters "
                    f"(its largest child holds {largest:,}). Set fsdp_min_params lower (e.g. {max(1, largest // 4):,}) "
                    "or use fsdp_wrap=blocks")
        else:
            hint = (f"{type(model).__name__} has no Sequential or ModuleList of two or more blocks of one class. Use "
                    "distributed.fsdp_wrap=size with an fsdp_min_params below its modules' sizes")
        if options.fsdp_activation_checkpointing:
            raise LauncherError(f"distributed.fsdp_activation_checkpointing recomputes the FSDP units below the root, "
                                f"and fsdp_wrap={options.fsdp_wrap} made none: {hint}; or turn activation "
                                "checkpointing off.")
        if self.accelerator.is_main_process:
            print(f"warning: distributed.fsdp_wrap={options.fsdp_wrap} made no FSDP unit below the root: the whole "
                  f"model is gathered for every forward (FSDP saves memory between steps only): {hint}.",
                  file=sys.stderr, flush=True)

    def micro_batch_context(self, model, first: bool, last: bool):
        # Gradients are reduce-scattered at the step's last micro-batch only; BatchNorm buffers
        # come from rank 0 before the step's first forward, as under DDP (FSDP never does it).
        if first and self.accelerator.num_processes > 1:
            broadcast_buffers(model)
        model.set_requires_gradient_sync(last)
        return nullcontext()

    @property
    def lockstep_eval(self) -> bool:
        # Each forward all-gathers the parameters: every rank must run as many.
        return self.accelerator.num_processes > 1

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The full fp32 weights on every rank (an all-gather: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach() for k, v in state.items()}

    def save_checkpoint(self, model, optimizer, folder: Path) -> Optional[dict]:
        """The gathered fp32 weights (model.safetensors) and a sharded checkpoint of the model and
        optimizer in folder/fsdp (torch.distributed.checkpoint: each rank writes its shard)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.save_full_weights(model, folder / "model.safetensors")
        model_state, optimizer_state = get_state_dict(model, _inner(optimizer))
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "fsdp"))
        return None

    def load_checkpoint(self, model, optimizer, folder: Path, optimizer_state: Optional[dict],
                        saved_world_size: int) -> None:
        """DCP reads the shards this rank needs, whatever the number of ranks that wrote them."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, _inner(optimizer))  # the layout to read into
        state = {"model": model_state, "optimizer": optimizer_state}
        load_sharded(state, folder / "fsdp")
        set_state_dict(model, _inner(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


# What a checkpoint's DCP metadata (.metadata, a pickle) may name: DCP's own data classes, sizes,
# dtypes and a path; constructing them runs no code of the file's choosing.
DCP_METADATA_GLOBALS = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"),
                        ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


def load_sharded(state: dict, path: Path) -> None:
    """dcp.load into `state` through safe_dcp_loading; a refusal on any rank is raised as it is
    (DCP wraps the ranks' errors in a CheckpointException, a BaseException)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = safe_dcp_loading(path)
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except CheckpointException as err:
        refused = next((exc for exc, _ in err.failures.values() if isinstance(exc, LauncherError)), None)
        if refused is not None:
            raise refused from None
        raise LauncherError(f"Could not read the sharded checkpoint in {path}: {err}") from None


class MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata file, unpickled with DCP_METADATA_GLOBALS and torch dtypes only."""

    def find_class(self, module, name):
        allowed = ((module, name) in DCP_METADATA_GLOBALS or module == "torch.distributed.checkpoint.metadata"
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return super().find_class(module, name)


def sharded_checkpoint_problem(path: Path) -> Optional[str]:
    """Why the sharded checkpoint in `path` cannot be loaded safely, or None: its .metadata or
    one of its pickled (non-tensor) entries names more than DCP's types and tensors. The checkpoint
    plugin's verify asks this before choosing a checkpoint, as it checks the .pt files of the
    others, so a damaged newest one is skipped for an older one instead of stopping the resume
    (torch's loader logs the refusal as tracebacks, then fails on every rank)."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        with open(path / ".metadata", "rb") as f:
            metadata = MetadataUnpickler(f).load()
        for index, info in metadata.storage_data.items():
            if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
                continue
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    except (pickle.UnpicklingError, OSError, EOFError, AttributeError, TypeError, ValueError, RuntimeError) as err:
        return f"'{path}' cannot be loaded safely ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})"
    return None


def safe_dcp_loading(path: Path):
    """A reader and planner for dcp.load that refuse code in a checkpoint. torch's own read the
    .metadata file with pickle.load and non-tensor entries with torch.load(weights_only=False), so
    a tampered checkpoint could run anything; these allow DCP's data classes and tensors only.
    Written by hand: torch.distributed.checkpoint has no safe-loading option (torch 2.14)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    def refuse(what: str, why: str) -> LauncherError:
        return LauncherError(
            f"Refusing to load '{what}': it holds pickled objects other than tensors and torch.distributed."
            f"checkpoint's own types ({why}), and loading it could run code. If you did not write this "
            "checkpoint, do not trust it; resume from another one or start afresh.")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_file = Path(self.path) / ".metadata"
            try:
                with open(metadata_file, "rb") as f:
                    metadata = MetadataUnpickler(f).load()
            except pickle.UnpicklingError as err:
                raise refuse(str(metadata_file), str(err)) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            # DefaultLoadPlanner.load_bytes with weights_only=True.
            from torch.distributed.checkpoint._traverse import set_element

            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise refuse(f"{path} ({read_item.dest_index.fqn})", str(err).splitlines()[0]) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeReader(str(path)), SafePlanner()


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP's units besides the root: the members of every Sequential / ModuleList that holds
    two or more modules of one class with parameters (timm's and our blocks and stages: ViT's
    blocks, ResNet's and WRN's stages and their blocks, ConvNeXt's stages and blocks), outer
    ones first."""
    blocks = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)):
            members = [m for m in module.children() if any(True for _ in m.parameters())]
            if len(members) >= 2 and len({type(m) for m in members}) == 1:
                blocks += members
    return blocks


def size_based_units(model: torch.nn.Module, min_params: int) -> list[torch.nn.Module]:
    """fsdp_wrap=size: the modules FSDP1's auto-wrap picks with torch's size_based_auto_wrap_policy
    (a module becomes a unit when its parameters not already in a unit below it reach min_params;
    ModuleList/ModuleDict never, MultiheadAttention's insides never). FSDP2 has no auto-wrap, so
    FSDP1's walk (_recursive_wrap) is repeated here; each decision is torch's policy function.
    Outer units first, as repeated_blocks returns them."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy as policy

    units: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module) -> int:
        """The parameter count of `module`'s subtree that ends up in units."""
        total = sum(p.numel() for p in module.parameters())
        if not policy(module, recurse=True, nonwrapped_numel=total, min_num_params=min_params):
            return 0
        wrapped = sum(walk(child) for child in module.children())
        if module is not model and policy(module, recurse=False, nonwrapped_numel=total - wrapped,
                                          min_num_params=min_params):
            units.append(module)
            return total
        return wrapped

    walk(model)
    return units[::-1]


def innermost(units: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The units that hold no other unit: activation checkpointing recomputes each once."""
    ids = {id(u) for u in units}
    return [u for u in units if not any(id(m) in ids for m in u.modules() if m is not u)]


def checkpoint_activations(blocks: list[torch.nn.Module]) -> None:
    """fsdp_activation_checkpointing: each block's forward runs under torch.utils.checkpoint
    (non-reentrant; its parameter names stay as they are, unlike torch's checkpoint_wrapper).
    FSDP's hooks stay outside the recomputed region, so the parameters are gathered for the
    recomputation as for the backward. The recomputed forward leaves BatchNorm's running
    statistics as they were: torch's checkpoint would update them a second time."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        forward = block.forward
        norms = [m for m in block.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        block.forward = functools.wraps(forward)(functools.partial(
            checkpoint, forward, use_reentrant=False,
            context_fn=lambda norms=norms: (nullcontext(), batchnorm_statistics_frozen(norms))))


@contextmanager
def batchnorm_statistics_frozen(norms: list[torch.nn.Module]):
    """BatchNorm in training mode, normalising with the batch's statistics as before, but leaving
    its running statistics and batch count unchanged (momentum 0: running = 1 * running + 0 * batch).
    Written by hand: torch.utils.checkpoint has no option for it."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
