"""What every command on a finished run needs: its recipe and weights as a model ready to
evaluate, in the run's precision, the loop's evaluation of weights, and its class names. The commands share this module and never
import each other."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.errors import LauncherError
from launcher.runlog import shard_info


def recipe_autocast(recipe, device: torch.device):
    """The recipe's precision for a forward pass, as the loop's accelerator.autocast() gives it."""
    from launcher.registry import recipe_precision

    precision = recipe_precision(recipe)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                          enabled=precision in ("bf16", "fp16"))


# The weights a run writes to final/: its model's, and those of the averaging plugins (ema, swa).
NAMED_WEIGHTS = ("model", "ema", "swa")


def load_run_model(run_dir: Path, weights: str, overrides: list[str] = (), allow_pipe: bool = False,
                   shards_read: tuple[str, ...] = ()):
    """(recipe, model in eval mode on the device, weights path) of a run directory; weights is
    model, ema, swa or a .safetensors path. shards_read: the recipe's shard keys the caller will read
    (their pipe: commands need allow_pipe, see load_run_recipe)."""
    from launcher.models.factory import create_model
    from launcher.config.load import load_run_recipe
    from launcher.runlog import final_weights, recipe_file
    from launcher.models.weights import load_into

    if not recipe_file(run_dir).is_file():
        raise LauncherError(f"'{run_dir}' is not a run directory (no recipe.yaml).")
    named = weights in NAMED_WEIGHTS
    path = final_weights(run_dir, weights) if named else Path(weights)
    if not path.is_file():
        why = "" if not named else " (the run has not finished" + (
            f", or ran without plugins.{weights})" if weights != "model" else ")")
        raise LauncherError(f"no weights at '{path}'{why}.")
    recipe = load_run_recipe(run_dir, list(overrides), allow_pipe, shards_read)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The run's own weights are loaded next: no need for the pretrained ones it started from.
    model = create_model(recipe.model.model_copy(update={"pretrained": False, "pretrained_file": None}))
    load_into(model, path, "--weights" if not named else str(run_dir),
              f"The weights must come from a run of {recipe_file(run_dir)}'s model ({recipe.model.name}, "
              f"{recipe.model.num_classes} classes); the recipe or the weights were changed.")
    model = model.to(device)
    return recipe, model.eval(), device, path


def class_names(recipe) -> list[str]:
    """From the shards' info.json (written by python -m launcher.shards) where there is one."""
    num = recipe.model.num_classes
    classes = shard_info(recipe.data.val).get("classes")
    if isinstance(classes, list) and len(classes) == num:
        return [str(c) for c in classes]
    return [str(i) for i in range(num)]


@torch.no_grad()
def evaluate_weights(recipe, model: torch.nn.Module, device: torch.device, prefix: str = "val") -> dict:
    """{prefix}/loss, /top1, /top5, /samples over recipe.data.val, every sample once, and those of
    the outputs the recipe's eval_logits hooks add ({prefix}_tta/...)."""
    from launcher.data import EvalStream, batches, fetch_options, index_shards
    from launcher.loop import RunContext, eval_metrics, eval_sums
    from launcher.registry import build_plugins
    from launcher.data.transforms import ImageTransform

    data = recipe.data
    if not data.val:
        raise LauncherError("nothing to evaluate on: the recipe sets no data.val; give data.val=PATTERN.")
    index = index_shards(data.val, "data.val", data.cache_dir, recipe.model.num_classes, fetch_options(data))
    transform = ImageTransform(data, recipe.model.in_chans, train=False)
    stream = EvalStream(index, transform, data.eval_batch_size or 2 * data.batch_size, 0, 1)
    memory_format = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    autocast = recipe_autocast(recipe, device)
    plugins = build_plugins(recipe)
    ctx = RunContext(recipe=recipe, plugins=plugins)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for batch in batches(stream, data.num_workers):
        batch = batch.to(device, memory_format)
        with autocast:
            logits = model(batch.images)
            outputs = plugins.chain("eval_logits", ctx, {prefix: logits}, batch.images, model, prefix)
        for name, out in outputs.items():
            sums.setdefault(name, torch.zeros(4, dtype=torch.float64, device=device))
            sums[name] += eval_sums(out.float(), batch.targets)
    return eval_metrics(sums)
