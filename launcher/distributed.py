"""Distributed strategies, chosen in the recipe's `distributed:` section.

    distributed: {strategy: ddp}                                   # default
    distributed: {strategy: deepspeed, zero_stage: 3, offload: optimizer}
    distributed: {strategy: deepspeed, deepspeed_config: ds.json}  # a DeepSpeed JSON file
    distributed: {strategy: fsdp}                                  # PyTorch FSDP2 (fully_shard)

All run through Accelerate and the same `accelerate launch` command (one or many
machines, GPUs with NCCL or CPUs with gloo); the recipe, not the launch flags, decides
the strategy, so a checkpoint always knows what wrote it.

FSDP is PyTorch's own FSDP2 (torch.distributed.fsdp.fully_shard), applied here rather than
through Accelerate's FSDP plugin: Accelerate leaves a CPU run as plain multi-CPU DDP whatever
its FSDP settings, and the same code path on CPUs (the tests) and GPUs is the one that is
tested. What Accelerate's FSDP2 support does at prepare is done here the same way: the units
(repeated blocks, or size-based) and then the root are sharded with the recipe's mesh, mixed
precision and offload policies, and the optimizer's parameters are swapped for the sharded
ones (its state is still empty). Weights are gathered for EMA and for each
model.safetensors; checkpoints are sharded with torch.distributed.checkpoint (each rank
writes its shard; DCP reshards on load, so a run resumes on another process count).

DeepSpeed's engine owns backward and the optimizer step: `engine.backward` reduces (ZeRO
2/3: reduce-scatters) the gradients, and at the last micro-batch of a step `engine.step`
steps and zeroes them. So hooks that need the gradients between backward and the step
(SAM, nan_guard) cannot run there, and plugins say so (Plugin.refused_under, checked
when the recipe loads; the README's support table is generated from the same
declarations).

What the core does here, and why:
- The DeepSpeed config is built from the recipe (batch per micro-step, accumulation
  steps, ZeRO stage, offload, precision) and handed to plugins through the
  `accelerator_options` hook as options["deepspeed_config"] (grad_accum sets the
  accumulation steps, grad_clip DeepSpeed's clipping); a user JSON file is the starting
  point, and any value it sets must agree with the recipe's.
- Precision: the recipe's (Plugin.precision, i.e. amp) maps to DeepSpeed's bf16/fp16
  sections. DeepSpeed then keeps the model in that dtype (fp32 master weights in the
  optimizer), so inputs are cast to the model's dtype (DeepSpeed does not do it).
- On CPU-only machines DeepSpeed needs the gloo backend and ACCELERATE_USE_DEEPSPEED in
  the environment before Accelerate's state exists (../shared/FACTS.md); both are set here.
- Weights leave DeepSpeed consolidated to fp32 (`full_state_dict`): the final weights,
  each checkpoint's model.safetensors and EMA updates (ZeRO-3 gathers the shards).
- BatchNorm buffers are broadcast from rank 0 before each step's first forward pass, as DDP
  does (DeepSpeed never does): otherwise the ranks' statistics drift apart, evaluation differs
  per rank, and a checkpoint (rank 0's buffers) would not resume exactly.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Optional

import torch

from launcher.errors import LauncherError
from launcher.runlog import save_state_dict, save_weights

# DeepSpeed JSON sections the recipe owns: the optimizer and schedule come from the recipe's
# own sections (timm), so a file that sets them would silently train something else.
RECIPE_OWNED_SECTIONS = {"optimizer": "optimizer:", "scheduler": "schedule:"}
# Read once, before a DeepSpeed run in this process sets it itself.
LAUNCHED_WITH_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def read_deepspeed_json(path: Optional[str]) -> dict:
    """The user's DeepSpeed JSON file (empty without one), refusing sections the recipe owns."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise LauncherError(f"distributed.deepspeed_config: '{path}' does not exist. Give the path of a DeepSpeed "
                            "JSON file, or remove the key to let the recipe build the config.")
    try:
        config = json.loads(file.read_text())
    except ValueError as err:
        raise LauncherError(f"distributed.deepspeed_config: '{path}' is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise LauncherError(f"distributed.deepspeed_config: '{path}' must hold a JSON object.")
    for key, section in RECIPE_OWNED_SECTIONS.items():
        if key in config:
            raise LauncherError(f"distributed.deepspeed_config: '{path}' sets '{key}', which the recipe's "
                                f"'{section}' section owns; remove it from the file and set it in the recipe.")
    return config


def initial_accelerator_options(recipe) -> dict:
    """The options the core hands to the plugins' accelerator_options hook."""
    options: dict[str, Any] = {"cpu": not torch.cuda.is_available()}
    section = recipe.distributed
    if section.strategy == "deepspeed":
        options["cpu"] = False  # Accelerate's DeepSpeed path is skipped with cpu=True; DeepSpeed has a CPU backend
        options["deepspeed_config"] = deepspeed_config(recipe)
    return options


def deepspeed_config(recipe) -> dict:
    """DeepSpeed's config from the recipe; the user's JSON file is the starting point."""
    section = recipe.distributed
    config = read_deepspeed_json(section.deepspeed_config)
    zero = dict(config.get("zero_optimization", {}))
    if section.zero_stage is not None and "stage" in zero and int(zero["stage"]) != section.zero_stage:
        raise LauncherError(f"distributed.zero_stage={section.zero_stage} but '{section.deepspeed_config}' sets "
                            f"zero_optimization.stage={zero['stage']}; set one of them.")
    zero["stage"] = section.stage
    if section.offload != "none":
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    if section.offload == "optimizer_and_params":
        zero.setdefault("offload_param", {"device": "cpu"})
    if section.stage == 3:
        # Lets engine-level saving gather the weights; our own consolidation is full_state_dict.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    config["zero_optimization"] = zero
    config.setdefault("gradient_accumulation_steps", 1)  # grad_accum's accelerator_options sets its k
    # No clipping unless the grad_clip plugin asks: Accelerate would otherwise fill in 1.0.
    config.setdefault("gradient_clipping", 0.0)
    config.setdefault("steps_per_print", 10 ** 9)  # the loop logs; DeepSpeed's own step prints are noise
    config.setdefault("wall_clock_breakdown", False)
    # timm's optimizers (momentum SGD, LAMB...) are not on DeepSpeed's tested list; they work with
    # ZeRO, and offload runs them on the CPU copy instead of forcing DeepSpeed's CPU Adam.
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def make_accelerator(recipe, options: dict):
    """Accelerator(**options), after turning options['deepspeed_config'] into Accelerate's plugin."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if "DS_ACCELERATOR" not in os.environ and only_cpu():
        # DeepSpeed is imported even by DDP runs (Accelerate's unwrap_model looks for its engine) and
        # on finding no GPU warns "Setting accelerator to CPU. If you have GPU ..." on every rank.
        # Here CPU is the right answer, so say it instead of being told.
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
    config = options.pop("deepspeed_config", None)
    if config is None:
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
    config = finish_deepspeed_config(recipe, config, options.get("mixed_precision", "no"))
    if "LOCAL_RANK" not in os.environ:
        # One process without a launcher (python -m launcher): DeepSpeed still needs a process group.
        os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    if not torch.cuda.is_available():
        # ../shared/FACTS.md: without these Accelerate reports one process per rank under DeepSpeed.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        handlers = list(options.pop("kwargs_handlers", []))
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        options["kwargs_handlers"] = handlers
    options.pop("cpu", None)
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), **options)


def only_cpu() -> bool:
    """No accelerator torch can see (CUDA/ROCm, Apple MPS, Intel XPU)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def finish_deepspeed_config(recipe, config: dict, precision: str) -> dict:
    """The config after the plugins' accelerator_options: batch size per micro-step and the
    precision sections, each checked against what the user's JSON file set."""
    gas = int(config["gradient_accumulation_steps"])
    config = _agree(config, "train_micro_batch_size_per_gpu", -(-recipe.data.batch_size // gas),
                    "data.batch_size / the number of micro-batches")
    for dtype in ("bf16", "fp16"):
        config = _agree(config, f"{dtype}.enabled", precision == dtype,
                        f"the recipe's precision ({precision if precision != 'no' else 'fp32'})")
    if precision in ("bf16", "fp16"):
        # DeepSpeed casts only the parameters; BatchNorm then has bf16 weights and fp32 running
        # statistics, which its CPU kernel refuses. Buffers follow the parameters' dtype.
        config.setdefault("data_types", {}).setdefault("buffer_dtype", precision)
    if precision == "fp16":
        config["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling, as torch's GradScaler
        if not torch.cuda.is_available():
            raise LauncherError("DeepSpeed's fp16 needs a GPU: its CPU backend has no fp16 loss scaling. On the "
                                "CPU use plugins.amp.dtype=bf16, or no amp plugin.")
    return config


def _agree(config: dict, dotted: str, value, source: str) -> dict:
    """Set config[dotted] = value, unless the user's file already set another value."""
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        raise LauncherError(f"The DeepSpeed config sets {dotted}={current!r}, but {source} gives {value!r}. "
                            f"Remove {dotted} from the JSON file (or set it to \"auto\") and let the recipe decide.")
    node[leaf] = value
    return config


# ------------------------------------------------------------------ strategies


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

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The full fp32 weights and buffers (every rank calls it; here it needs no communication)."""
        return {k: v.detach() for k, v in self.accelerator.unwrap_model(model).state_dict().items()}

    def save_full_weights(self, model, path: Path) -> None:
        """The trained weights as one fp32 safetensors file, whatever the strategy: the final weights
        and each checkpoint's model.safetensors. Every rank calls it; the main process writes."""
        if self.accelerator.is_main_process:  # byte for byte the model's own tensors
            save_weights(self.accelerator.unwrap_model(model), path)

    def save_checkpoint(self, model, optimizer, folder: Path) -> Optional[dict]:
        """Every rank: write the weights into a checkpoint folder; returns the optimizer state for
        the main process to store in trainer.pt (None where the strategy stores it itself)."""
        self.save_full_weights(model, folder / "model.safetensors")
        return optimizer.state_dict()

    def load_checkpoint(self, model, optimizer, folder: Path, optimizer_state: Optional[dict],
                        saved_world_size: int) -> None:
        """Every rank: the weights and optimizer state of a checkpoint folder (save_checkpoint's)."""
        from safetensors.torch import load_model

        load_model(self.accelerator.unwrap_model(model), str(folder / "model.safetensors"))
        optimizer.load_state_dict(optimizer_state)


class FullyShardedDataParallel(DataParallel):
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
        units = size_based_units(model, options.fsdp_min_params or 10 ** 8) if options.fsdp_wrap == "size" \
            else repeated_blocks(model)
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

    def save_full_weights(self, model, path: Path) -> None:
        state = self.full_state_dict(model)
        if self.accelerator.is_main_process:
            save_state_dict(state, path)

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


def safe_dcp_loading(path: Path):
    """A reader and planner for dcp.load that refuse code in a checkpoint. torch's own read the
    .metadata file with pickle.load and non-tensor entries with torch.load(weights_only=False), so
    a tampered checkpoint could run anything; these allow DCP's data classes and tensors only.
    Written by hand: torch.distributed.checkpoint has no safe-loading option (torch 2.14)."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    def refuse(what: str, why: str) -> LauncherError:
        return LauncherError(
            f"Refusing to load '{what}': it holds pickled objects other than tensors and torch.distributed."
            f"checkpoint's own types ({why}), and loading it could run code. If you did not write this "
            "checkpoint, do not trust it; resume from another one or start afresh.")

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = ((module, name) in DCP_METADATA_GLOBALS or module == "torch.distributed.checkpoint.metadata"
                       or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
            if not allowed:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
            return super().find_class(module, name)

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


class DeepSpeedZeRO(DataParallel):
    """DeepSpeed's engine through Accelerate (see the module docstring)."""

    def __init__(self, accelerator, recipe):
        super().__init__(accelerator)
        self.stage = recipe.distributed.stage
        self.mixed = accelerator.mixed_precision in ("bf16", "fp16")

    def micro_batch_context(self, model, first: bool, last: bool):
        # DeepSpeed decides about gradient reduction from the boundary set in backward. Buffers
        # (BatchNorm statistics) come from rank 0 before a step's first forward, as under DDP
        # (whose no_sync forwards skip the broadcast).
        if first and self.accelerator.num_processes > 1:
            broadcast_buffers(model.module)
        return nullcontext()

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        # Written by hand instead of accelerator.backward: our loss is already scaled to its share
        # of the global batch (see launcher/loop.py), so DeepSpeed must not divide it by the
        # accumulation steps again (scale_wrt_gas=False); the boundary is the step's last micro-batch.
        model.set_gradient_accumulation_boundary(is_boundary=last)
        model.backward(loss, scale_wrt_gas=False)
        if last:
            model.step()

    @property
    def lockstep_eval(self) -> bool:
        # ZeRO-3 gathers each layer's parameters inside forward: a collective, so every rank must
        # run the same number of forward passes, also when their evaluation shares differ.
        return self.stage == 3 and self.accelerator.num_processes > 1

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """fp32 weights gathered from DeepSpeed's master copy (a collective: every rank calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = model.module
        out = {}
        names = {id(p): n for n, p in module.named_parameters()}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in names and (self.stage == 3 or self.mixed):
                full = safe_get_full_fp32_param(tensor)
                tensor = full if full is not None else tensor
            out[name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
        return out

    def save_full_weights(self, model, path: Path) -> None:
        state = self.full_state_dict(model)  # a collective under ZeRO-3
        if self.accelerator.is_main_process:
            save_state_dict(state, path)

    def save_checkpoint(self, model, optimizer, folder: Path) -> Optional[dict]:
        """The consolidated fp32 weights plus DeepSpeed's own checkpoint (engine.save_checkpoint:
        per-rank ZeRO optimizer shards, the module, its loss scaler) in folder/deepspeed."""
        self.save_full_weights(model, folder / "model.safetensors")
        model.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)
        return None

    def load_checkpoint(self, model, optimizer, folder: Path, optimizer_state: Optional[dict],
                        saved_world_size: int) -> None:
        world_size = self.accelerator.num_processes
        if saved_world_size != world_size:
            raise LauncherError(
                f"The checkpoint {folder} was written by DeepSpeed on {saved_world_size} processes, whose ZeRO "
                f"shards cannot be loaded by {world_size}. Resume on {saved_world_size} processes, or start a "
                f"new run from its consolidated weights (plugins.pretrained.checkpoint={folder}).")
        # DeepSpeed's own loader, reading its files with weights_only=True (it would unpickle anything).
        with safe_deepspeed_loading(model):
            path, _ = model.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                            load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise LauncherError(f"DeepSpeed could not load the checkpoint in {folder / 'deepspeed'}.")


def deepspeed_checkpoint_types() -> list:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and containers
    (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 checkpoints,
    fp32 and bf16). Plain data: constructing them runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


@contextmanager
def safe_deepspeed_loading(engine):
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False), which runs any
    code a tampered file pickles. Inside this block the engine's checkpoint engine loads with
    weights_only=True and only DeepSpeed's own data classes allowed; anything else is refused."""
    import pickle

    checkpoint_engine = engine.checkpoint_engine
    allowed = deepspeed_checkpoint_types()

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise LauncherError(
                f"Refusing to load '{path}': it holds pickled objects other than tensors and DeepSpeed's "
                f"checkpoint types, and loading it could run code ({str(err).splitlines()[0]}). If you did not "
                "write this file, do not trust the checkpoint; resume from another one or start afresh.") from None

    checkpoint_engine.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del checkpoint_engine.load


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
