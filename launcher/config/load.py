"""Loading a recipe: read the YAML, apply the command line's overrides (`key=value`, nested keys
with dots, the value parsed as YAML: `train.epochs=3`, `plugins.ema={decay: 0.999}`; `~key`
removes a key), validate against the
schema (launcher/config/recipe.py), then resolve what depends on the disk and on other parts of
the recipe, a step after the schema:

- model.num_classes from the shards' info.json when the recipe leaves it out;
- data settings from a pretrained model's timm config (mean, std, size, interpolation, crop);
- data.augment_on: auto -> the path the run directory's run started on, else by its ops;
- every plugin's options and combinations (launcher/registry.py);
- settings that would do nothing, refused; the DeepSpeed strategy's config, built once to refuse
  a JSON file the recipe contradicts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from launcher.config.recipe import BEFORE_THE_KEY, Recipe, why_unbatched
from launcher.config.schema import explain_validation
from launcher.config.yamlfile import load_yaml, read_mapping_file
from launcher.errors import LauncherError
from launcher.registry import validate_plugins
from launcher.runlog import shard_info


# ---------------------------------------------------------------- overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` and `~key.sub` to a copy of the raw recipe mapping."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if item.startswith("~"):
            path = item[1:].split(".")
            parent = _walk(out, path[:-1], item, create=False)
            if parent is None or path[-1] not in parent:
                raise LauncherError(f"Override '{item}': there is no key '{item[1:]}' in the recipe to remove.")
            del parent[path[-1]]
            continue
        if "=" not in item:
            raise LauncherError(
                f"Override '{item}' is not of the form key=value (or ~key to remove a key), "
                "e.g. train.epochs=3."
            )
        key, _, text = item.partition("=")
        path = key.strip().split(".")
        if not all(path):
            raise LauncherError(f"Override '{item}': the key '{key}' has an empty part.")
        value = load_yaml(text, f"Override '{item}': the value") if text.strip() else None
        parent = _walk(out, path[:-1], item, create=True)
        parent[path[-1]] = value
    return out


def _walk(tree: dict, path: list[str], item: str, create: bool) -> Optional[dict]:
    node = tree
    for i, part in enumerate(path):
        if part not in node or node[part] is None:
            if not create:
                return None
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            prefix = ".".join(path[: i + 1])
            raise LauncherError(f"Override '{item}': '{prefix}' is a value, not a section, so it has no sub-keys.")
    return node


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe, including each plugin's options."""
    path = Path(path)
    raw = read_mapping_file(path, "Recipe", "recipes/digits.yaml (a finished run's recipe is RUN_DIR/recipe.yaml)",
                            "sections (model:, data:, train:, ...)")
    return validate_recipe(apply_overrides(raw, list(overrides)), name=path.stem, source=str(path))


def load_run_recipe(run_dir: str | Path, overrides: list[str] = (), allow_pipe: bool = False,
                    shards_read: tuple[str, ...] = ()) -> Recipe:
    """The recipe.yaml of a run directory, for the commands that work on a finished run (evaluate,
    predict, export, report). A run directory may come from someone else, so the `pipe:` shell
    commands written in it (data.train / data.val, those of `shards_read` that the command will
    read) are refused unless the user confirms them (allow_pipe, the commands' --allow-pipe) or
    gives that key on the command line."""
    from launcher.runlog import recipe_file

    path = recipe_file(Path(run_dir))
    if not path.is_file():
        raise LauncherError(f"'{run_dir}' is not a run directory (no recipe.yaml).")
    recipe = load_recipe(path, list(overrides))
    given = {item.partition("=")[0].strip() for item in overrides}
    for key in shards_read:
        pattern = getattr(recipe.data, key)
        if allow_pipe or not pattern or f"data.{key}" in given:
            continue
        from launcher.data import expand_pattern

        commands = [u[len("pipe:"):] for u in expand_pattern(pattern) if u.startswith("pipe:")]
        if commands:
            raise LauncherError(
                f"{path} sets data.{key} to shell commands (pipe: shards), e.g. `{commands[0]}`. Commands written in "
                "a run directory are not run unless you ask, since the directory may come from someone else: add "
                f"--allow-pipe if you trust them, or give the shards on the command line (data.{key}=PATTERN).")
    return recipe


