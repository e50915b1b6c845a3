"""The recipe schema: the typed sections a recipe's YAML is validated against before anything
trains. Reading, overrides and the resolution that depends on the disk are launcher/config/load.py.

Every section forbids unknown keys; a misspelling is an error that names the key and
the nearest valid one. Plugin options are validated by each plugin's own schema
(see launcher.registry), so they follow the same rules.

Over 500 lines: one class per recipe section, each key with its description and its checks, read
top to bottom as the reference of every key a recipe can hold; split, a reader would hop files.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from launcher.errors import did_you_mean, shorten
from launcher.config.schema import StrictModel


class Section(StrictModel):
    """A recipe section: unknown keys are errors, values are type-checked (no silent coercion
    of "abc", "0.5" or true to a number: see launcher/config/schema.py)."""


MAX_NAME_BYTES = 255  # NAME_MAX of ext4, xfs, btrfs, APFS, NTFS


def check_file_names(path: str) -> None:
    """A path component over 255 bytes is refused by every common file system; it used to surface
    as an OSError traceback holding the whole value (10 MB of it, for a 10 MB value)."""
    for part in path.split("/"):
        if len(part.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"the path component '{shorten(part, 40)}' is {len(part.encode())} bytes long; file "
                             f"systems take at most {MAX_NAME_BYTES}. Check the path")


class RunSection(Section):
    dir: Optional[str] = Field(None, description="run directory; default runs/<recipe name>")
    log_every: int = Field(10, ge=1, description="optimizer steps between train rows in metrics.jsonl")
    progress: bool = Field(True, description="live progress bar on a terminal; otherwise (a log file, or false) one plain line per logged row")
    experiment: Optional[dict[str, Any]] = Field(
        None, description="set by launcher.experiment for each trial: {name, trial, rung, seed, combo}; trackers "
                          "group a trial's run by it (W&B: group = experiment, job type = rung)")

    @field_validator("dir")
    @classmethod
    def _file_names_the_file_system_takes(cls, value):
        if value:
            check_file_names(value)
        return value


class ModelSection(Section):
    name: str = Field(description="any timm model name, or a CIFAR WideResNet such as wrn28_10")
    # Optional in a recipe whose data.train has the shard writer's info.json next to it.
    num_classes: int = Field(gt=1)
    in_chans: int = Field(3, ge=1, description="input channels; grayscale data is repeated to fit")
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier (WRN: inside blocks)")
    channels_last: Optional[bool] = Field(
        None, description="NHWC memory format; default: on for CUDA runs with amp (tensor cores), off otherwise")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    grad_checkpointing: bool = Field(
        False, description="recompute each block's activations in the backward pass instead of keeping them (timm's "
                           "set_grad_checkpointing): less memory, about a third more compute, the same gradients")
    pretrained: bool = Field(False, description="timm's pretrained weights for model.name (e.g. resnet50.a1_in1k, "
                                                "hf-hub:timm/...) from this machine's Hugging Face cache (never "
                                                "downloaded); the classifier is replaced for num_classes")
    pretrained_file: Optional[str] = Field(
        None, description="pretrained weights from this file instead of the cache (sets pretrained: true): a "
                          ".safetensors/.bin/.pth file, a snapshot folder or a models--ORG--NAME folder")

    @model_validator(mode="after")
    def _a_pretrained_file_is_loaded(self):
        """A file given is a file to load: it was silently ignored without pretrained: true."""
        if self.pretrained_file and not self.pretrained:
            if "pretrained" in self.model_fields_set:
                raise ValueError("model.pretrained is false but model.pretrained_file is set: remove "
                                 "model.pretrained_file to train from scratch, or set model.pretrained=true")
            self.pretrained = True
        return self


TORCHVISION_AUGMENT = ("cifar10", "imagenet", "svhn", "randaugment", "trivialaugment")


class AugmentSection(Section):
    random_resized_crop: bool = Field(
        False, description="RandomResizedCrop to data.image_size (photos: ImageNet-style) instead of resizing the "
                           "whole image")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random_resized_crop: range of the crop's area "
                                                                "(fraction of the image)")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random_resized_crop: range of its aspect ratio")
    crop_padding: int = Field(0, ge=0, description="random crop after zero padding by this many pixels (0: off)")
    hflip: float = Field(0.0, ge=0.0, le=1.0, description="horizontal flip probability (0.5 flips half the images)",
                         json_schema_extra={"example": "0.5 flips half the images"})
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="random rotation, max degrees")
    color_jitter: float = Field(0.0, ge=0.0, description="brightness, contrast and saturation jitter strength "
                                                          "(torchvision ColorJitter; timm's --color-jitter)")
    auto_augment: Optional[str] = Field(
        None, description="torchvision: cifar10, imagenet, svhn (AutoAugment policies), randaugment, trivialaugment; "
                          "or a timm string: rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, original, v0, 3a")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="random erasing probability (timm)",
                                  json_schema_extra={"example": "0.25 erases a rectangle in a quarter of the images"})

    @field_validator("scale", "ratio")
    @classmethod
    def _increasing(cls, value, info: ValidationInfo):
        if not 0 < value[0] <= value[1]:
            example = "[0.08, 1.0]" if info.field_name == "scale" else "[0.75, 1.333]"
            raise ValueError(f"give two positive numbers, the smaller first, e.g. {example}")
        return value

    @field_validator("auto_augment")
    @classmethod
    def _known_policy(cls, value):
        if value is None or value in TORCHVISION_AUGMENT:
            return value
        from launcher.data.transforms import timm_augmentation

        try:
            timm_augmentation(value, 224, (0.5, 0.5, 0.5), "bilinear")
        except Exception as err:  # noqa: BLE001  (timm's parsers raise assorted errors on a bad string)
            raise ValueError(f"not a torchvision policy ({', '.join(TORCHVISION_AUGMENT)}) nor a timm augmentation "
                             f"string such as rand-m9-mstd0.5-inc1, augmix-m5-w4-d2 or original ({err})") from None
        return value


class DataSection(Section):
    train: str = Field(description="training shards: a brace pattern of local paths, s3:// or http(s):// URLs, "
                       "or pipe: commands")
    val: Optional[str] = Field(None, description="validation shards (same forms)")
    batch_size: int = Field(gt=0, description="samples per process per optimizer step")
    eval_batch_size: Optional[int] = Field(None, gt=0, description="default: 2 x batch_size")
    num_workers: int = Field(2, ge=0, description="data-loader worker processes per rank")
    persistent_workers: Optional[bool] = Field(
        None, description="keep the loader workers from epoch to epoch (local shards); default: on for CUDA runs")
    image_size: int = Field(32, gt=0, description="the square size the model sees (training crops, evaluation)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field("bilinear", description="of every resize")
    crop_pct: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="evaluation: resize the shorter side to image_size / crop_pct, then "
                                          "center-crop image_size (timm's eval transform); default: resize the whole "
                                          "image to image_size x image_size")
    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    shuffle: bool = True
    shuffle_window: int = Field(
        1000, ge=1, description="samples shuffled together inside one stream (the shuffle buffer's size)"
    )
    aug_repeats: int = Field(
        1, ge=1, description="repeated augmentation (DeiT, timm's --aug-repeats): each epoch, 1/k of the samples k "
                             "times each with its own augmentation, the copies on neighbouring lanes (ranks); the "
                             "epoch keeps its length (timm's)")
    streams: Optional[int] = Field(
        None,
        ge=1,
        description="sequential streams an epoch is cut into; a fixed value gives the same batches on any "
        "process count that divides it (default: the number of processes)",
    )
    cache_dir: Optional[str] = Field(
        None, description="where shard indexes and streamed shards are cached (default $LAUNCHER_CACHE_DIR, else "
        "~/.cache/launcher/shards)")
    cache_limit: Optional[Union[int, str]] = Field(
        None, description="remote shards (s3://, http(s)://, pipe:): local bytes one rank may hold, e.g. 20GB; "
        "shards it has finished reading are evicted (default: no limit)")
    prefetch_shards: int = Field(4, ge=0, description="remote shards fetched ahead of those being read")
    s3_endpoint: Optional[str] = Field(
        None, description="S3-compatible endpoint URL for s3:// shards (default: AWS_ENDPOINT_URL or AWS S3)")
    fetch_retries: int = Field(5, ge=0, description="retries of a failed remote fetch (waits double each time)")
    fetch_retry_wait: float = Field(1.0, ge=0.0, description="seconds before the first retry")
    fetch_timeout: float = Field(60.0, gt=0.0, description="seconds a remote connection or read may stall")
    augment: AugmentSection = Field(default_factory=AugmentSection)
    augment_on: Literal["auto", "loader", "device"] = Field(
        "auto", description="where training augmentation runs: device (the ops and normalisation on the whole batch "
                            "on the training device; refused with an op that has no batched form: a timm "
                            "auto_augment string), loader (per sample, in the loader workers), or auto: device when "
                            "every op of data.augment has a batched form and random_resized_crop is off (photos differ "
                            "in size), else loader; a run directory keeps the path its run started with")
    _augment_reason: str = ""  # why auto chose the path it did (--check says it)

    @model_validator(mode="after")
    def _device_augmentation_has_batched_ops(self):
        if self.augment_on == "device":
            from launcher.data.augment import BATCHED_OPS, BatchAugment
            from launcher.data.augment_policy import POLICIES

            missing = BatchAugment.unbatched_ops(self)
            if missing:
                raise ValueError(f"data.augment_on=device: data.augment.{missing[0]} has no batched form"
                                 f"{why_unbatched(self)} "
                                 f"(batched: {', '.join(BATCHED_OPS)}; auto_augment: {', '.join(POLICIES)}). Set "
                                 f"data.augment_on=loader, or drop data.augment.{missing[0]}")
        return self

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value):
        """Pixels are divided by it: a zero passed --check and stopped the run at its first batch."""
        if not value or any(v <= 0 for v in value):
            raise ValueError("every value must be positive (each channel's pixels are divided by it), e.g. [0.5]")
        return value

    @field_validator("train", "val")
    @classmethod
    def _file_names_the_file_system_takes(cls, value):
        if value and not value.startswith(("pipe:", "s3://", "http://", "https://")):
            check_file_names(value.replace("::", "/"))
        return value

    @model_validator(mode="after")
    def _padding_smaller_than_the_image(self):
        """A crop from a pad wider than the image can be all padding; a huge pad also allocates
        (image_size + 2 pad)^2 pixels per sample (30000 asked for 57 GB)."""
        if self.augment.crop_padding >= self.image_size:
            raise ValueError(f"data.augment.crop_padding ({self.augment.crop_padding}) must be smaller than "
                             f"data.image_size ({self.image_size}): crops of {self.image_size} pixels out of a "
                             f"padding that wide can hold no image at all. CIFAR's is 4 for 32 pixels")
        if len(self.mean) != len(self.std):
            raise ValueError(f"data.mean has {len(self.mean)} values and data.std {len(self.std)}: give one per "
                             "input channel in each")
        return self

    @field_validator("cache_limit")
    @classmethod
    def _a_size(cls, value):
        from launcher.data.remote.store import parse_size

        parse_size(value)  # '20GB' and the like; a ValueError names the value
        return value


class CompileSection(Section):
    """torch.compile's arguments (https://pytorch.org/docs/stable/generated/torch.compile.html)."""

    backend: str = Field("inductor", description="inductor (generates kernels; C++ on CPU), aot_eager (no code "
                                                 "generation: checks a model compiles), cudagraphs, ...")
    mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = Field(
        None, description="inductor's mode; None is torch's default")
    dynamic: Optional[bool] = Field(None, description="None: recompile once with dynamic shapes when a shape "
                                                      "changes (a smaller last batch); true/false force it")
    fullgraph: bool = Field(False, description="fail on a graph break instead of running that part eagerly")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value):
        """A misspelled backend would pass --check and fail only once the run compiles."""
        from torch._dynamo import list_backends

        known = list_backends(exclude_tags=())
        if value not in known:
            raise ValueError(f"torch.compile has no backend '{value}'.{did_you_mean(value, known)} Registered "
                             f"backends: {', '.join(b for b in known if 'TESTING' not in b)}")
        return value

    def kwargs(self) -> dict:
        """torch.compile(**kwargs): the fields are its keyword arguments."""
        return self.model_dump()


