"""layer_lr: discriminative learning rates (Howard & Ruder 2018, ULMFiT) and gradual
unfreezing for fine-tuning.

Layers are taken in order from timm's own grouping (`model.group_matcher(coarse=True)`:
stem, each stage, then the head), or the model's top-level modules where it has none,
and cut into as many contiguous blocks as `lrs` has values: `lrs: [1e-3, 1e-2, 1e-1]`
trains the early third at 1e-3 and the late third (with the classifier) at 1e-1. Each
block is a parameter group with its own peak LR; the schedule (warmup, cosine,
one-cycle) scales every group alike. optimizer.lr is then not used.

`freeze_epochs: N` trains only the classifier (`model.get_classifier()`) for the first N
epochs: the other parameters get requires_grad=False, so no gradient is computed for them
(faster) and the optimizer skips them (no step, no weight decay, no momentum state), so
they stay bit-identical. BatchNorm running statistics keep adapting (fastai's default).
Under DDP, parameters without gradients need find_unused_parameters, which this plugin
turns on; the model is wrapped with every parameter trainable, so unfreezing needs nothing
more than setting requires_grad back.

Hooks: accelerator_options, param_groups, on_epoch_start. No state: freezing follows
from the epoch, so a resume lands in the right phase.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

nn = lazy("torch.nn")


def layer_blocks(model: nn.Module, blocks: int) -> list[list[str]]:
    """Parameter names in `blocks` contiguous blocks of layers, early to late."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        layers = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    else:
        layers = [[f"{child}.{n}" for n, _ in module.named_parameters()]
                  for child, module in model.named_children()]
        layers = [names for names in layers if names]
    if blocks > len(layers):
        raise ValueError(f"{blocks} learning rates but the model has only {len(layers)} layer groups")
    # Near-equal cuts; the late blocks get the extra layers (the head is small).
    cuts = [(b * len(layers)) // blocks for b in range(blocks + 1)]
    return [[name for layer in layers[cuts[b]:cuts[b + 1]] for name in layer] for b in range(blocks)]


@register("layer_lr")
class LayerLR(Plugin):
    """Discriminative learning rates per layer block, and a frozen backbone for the first epochs."""

    class Options(PluginOptions):
        lrs: Optional[list[float]] = Field(
            None, min_length=1, description="peak LR per layer block, early to late (replaces optimizer.lr)")
        freeze_epochs: int = Field(0, ge=0, description="train only the classifier for this many epochs")

    @classmethod
    def check_recipe(cls, recipe, options):
        if options.freeze_epochs and recipe.distributed.strategy in ("deepspeed", "fsdp"):
            owner = "DeepSpeed fixes" if recipe.distributed.strategy == "deepspeed" else "FSDP's sharding fixes"
            return (f"freeze_epochs switches requires_grad during the run, but {owner} the trained parameters "
                    "when the model is wrapped; use lrs only, or strategy ddp")
        if options.lrs is not None and any(lr <= 0 for lr in options.lrs):
            return f"lrs must be positive, got {options.lrs}"
        if options.freeze_epochs and options.freeze_epochs >= recipe.train.epochs:
            return (f"freeze_epochs={options.freeze_epochs} freezes the whole run (train.epochs="
                    f"{recipe.train.epochs}); use fewer.")
        return None

    notes_under = {"deepspeed": "lrs only (freeze_epochs is refused: the engine fixes the trained parameters)",
                   "fsdp": "lrs only (freeze_epochs is refused: the sharding fixes the trained parameters)"}

    def __init__(self, options):
        super().__init__(options)
        self.frozen: list[nn.Parameter] = []

    def accelerator_options(self, ctx, options: dict) -> dict:
        if self.options.freeze_epochs:
            from accelerate import DistributedDataParallelKwargs

            handlers = list(options.get("kwargs_handlers", []))
            options["kwargs_handlers"] = handlers + [DistributedDataParallelKwargs(find_unused_parameters=True)]
        return options

    def param_groups(self, ctx, groups: list[dict]) -> list[dict]:
        model = ctx.model
        if self.options.freeze_epochs:
            head = {id(p) for p in model.get_classifier().parameters()}
            self.frozen = [p for p in model.parameters() if id(p) not in head]
        if not self.options.lrs:
            return groups
        try:
            blocks = layer_blocks(model, len(self.options.lrs))
        except ValueError as err:
            from launcher.errors import LauncherError

            raise LauncherError(f"plugins.layer_lr.lrs: {err} ({ctx.recipe.model.name}).") from None
        params = dict(model.named_parameters())
        block_of = {id(params[name]): b for b, names in enumerate(blocks) for name in names}
        split = []
        for b, lr in enumerate(self.options.lrs):
            for group in groups:  # keep each group's own settings (weight decay) within the block
                members = [p for p in group["params"] if block_of[id(p)] == b]
                if members:
                    split.append({**group, "params": members, "lr": lr, "layer_block": b})
        return split

    def on_epoch_start(self, ctx) -> None:
        trainable = ctx.epoch >= self.options.freeze_epochs
        for p in self.frozen:
            p.requires_grad_(trainable)