def _num_classes_from_the_shards(raw: dict[str, Any]) -> dict[str, Any]:
    """model.num_classes, when the recipe leaves it out, from the training shards' info.json."""
    model, data = raw.get("model"), raw.get("data")
    if not isinstance(model, dict) or "num_classes" in model or not isinstance(data, dict):
        return raw
    num_classes = shard_info(data.get("train")).get("num_classes")
    if not isinstance(num_classes, int):
        return raw
    return {**raw, "model": {**model, "num_classes": num_classes}}


def validate_recipe(raw: dict[str, Any], name: str = "recipe", source: str = "recipe") -> Recipe:
    bad = _non_finite(raw)
    if bad:
        raise LauncherError(f"Recipe {source} is invalid: {', '.join(repr(k) for k in bad)} "
                            f"{'is' if len(bad) == 1 else 'are'} not a finite number (.inf/.nan). Give a finite value.")
    raw = _num_classes_from_the_shards(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise LauncherError(explain_validation(err, Recipe, f"Recipe {source}")) from None
    recipe._name = name
    if recipe.model.pretrained or recipe.model.name.startswith(("hf-hub:", "hf_hub:")):
        _data_settings_from_pretrained_cfg(recipe)
    if recipe.train.compile is not None and recipe.distributed.strategy != "ddp":
        what = "DeepSpeed's engine is" if recipe.distributed.strategy == "deepspeed" else "FSDP models are"
        raise LauncherError(f"Recipe {source}: train.compile runs with distributed.strategy=ddp only; {what} "
                            "not compiled by this launcher yet. Drop train.compile, or train with ddp.")
    _resolve_augment_on(recipe)
    validate_plugins(recipe)  # plugin options are typed too, and combinations are checked
    _no_op_settings_refused(recipe, source)
    if recipe.distributed.strategy == "deepspeed":
        # The DeepSpeed strategy builds its config now: a JSON file the recipe contradicts (stage,
        # accumulation, clipping, precision, batch) is refused when the recipe loads, not at the run.
        from launcher.registry import recipe_precision
        from launcher.strategies.deepspeed import deepspeed_config

        precision = recipe_precision(recipe)
        deepspeed_config(recipe, "no" if precision == "fp32" else precision)
    return recipe


def resolve_lr(recipe: Recipe, world_size: int) -> Optional[str]:
    """optimizer.lr_base -> optimizer.lr for this many processes (timm's rule: lr_base x global
    batch / lr_base_size, or its square root), recorded with the global batch it was derived for.
    The global batch is data.batch_size x processes: grad_accum splits that batch into micro-batches
    and does not enlarge it (timm's batch size is the micro-batch, hence its x grad_accum_steps).
    Returns how lr was reached, for the log and --check; None without lr_base."""
    from launcher.config.recipe import OptimizerSection, lr_from_base

    optimizer = recipe.optimizer
    if optimizer.lr_base is None:
        return None
    global_batch = recipe.data.batch_size * world_size
    lr, scale = lr_from_base(optimizer, global_batch)
    recipe.optimizer = OptimizerSection.model_validate(
        {**optimizer.model_dump(), "lr": lr, "lr_base_global_batch": global_batch})
    ratio = f"{global_batch} / {optimizer.lr_base_size}"
    why = "" if optimizer.lr_base_scale else f", timm's default for {optimizer.name}"
    return (f"optimizer.lr {lr:.6g} = lr_base {optimizer.lr_base:g} x {f'sqrt({ratio})' if scale == 'sqrt' else ratio} "
            f"({scale}{why}); global batch {global_batch} = data.batch_size {recipe.data.batch_size} x {world_size} "
            f"process{'es' if world_size != 1 else ''}")


def _no_op_settings_refused(recipe: Recipe, source: str) -> None:
    """Settings that would be accepted and change nothing, which a user would take for working."""
    from launcher.registry import recipe_precision

    distributed = recipe.distributed
    # autocast, not the default: a resolved recipe (recipe.yaml, a job's recipe) names every key.
    if (distributed.strategy == "fsdp" and distributed.fsdp_mixed_precision == "autocast"
            and recipe_precision(recipe) == "fp32"):
        raise LauncherError(f"Recipe {source}: distributed.fsdp_mixed_precision={distributed.fsdp_mixed_precision} "
                            "chooses how FSDP runs bf16, and this recipe trains in fp32 (no plugin sets a mixed "
                            "precision, e.g. amp with dtype bf16), so it would do nothing. Add mixed precision, or "
                            "remove distributed.fsdp_mixed_precision.")


def _resolve_augment_on(recipe: Recipe) -> None:
    """data.augment_on: auto -> device when every op has a batched form, else loader. A run
    directory that already ran keeps its path (its recipe.yaml says which; one written before the
    key existed ran on the loader), so that an upgrade does not change a run's augmentation draws
    mid-run. The resolved recipe (recipe.yaml, checkpoints, --check) holds the path taken."""
    data = recipe.data
    from launcher.data.augment import BatchAugment

    if data.augment_on == "device":  # checked again: the model's pretrained_cfg may have set the interpolation
        missing = BatchAugment.unbatched_ops(data)
        if missing:
            raise LauncherError(f"data.augment_on=device: data.augment.{missing[0]} has no batched form{why_unbatched(data)}"
                                f". Set data.augment_on=loader, or drop data.augment.{missing[0]}")
    if data.augment_on != "auto":
        return

    missing = BatchAugment.unbatched_ops(data)
    photos = BatchAugment.loader_by_default(data)
    started = _augment_on_of_the_run(recipe.run_dir)
    if missing:
        data.augment_on, data._augment_reason = "loader", f"data.augment.{missing[0]} has no batched form{why_unbatched(data)}"
    elif photos:
        data.augment_on, data._augment_reason = "loader", (
            f"data.augment.{photos[0]} cuts photos of differing sizes per sample; data.augment_on=device batches it "
            "when the images are all one size")
    elif started is not None:
        data.augment_on, data._augment_reason = started, f"the run in {recipe.run_dir} started on the {started}"
    else:
        data.augment_on, data._augment_reason = "device", "every op of data.augment has a batched form"


def _augment_on_of_the_run(run_dir: Path) -> Optional[str]:
    """'loader' or 'device' for a run directory that holds a run (its recipe.yaml, else its newest
    checkpoint's recipe), else None."""
    from launcher.runlog import checkpoints_dir

    metas = sorted(checkpoints_dir(run_dir).glob("step-*/meta.json"), reverse=True)[:1]
    for source in [run_dir / "recipe.yaml", *metas]:
        try:
            saved = load_yaml(source.read_text(encoding="utf-8"), str(source))  # JSON is YAML too
            saved = saved["recipe"] if source.name == "meta.json" else saved
            value = saved["data"].get("augment_on", BEFORE_THE_KEY["data.augment_on"])
        except (OSError, LauncherError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            continue
        return value if value in ("loader", "device") else None
    return None


def _data_settings_from_pretrained_cfg(recipe: Recipe) -> None:
    """Pretrained weights were trained on inputs normalised and sized their way: the data keys the
    recipe leaves unset (mean, std, image_size, interpolation, crop_pct) come from timm's
    pretrained_cfg, and the resolved recipe (recipe.yaml, --check) shows them."""
    from launcher.models.factory import pretrained_data_settings

    for key, value in pretrained_data_settings(recipe.model).items():
        if key not in recipe.data.model_fields_set:
            setattr(recipe.data, key, value)


def _non_finite(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys holding inf or nan anywhere in the recipe, free-form kwargs included."""
    if isinstance(tree, float):
        return [] if math.isfinite(tree) else [prefix]
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _non_finite(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(tree, list):
        return [k for i, v in enumerate(tree) for k in _non_finite(v, f"{prefix}[{i}]")]
    return []