class TrainSection(Section):
    epochs: int = Field(gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="stop after this many optimizer steps")
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and always at the end)")
    tf32: bool = Field(True, description="GPUs (Ampere+): TF32 matmuls and convolutions, as timm's train.py; "
                                         "false for full fp32 (no effect on CPU)")
    deterministic: bool = Field(False, description="bit-reproducible GPU runs: deterministic kernels, no cuDNN "
                                                   "autotuning (slower); CPU runs are reproducible anyway")
    compile: Optional[CompileSection] = Field(
        None, description="torch.compile the model: true, or {backend, mode, dynamic, fullgraph}; checkpoints and "
                          "weights stay plain (no _orig_mod. prefix)")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value):
        """`train.compile=true` is torch.compile's defaults, `false` is off."""
        if value is True:
            return {}
        return None if value is False else value


class OptimizerSection(Section):
    name: str = Field("sgd", description="a timm optimizer: sgd (nesterov), momentum, adamw, lamb, ...")
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    decay_bias_and_norm: bool = Field(False, description="apply weight decay to biases and norm layers too")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra optimizer arguments")
    lr_base: Optional[float] = Field(
        None, gt=0.0, description="derive lr from the global batch instead of giving it (timm's --lr-base): lr = lr_base "
                                  "x global batch / lr_base_size (or its square root); the global batch is "
                                  "data.batch_size x processes")
    lr_base_size: int = Field(256, ge=1, description="the global batch at which lr equals lr_base")
    lr_base_scale: Optional[Literal["linear", "sqrt"]] = Field(
        None, description="how lr follows the global batch; default timm's: sqrt for adaptive optimizers (names with "
                          "ada or lamb), linear otherwise")
    lr_base_global_batch: Optional[int] = Field(
        None, ge=1, description="written by the launcher, not by you: the global batch the recorded lr was derived for")

    @model_validator(mode="after")
    def _lr_or_lr_base(self):
        if self.lr_base is None:
            if self.lr_base_global_batch is not None:
                raise ValueError("optimizer.lr_base_global_batch records how lr was derived from optimizer.lr_base, "
                                 "which is not set: remove it")
            return self
        if self.lr_base_global_batch is None:
            if "lr" in self.model_fields_set:
                raise ValueError("optimizer.lr and optimizer.lr_base are both given: lr_base derives lr from the global "
                                 "batch, so keep one (remove lr, e.g. with the override ~optimizer.lr, or lr_base)")
            return self
        # A resolved recipe (a run's recipe.yaml) records the lr it derived: it must be the rule's.
        expected = lr_from_base(self, self.lr_base_global_batch)[0]
        if not math.isclose(self.lr, expected, rel_tol=1e-9):
            raise ValueError(f"optimizer.lr {self.lr} is not what lr_base {self.lr_base} gives at the recorded global "
                             f"batch {self.lr_base_global_batch} ({expected:.6g}): remove optimizer.lr and "
                             "optimizer.lr_base_global_batch to derive it again")
        return self


