"""DeepSpeed ZeRO through Accelerate (`distributed.strategy: deepspeed`).

DeepSpeed's engine owns backward and the optimizer step: `engine.backward` reduces (ZeRO
2/3: reduce-scatters) the gradients, and at the last micro-batch of a step `engine.step`
steps and zeroes them. So hooks that need the gradients between backward and the step
(SAM, nan_guard) cannot run there, and plugins say so (Plugin.refused_under, checked
when the recipe loads; the README's support table is generated from the same
declarations).

What the core does here, and why:
- The DeepSpeed config is built here, once (deepspeed_config), from the recipe: batch per
  micro-step, ZeRO stage, offload, precision, and what plugins declare (grad_accum's
  accumulation steps, grad_clip's norm); a user JSON file is the starting point, read once,
  and any value it sets must agree with the recipe's. Plugins never edit the JSON.
- Precision: the recipe's (Plugin.precision, i.e. amp) maps to DeepSpeed's bf16/fp16
  sections. DeepSpeed then keeps the model in that dtype (fp32 master weights in the
  optimizer), so inputs are cast to the model's dtype (DeepSpeed does not do it).
- On CPU-only machines DeepSpeed needs the gloo backend and ACCELERATE_USE_DEEPSPEED in
  the environment before Accelerate's state exists (without them Accelerate reports one
  process on every rank); make_accelerator (launcher/strategies/select.py) sets both.
- Weights leave DeepSpeed consolidated to fp32 (`full_state_dict`): the final weights,
  each checkpoint's model.safetensors and EMA updates (ZeRO-3 gathers the shards).
- BatchNorm buffers are broadcast from rank 0 before each step's first forward pass, as DDP
  does (DeepSpeed never does): otherwise the ranks' statistics drift apart, evaluation differs
  per rank, and a checkpoint (rank 0's buffers) would not resume exactly.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import torch

from launcher.strategies.base import GatheredWeights, broadcast_buffers
from launcher.errors import LauncherError

# DeepSpeed JSON sections the recipe owns: the optimizer and schedule come from the recipe's
# own sections (timm), so a file that sets them would silently train something else.
RECIPE_OWNED_SECTIONS = {"optimizer": "optimizer:", "scheduler": "schedule:"}
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


def deepspeed_config(recipe, precision: str) -> dict:
    """DeepSpeed's whole config, built here once: the user's JSON file is the starting point, and
    the recipe fills in the ZeRO stage and offload, the batch per micro-step, what its plugins
    declare (accumulation steps, clipping: Plugin.accumulation_steps, Plugin.clipping_norm) and
    the precision. A value the file sets that the recipe contradicts is refused, naming both."""
    from launcher.registry import recipe_declares

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
    gas = recipe_declares(recipe, "accumulation_steps") or 1
    config = _agree(config, "gradient_accumulation_steps", gas, "plugins.grad_accum.micro_batches (1 without it)")
    norm = recipe_declares(recipe, "clipping_norm")
    if norm is not None:
        if config.get("gradient_clipping", 0.0) in (0.0, "auto"):  # 0: the file does not clip
            config["gradient_clipping"] = norm
        config = _agree(config, "gradient_clipping", norm, "plugins.grad_clip.max_norm")
    # No clipping unless a plugin asks (or the file does): Accelerate would otherwise fill in 1.0.
    config.setdefault("gradient_clipping", 0.0)
    config.setdefault("steps_per_print", 10 ** 9)  # the loop logs; DeepSpeed's own step prints are noise
    config.setdefault("wall_clock_breakdown", False)
    # timm's optimizers (momentum SGD, LAMB...) are not on DeepSpeed's tested list; they work with
    # ZeRO, and offload runs them on the CPU copy instead of forcing DeepSpeed's CPU Adam.
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
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


class DeepSpeedZeRO(GatheredWeights):
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

    def unwrap(self, model) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)  # the module inside DeepSpeed's engine

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
