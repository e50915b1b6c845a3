"""Models: any timm model by name, plus CIFAR-style WideResNets registered into timm.

timm has no CIFAR WideResNet (its `wide_resnet*` are ImageNet ResNets with a 7x7 stem),
so WRN-depth-width (Zagoruyko & Komodakis 2016) is written here and registered into
timm's own registry under `wrn{depth}_{width}`: once `launcher` is imported,
`timm.create_model("wrn40_10", num_classes=100)` works like any timm model.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models import register_model

from launcher.errors import LauncherError, did_you_mean
from launcher.models.names import WRN_SIZES


def make_norm(kind: str, channels: int) -> nn.Module:
    """batchnorm (the paper's), or groupnorm (Wu & He 2018; 16 channels per group): no batch
    statistics, so results do not depend on how a batch is split over processes."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(max(1, channels // 16), channels)
    raise ValueError(f"norm_layer must be batchnorm or groupnorm, got {kind!r}")


@contextmanager
def running_stats_kept(module: nn.Module):
    """While a checkpointed block's forward is recomputed in the backward pass: BatchNorm's
    running statistics are not updated a second time (momentum 0 keeps them), so a checkpointed
    run ends with the same statistics as one without. timm's own checkpointing does not do this."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.momentum is not None]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3, plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float, norm: str = "batchnorm"):
        super().__init__()
        self.bn1 = make_norm(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut takes the pre-activated input, as in the paper's code.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs, with Kaiming (fan_out) initialisation."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0, norm_layer: str = "batchnorm"):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes
        self.num_features = widths[3]
        self.drop_rate = drop_rate
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        stages, in_planes = [], widths[0]
        for i, stride in enumerate((1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(in_planes, widths[i + 1], stride if j == 0 else 1, drop_rate, norm_layer))
                in_planes = widths[i + 1]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = make_norm(norm_layer, self.num_features)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)

    # The timm model interface (used by EMA, discriminative LRs, fine-tuning...).
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            # One checkpoint per block: only the blocks' inputs are kept for the backward pass.
            for block in (b for stage in self.stages for b in stage):
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False,
                                                      context_fn=lambda b=block: (nullcontext(), running_stats_kept(b)))
        else:
            x = self.stages(x)
        return F.relu(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _make_wrn(depth: int, width: int):
    def entrypoint(pretrained: bool = False, **kwargs) -> WideResNet:
        # No published weights; pretrained=True loads a local file given the timm way,
        # pretrained_cfg_overlay=dict(file=...) (what python -m launcher.export writes).
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        weights = overlay.get("file")
        if pretrained and not weights and overlay.get("state_dict") is None:
            raise LauncherError(f"wrn{depth}_{width} has no published weights: give a local file with "
                                "pretrained_cfg_overlay=dict(file=...), or load a checkpoint.")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        model = WideResNet(depth=depth, width=width, **kwargs)
        if pretrained and overlay.get("state_dict") is not None:
            model.load_state_dict(overlay["state_dict"])
        elif pretrained:
            from safetensors.torch import load_model

            load_model(model, str(weights))
        return model

    entrypoint.__name__ = f"wrn{depth}_{width}"
    entrypoint.__qualname__ = entrypoint.__name__
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"CIFAR WideResNet-{depth}-{width}."
    return entrypoint


for _depth, _width in WRN_SIZES:
    globals()[f"wrn{_depth}_{_width}"] = register_model(_make_wrn(_depth, _width))


def create_model(section) -> nn.Module:
    """Build the recipe's model with timm (the WRNs above are in timm's registry); with
    model.pretrained, timm's pretrained weights from this machine (see load_pretrained_weights)."""
    hub = section.name.startswith(("hf-hub:", "hf_hub:"))
    if not hub and not timm.is_model(section.name):
        raise LauncherError(
            f"Unknown model '{section.name}' (model.name).{did_you_mean(section.name, timm.list_models())} "
            "Any name from timm.list_models() works, plus the CIFAR WideResNets wrn{16,22,28,40}_{1,2,4,8,10}."
        )
    kwargs = dict(num_classes=section.num_classes, in_chans=section.in_chans, drop_rate=section.drop_rate,
                  **section.kwargs)
    try:
        if section.pretrained or hub:
            model = load_pretrained_weights(section, kwargs)
        else:
            model = timm.create_model(section.name, pretrained=False, **kwargs)
    except (TypeError, ValueError) as err:
        raise LauncherError(f"model.kwargs {section.kwargs} do not fit '{section.name}': {err}") from None
    if section.grad_checkpointing:
        enable_grad_checkpointing(model, section.name)
    if section.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """timm's set_grad_checkpointing; the models that lack it (or assert it away) are refused."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as err:
        raise LauncherError(f"model.grad_checkpointing: '{name}' does not support gradient checkpointing "
                            f"({err or type(err).__name__}). Remove model.grad_checkpointing, or choose a model "
                            "that has it (timm's ResNets, EfficientNets, ViTs, ConvNeXts, the WideResNets).") from None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


def pretrained_weights_file(path: str) -> str:
    """model.pretrained_file: a weights file, a Hugging Face snapshot folder, or a cache folder
    models--ORG--NAME (its refs/main snapshot, else its only one)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if p.is_dir() and (p / "snapshots").is_dir():
        ref = p / "refs" / "main"
        snapshots = sorted(d for d in (p / "snapshots").iterdir() if d.is_dir())
        if ref.is_file() and (p / "snapshots" / ref.read_text().strip()).is_dir():
            p = p / "snapshots" / ref.read_text().strip()
        elif len(snapshots) == 1:
            p = snapshots[0]
    if p.is_dir():
        p = next((p / name for name in WEIGHT_FILES if (p / name).is_file()), p)
    if not p.is_file():
        raise LauncherError(f"model.pretrained_file: '{path}' is not a weights file (.safetensors, .bin, .pth), a "
                            f"Hugging Face snapshot folder holding one of {', '.join(WEIGHT_FILES)}, or a "
                            "models--ORG--NAME cache folder.")
    return str(p)