def lr_from_base(optimizer: "OptimizerSection", global_batch: int) -> tuple[float, str]:
    """timm's rule (train.py --lr-base): (lr, the scale used)."""
    scale = optimizer.lr_base_scale or ("sqrt" if any(k in optimizer.name.lower() for k in ("ada", "lamb"))
                                        else "linear")
    ratio = global_batch / optimizer.lr_base_size
    return optimizer.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio), scale


class ScheduleSection(Section):
    name: Literal["cosine", "step", "multistep", "poly", "tanh", "constant", "onecycle"] = Field(
        "cosine", description="timm's schedules, or onecycle (Smith & Topin: torch's OneCycleLR, peak optimizer.lr)")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warmup from warmup_lr, in epochs")
    warmup_lr: float = Field(1e-5, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    cycles: int = Field(1, ge=1, description="cosine restarts (SGDR): number of cycles over the run")
    cycle_mul: float = Field(1.0, gt=0.0, description="each cycle is this many times longer than the last")
    cycle_decay: float = Field(1.0, gt=0.0, description="each cycle starts at this fraction of the last peak")
    decay_epochs: float = Field(30.0, gt=0.0, description="step schedule: epochs between decays")
    decay_milestones: list[int] = Field(default_factory=lambda: [60, 120, 160])
    decay_rate: float = Field(0.1, gt=0.0)
    pct_start: float = Field(0.25, gt=0.0, lt=1.0, description="onecycle: fraction of the run spent increasing the LR")
    div_factor: float = Field(25.0, gt=0.0, description="onecycle: starting LR = optimizer.lr / div_factor")
    final_div_factor: float = Field(1e4, gt=0.0, description="onecycle: final LR = starting LR / final_div_factor")
    cycle_momentum: bool = Field(True, description="onecycle: momentum moves inversely to the LR (0.95 -> 0.85)")

    @model_validator(mode="after")
    def _onecycle_has_its_own_warmup(self):
        if self.name == "onecycle" and self.warmup_epochs:
            raise ValueError("schedule.warmup_epochs does not apply to onecycle (its first phase is the warmup): "
                             "set schedule.pct_start instead")
        return self


class DistributedSection(Section):
    """How the processes share the work (see launcher/strategies/select.py and the README's table)."""

    strategy: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp", description="ddp: every rank holds the whole model (Accelerate's DDP); deepspeed: ZeRO through Accelerate; "
                           "fsdp: PyTorch's FSDP2 (parameters, gradients and optimizer state sharded)")
    zero_stage: Optional[Literal[0, 1, 2, 3]] = Field(
        None, description="deepspeed: 0 none, 1 shard optimizer state, 2 + gradients, 3 + parameters (default 2)")
    offload: Literal["none", "optimizer", "optimizer_and_params"] = Field(
        "none", description="deepspeed: keep optimizer state (and with ZeRO-3 parameters) in CPU memory")
    deepspeed_config: Optional[str] = Field(
        None, description="deepspeed: a DeepSpeed JSON file; the recipe fills batch size, accumulation and precision")
    fsdp_sharding: Literal["full", "grad_op", "hybrid", "no_shard"] = Field(
        "full", description="fsdp: full: shard over all ranks, resharding after each unit's forward (least memory); "
                            "grad_op: keep the gathered parameters until the backward (one all-gather less a step); "
                            "hybrid: shard within each machine, replicate across machines (HSDP); "
                            "no_shard: replicate on every rank (DDP's memory, FSDP's code path)")
    fsdp_wrap: Literal["blocks", "size"] = Field(
        "blocks", description="fsdp: the units sharded besides the root: blocks (the members of every Sequential/"
                              "ModuleList of >= 2 modules of one class) or size (every module holding >= "
                              "fsdp_min_params parameters not already in a unit, as torch's size-based policy)")
    fsdp_min_params: Optional[int] = Field(
        None, ge=1, description="fsdp_wrap=size: the parameter count that makes a module a unit (default 100M, "
                                "torch's and Accelerate's)")
    fsdp_activation_checkpointing: bool = Field(
        False, description="fsdp: recompute each innermost unit's forward in the backward instead of keeping "
                           "its activations (less memory; one more forward pass of each unit a step)")
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory; the "
                           "optimizer steps on the CPU (FSDP2's CPUOffloadPolicy)")
    fsdp_mixed_precision: Literal["policy", "autocast"] = Field(
        "policy", description="fsdp with amp bf16: policy: FSDP2's MixedPrecisionPolicy (bf16 parameters gathered "
                              "and computed, gradients reduced in fp32), plus autocast; autocast: autocast over the "
                              "fp32 shards only (bit for bit DDP's arithmetic)")
    failure_timeout: float = Field(
        60.0, gt=0.0, description="seconds after which the other ranks stop when one rank died or failed")

    @model_validator(mode="after")
    def _deepspeed_keys_need_deepspeed(self):
        if self.strategy != "deepspeed":
            given = [k for k in ("zero_stage", "deepspeed_config") if getattr(self, k) is not None]
            given += ["offload"] if self.offload != "none" else []
            if given:
                raise ValueError(f"distributed.{given[0]} applies to strategy deepspeed only: set "
                                 "distributed.strategy=deepspeed, or remove it")
        if self.strategy != "fsdp":
            changed = [k for k in self.model_fields_set if k.startswith("fsdp_")
                       and getattr(self, k) != type(self).model_fields[k].default]
            if changed:
                raise ValueError(f"distributed.{sorted(changed)[0]} applies to strategy fsdp only: set "
                                 "distributed.strategy=fsdp, or remove it")
        if self.fsdp_min_params is not None and self.fsdp_wrap != "size":
            raise ValueError("distributed.fsdp_min_params applies to fsdp_wrap=size only: set distributed.fsdp_wrap="
                             "size, or remove it")
        stage = self.stage
        if self.offload == "optimizer" and stage == 0:
            raise ValueError("distributed.offload=optimizer needs zero_stage 1, 2 or 3 (stage 0 keeps no "
                             "optimizer partition to offload)")
        if self.offload == "optimizer_and_params" and stage != 3:
            raise ValueError("distributed.offload=optimizer_and_params needs zero_stage 3 (only ZeRO-3 shards "
                             "the parameters); use offload=optimizer with stages 1-2")
        return self

    @property
    def stage(self) -> Optional[int]:
        """The ZeRO stage that runs (None under DDP): the recipe's, else the JSON file's, else 2."""
        if self.strategy != "deepspeed":
            return None
        if self.zero_stage is not None:
            return self.zero_stage
        from launcher.strategies.deepspeed import read_deepspeed_json

        return int(read_deepspeed_json(self.deepspeed_config).get("zero_optimization", {}).get("stage", 2))


class Recipe(Section):
    seed: int = 0
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    data: DataSection
    train: TrainSection
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    plugins: dict[str, Optional[dict[str, Any]]] = Field(
        default_factory=dict, description="plugin name -> options; mapping order is execution order"
    )

    # Not a recipe key: the file's stem, used for the default run directory.
    _name: str = "recipe"

    @model_validator(mode="after")
    def _one_mean_and_std_per_input_channel(self):
        if len(self.data.mean) != self.model.in_chans:
            raise ValueError(f"data.mean and data.std need one value per input channel: model.in_chans is "
                             f"{self.model.in_chans}, data.mean has {len(self.data.mean)} values. Give "
                             f"{self.model.in_chans} of each (grey images: in_chans 1, e.g. mean [0.5], std [0.5])")
        return self

    @model_validator(mode="after")
    def _one_activation_checkpointing(self):
        if self.model.grad_checkpointing and self.distributed.fsdp_activation_checkpointing:
            raise ValueError("model.grad_checkpointing and distributed.fsdp_activation_checkpointing both recompute "
                             "the blocks' activations in the backward pass, and would checkpoint twice: keep one "
                             "(under FSDP, fsdp_activation_checkpointing wraps the blocks it shards)")
        return self

    @property
    def name(self) -> str:
        return self._name

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A hash of the resolved recipe (checkpoints use it to recognise their recipe)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