def load_pretrained_weights(section, kwargs: dict) -> nn.Module:
    """timm.create_model(pretrained=True), offline: from model.pretrained_file, else from this
    machine's Hugging Face cache (HF_HUB_CACHE / HF_HOME), never downloaded (a cluster job has no
    internet, and a run should not depend on it). timm replaces the classifier when num_classes
    differs from the weights' and adapts the stem to in_chans; .bin/.pth files are read with
    torch.load(weights_only=True) by timm."""
    import huggingface_hub.constants as hub_constants

    if section.pretrained_file:
        # Read here, not by timm, so that a damaged file, a pickle or a file of another model is an
        # error naming the file (timm's state_dict source takes it as it is).
        from launcher.models.weights import listed, mismatches, read_state_dict

        file = pretrained_weights_file(section.pretrained_file)
        state = read_state_dict(file, "model.pretrained_file")
        fix = "Give weights of this architecture, or set model.name to the one they were trained as."
        try:
            model = timm.create_model(section.name, pretrained=True,
                                      pretrained_cfg_overlay={"file": file, "state_dict": dict(state)}, **kwargs)
        except (RuntimeError, KeyError) as err:
            raise LauncherError(f"model.pretrained_file: '{file}' does not fit '{section.name}' ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:300]}). {fix}") from None
        # timm loads non-strictly when it replaces the classifier: weights of another architecture
        # would be half-loaded with only a log line. Every tensor but the classifier must match.
        head = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
        head = (head,) if isinstance(head, str) else tuple(head)
        problems = mismatches(model.state_dict(), state, ignore=lambda name: name.startswith(head))
        if problems:
            raise LauncherError(f"model.pretrained_file: '{file}' does not fit '{section.name}': {listed(problems)}. "
                                f"{fix}")
        return model
    offline, hub_constants.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE, True  # what HF_HUB_OFFLINE=1 does
    try:
        return timm.create_model(section.name, pretrained=section.pretrained, **kwargs)
    except (OSError, RuntimeError) as err:  # huggingface_hub's LocalEntryNotFoundError is an OSError
        repo = _hub_repo(section.name)
        raise LauncherError(
            f"model.pretrained: no weights for '{section.name}' on this machine (looked in the Hugging Face cache "
            f"{hub_constants.HF_HUB_CACHE}{' for ' + repo if repo else ''}; {type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}). Fetch them where there is internet, e.g. `python -c \"import timm; "
            f"timm.create_model('{section.name}', pretrained=True)\"`{' or `hf download ' + repo + '`' if repo else ''}, "
            "and copy the models--... folder into this cache (or point HF_HUB_CACHE at it), or set "
            "model.pretrained_file to the weights file or folder.") from None
    finally:
        hub_constants.HF_HUB_OFFLINE = offline