MISSING = object()


def schema_default(dotted: str) -> Any:
    """The default of a recipe key such as 'train.tf32' in JSON form, or MISSING (required,
    unknown, or inside a free-form mapping). A recipe saved by an older launcher lacks the keys
    added since; they count as set to this (or to what those runs did: BEFORE_THE_KEY)."""
    if dotted in BEFORE_THE_KEY:
        return BEFORE_THE_KEY[dotted]
    from pydantic_core import to_jsonable_python

    model: type[BaseModel] = Recipe
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return MISSING
        if i == len(parts) - 1:
            return MISSING if field.is_required() else to_jsonable_python(field.get_default(call_default_factory=True))
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return MISSING
        model = field.annotation
    return MISSING


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested recipe dict as dotted keys ({"data": {"batch_size": 8}} -> {"data.batch_size": 8});
    an empty dict stays a value (a plugin on with all its defaults)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def why_unbatched(data) -> str:
    """Why the first unbatched op has no batched form, for the messages."""
    value = data.augment.auto_augment
    if value and value not in TORCHVISION_AUGMENT:
        return f" ('{value}' is a timm string)"
    if data.augment.random_resized_crop and data.interpolation != "bilinear":
        return f" with data.interpolation={data.interpolation} (bilinear only)"
    return ""


# Keys whose default is not what runs saved before the key existed ran with (schema_default).
BEFORE_THE_KEY = {"data.augment_on": "loader"}