def _hub_repo(name: str) -> str:
    """The Hugging Face repository timm loads `name`'s weights from ('' if none is known)."""
    if name.startswith(("hf-hub:", "hf_hub:")):
        return name.split(":", 1)[1].split("@")[0]
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  (no pretrained tag for this name)
        return ""
    return getattr(cfg, "hf_hub_id", "") or ""


def pretrained_data_settings(section) -> dict:
    """mean, std, image size, interpolation and crop_pct of the model's pretrained weights
    (timm's pretrained_cfg), for the data keys a recipe leaves unset."""
    import huggingface_hub.constants as hub_constants

    if not section.name.startswith(("hf-hub:", "hf_hub:")):  # timm's registry: no model is built
        try:
            found = timm.models.get_pretrained_cfg(section.name)
        except RuntimeError as err:  # an unknown tag
            raise LauncherError(f"model.name '{section.name}': {err} timm.list_pretrained('"
                                f"{section.name.split('.')[0]}*') lists the tags.") from None
        cfg = found.to_dict() if found is not None else {}
    else:  # the config.json of the hub repository, from the local cache
        from timm.models._hub import load_model_config_from_hf

        offline, hub_constants.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE, True
        try:
            cfg, _, _ = load_model_config_from_hf(_hub_repo(section.name))
        except (OSError, RuntimeError) as err:
            raise LauncherError(
                f"model.name '{section.name}': its config.json is not in the local Hugging Face cache "
                f"{hub_constants.HF_HUB_CACHE} ({type(err).__name__}). Fetch it where there is internet "
                f"(`hf download {_hub_repo(section.name)}`) and copy the models--... folder here.") from None
        finally:
            hub_constants.HF_HUB_OFFLINE = offline
    settings = {}
    if len(cfg.get("mean", ())) == section.in_chans:  # a 1-channel model keeps the recipe's own
        settings.update(mean=list(cfg["mean"]), std=list(cfg["std"]))
    if cfg.get("input_size"):
        settings["image_size"] = int(cfg["input_size"][-1])
    if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest"):
        settings["interpolation"] = cfg["interpolation"]
    if cfg.get("crop_pct"):
        settings["crop_pct"] = float(cfg["crop_pct"])
    return settings


def memory_format(section, device: torch.device, mixed_precision: str) -> torch.memory_format:
    """model.channels_last when the recipe sets it; by default NHWC on CUDA with amp (bf16/fp16
    convolutions run on tensor cores in NHWC, as timm's train.py --channels-last), NCHW otherwise
    (fp32 and CPU kernels are tuned for it)."""
    wanted = section.channels_last
    if wanted is None:
        wanted = device.type == "cuda" and mixed_precision in ("bf16", "fp16")
    return torch.channels_last if wanted else torch.contiguous_format


def compile_in_place(model: nn.Module, options) -> nn.Module:
    """torch.compile a module in place (nn.Module.compile): calls go through the compiled graph,
    while the module, its state_dict and its checkpoints stay the plain ones (torch.compile(model)
    would return a wrapper whose keys all start with `_orig_mod.`). A DDP-wrapped model is compiled
    around DDP, as timm's train.py does, so DDP's bucketed all-reduce still overlaps the backward."""
    model.compile(**options.kwargs())
    return model


def explain_compile_failure(options, err: BaseException) -> Optional[LauncherError]:
    """A graph break under train.compile.fullgraph, as one paragraph naming the option (torch's
    own message is a page of hints and internal stack)."""
    import sys

    dynamo_exc = getattr(sys.modules.get("torch._dynamo"), "exc", None)
    if options is None or not options.fullgraph or dynamo_exc is None or not isinstance(err, dynamo_exc.Unsupported):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    where = next((lines[i + 1] for i, line in enumerate(lines) if line == "from user code:" and i + 1 < len(lines)), "")
    return LauncherError(f"train.compile.fullgraph is true, and the model breaks the graph: {lines[0] if lines else err}"
                         f"{' (' + where + ')' if where else ''}. torch.compile cannot make one graph of it: set "
                         "train.compile.fullgraph=false (the parts that break then run eagerly), or change the model.")


def compiled_for_inference(model: nn.Module, options) -> nn.Module:
    """The model to call in evaluation: itself when it was compiled in place, else a compiled
    wrapper (used for forward calls only; weights are read from the module itself)."""
    if options is None or getattr(model, "_compiled_call_impl", None) is not None:
        return model
    return torch.compile(model, **options.kwargs())
