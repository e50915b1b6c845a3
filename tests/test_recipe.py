"""Recipes: schema validation, overrides, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.errors import LauncherError
from launcher.config.load import apply_overrides, load_recipe, validate_recipe
from tests.conftest import REPO, small_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_opens_with_its_launch_command(path: Path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "-m launcher" in first_line and path.name in first_line
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.run_dir == Path("runs") / path.stem


def test_overrides_set_nested_keys_parse_yaml_values_and_remove_keys():
    raw = {"train": {"epochs": 10}, "plugins": {"a": {"x": 1}, "b": None}}
    out = apply_overrides(raw, ["train.epochs=3", "train.max_steps=7", "data.augment.hflip=0.5",
                                "plugins.a.y=[1, 2]", "~plugins.b", "run.dir=somewhere"])
    assert out == {"train": {"epochs": 3, "max_steps": 7}, "plugins": {"a": {"x": 1, "y": [1, 2]}},
                   "data": {"augment": {"hflip": 0.5}}, "run": {"dir": "somewhere"}}
    assert raw["train"]["epochs"] == 10  # the input is not modified


@pytest.mark.parametrize("override, message", [
    ("~train.nope", "no key 'train.nope'"),
    ("train.epochs", "not of the form key=value"),
    ("train.epochs.x=1", "'train.epochs' is a value"),
])
def test_malformed_overrides_are_explained(override, message):
    with pytest.raises(LauncherError, match=message):
        apply_overrides({"train": {"epochs": 1}}, [override])


def test_misspelled_key_names_the_key_and_the_nearest_valid_one(digits, tmp_path):
    raw = small_recipe(digits, tmp_path)
    raw["data"]["batchsize"] = raw["data"].pop("batch_size")
    with pytest.raises(LauncherError) as err:
        validate_recipe(raw)
    text = str(err.value)
    assert "unknown key 'data.batchsize'" in text and "Did you mean 'batch_size'?" in text
    assert "missing required key 'data.batch_size'" in text


def test_misspelled_top_level_section(digits, tmp_path):
    raw = small_recipe(digits, tmp_path)
    raw["trian"] = raw.pop("train")
    with pytest.raises(LauncherError, match="unknown key 'trian'. Did you mean 'train'"):
        validate_recipe(raw)


def test_wrong_type_names_the_key_and_the_value(digits, tmp_path):
    raw = small_recipe(digits, tmp_path)
    raw["train"]["epochs"] = "ten"
    with pytest.raises(LauncherError, match=r"'train.epochs' = 'ten': should be a number, not text"):
        validate_recipe(raw)


def test_out_of_range_value_is_refused(digits, tmp_path):
    raw = small_recipe(digits, tmp_path, data={"augment": {"hflip": 2}})
    with pytest.raises(LauncherError, match="data.augment.hflip"):
        validate_recipe(raw)


def test_unknown_plugin_suggests_the_nearest_registered_one(digits, tmp_path):
    raw = small_recipe(digits, tmp_path, plugins={"wandbb": {}})
    with pytest.raises(LauncherError, match="Unknown plugin 'wandbb'.*Did you mean 'wandb'"):
        validate_recipe(raw)


def test_plugin_options_are_typed(digits, tmp_path):
    raw = small_recipe(digits, tmp_path, plugins={"wandb": {"projekt": "x"}})
    with pytest.raises(LauncherError, match="unknown option 'projekt'. Did you mean 'project'"):
        validate_recipe(raw)
    raw = small_recipe(digits, tmp_path, plugins={"wandb": {"mode": "sometimes"}})
    with pytest.raises(LauncherError, match="'mode' = 'sometimes'"):
        validate_recipe(raw)


def test_missing_recipe_file_suggests_a_shipped_one():
    with pytest.raises(LauncherError, match="does not exist.*Did you mean 'digits.yaml'"):
        load_recipe(REPO / "recipes" / "digit.yaml")


def test_recipe_digest_changes_with_content(digits, tmp_path):
    a = validate_recipe(small_recipe(digits, tmp_path))
    b = validate_recipe(small_recipe(digits, tmp_path, train={"epochs": 2}))
    assert a.digest() != b.digest() and a.digest() == validate_recipe(small_recipe(digits, tmp_path)).digest()


def test_resolved_recipe_round_trips_through_yaml(digits, tmp_path):
    recipe = validate_recipe(small_recipe(digits, tmp_path))
    again = validate_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.to_dict() == recipe.to_dict()


def test_num_classes_comes_from_the_shard_writers_info_when_left_out(digits, tmp_path):
    import json

    from launcher.loop import train
    from tests.conftest import small_recipe

    raw = small_recipe(digits, tmp_path / "run", train={"max_steps": 2})
    del raw["model"]["num_classes"]
    recipe = validate_recipe(raw)
    assert recipe.model.num_classes == 10 == digits["num_classes"]
    train(recipe)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["classes"] == digits["classes"]
    # Without info.json next to the shards (other tools' shards), the recipe must say it.
    raw["data"]["train"] = str(tmp_path / "elsewhere-{0..1}.tar")
    with pytest.raises(LauncherError, match="num_classes"):
        validate_recipe(raw)


def _number_fields(model, prefix: str = ""):
    """Dotted names of every field of a schema that takes a number (int/float, optional, tuples and
    lists of them), sub-sections walked."""
    from launcher.config.schema import _accepts, _element_annotation, _model_in

    for name, field in model.model_fields.items():
        section = _model_in(field.annotation)
        if section is not None:
            yield from _number_fields(section, f"{prefix}{name}.")
            continue
        element = _element_annotation(field.annotation)
        annotation = element or field.annotation
        if "number" in _accepts(annotation) and "other" not in _accepts(annotation):
            yield f"{prefix}{name}", "str" in _accepts(annotation), element is not None


def test_every_number_in_the_schema_refuses_true_and_numeric_text(digits, tmp_path):
    """Pydantic's lax mode read `hflip: true` as a flip probability of 1.0 (every training image
    mirrored). Every number of every section and of every plugin's options refuses a boolean, and
    a quoted number where text is not also allowed."""
    from launcher.config.recipe import Recipe
    from launcher.registry import discover

    cases = list(_number_fields(Recipe))
    for name, cls in discover().items():
        cases += [(f"plugins.{name}.{key}", *kinds) for key, *kinds in _number_fields(cls.Options)]
    assert {"data.augment.hflip", "data.augment.random_erasing", "optimizer.lr", "seed", "train.epochs",
            "plugins.mixup.prob", "plugins.label_smoothing.smoothing", "data.augment.scale"} <= {c[0] for c in cases}
    assert len(cases) > 60
    for key, takes_text, is_list in cases:
        for value, refused in ((True, True), ("1", not takes_text)):
            raw = small_recipe(digits, tmp_path)
            written = "true" if value is True else "'1'"
            apply = [f"{key}=[{written}, 1.0]" if is_list else f"{key}={written}"]
            if key.startswith("plugins."):
                plugin, option = key.split(".")[1:]
                raw["plugins"] = {plugin: {option: [value, 1.0] if is_list else value}}
                apply = []
            shown = "True" if value is True else "'1'"
            shown = f"[{shown}, 1.0]" if is_list else shown
            try:
                validate_recipe(apply_overrides(raw, apply))
                problem = None
            except LauncherError as err:
                problem = str(err)
            if refused:
                leaf = key.split(".")[-1] if key.startswith("plugins.") else key
                assert problem and f"'{leaf}' = {shown}" in problem and any(
                    words in problem for words in ("not a switch", "not true/false", "not text")), (key, value, problem)
            else:
                assert problem is None or f"'{key}' = {shown}" not in problem, (key, problem)


def test_a_boolean_probability_says_what_to_write():
    with pytest.raises(LauncherError, match=r"'data.augment.hflip' = True: a probability, not a switch: write a "
                                            r"number between 0 and 1 \(0.5 flips half the images\)"):
        load_recipe(REPO / "recipes" / "digits.yaml", ["data.augment.hflip=true"])
    with pytest.raises(LauncherError, match=r"'optimizer.lr' = '0.1': a number, not text: write it without quotes"):
        load_recipe(REPO / "recipes" / "digits.yaml", ["optimizer.lr='0.1'"])
    assert load_recipe(REPO / "recipes" / "digits.yaml", ["data.augment.hflip=0.5"]).data.augment.hflip == 0.5


def test_an_unknown_compile_backend_is_refused_at_load(digits, tmp_path):
    """It passed --check and the run died with torch's InvalidBackend at the first step."""
    with pytest.raises(LauncherError, match="'train.compile.backend' = 'nonsense': torch.compile has no backend"):
        validate_recipe(small_recipe(digits, tmp_path, train={"epochs": 1, "compile": {"backend": "nonsense"}}))
    with pytest.raises(LauncherError, match="Did you mean 'inductor'"):
        validate_recipe(small_recipe(digits, tmp_path, train={"epochs": 1, "compile": {"backend": "indutor"}}))
    assert validate_recipe(small_recipe(digits, tmp_path, train={"epochs": 1, "compile": {"backend": "aot_eager"}}))


def test_a_negative_cache_limit_is_refused_like_a_negative_size(digits, tmp_path):
    for value in (-5, "-1GB"):
        with pytest.raises(LauncherError, match=r"'data.cache_limit' = .*is not a size"):
            validate_recipe(small_recipe(digits, tmp_path, data={**small_recipe(digits, tmp_path)["data"],
                                                                 "cache_limit": value}))


def test_numbers_as_people_type_them_are_numbers_and_switches_stay_refused(digits, tmp_path):
    """PyYAML reads YAML 1.1, where `1e-3` is text; the launcher reads YAML 1.2's numbers, in recipe
    files and overrides alike, and still refuses `true` or quoted text where a number belongs."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(small_recipe(digits, tmp_path / "run")).replace("lr: 0.05", "lr: 1e-3"))
    assert "lr: 1e-3" in path.read_text()
    recipe = load_recipe(path, ["optimizer.weight_decay=5e-4", "schedule.warmup_lr=1E-6", "schedule.min_lr=2.5e0"])
    assert (recipe.optimizer.lr, recipe.optimizer.weight_decay, recipe.schedule.warmup_lr,
            recipe.schedule.min_lr) == (0.001, 0.0005, 1e-6, 2.5)
    with pytest.raises(LauncherError, match=r"'optimizer.lr' = '1e-3': a number, not text: write it without quotes"):
        load_recipe(path, ["optimizer.lr='1e-3'"])
    with pytest.raises(LauncherError, match="'data.augment.hflip' = True: a probability, not a switch"):
        load_recipe(path, ["data.augment.hflip=true"])
    assert apply_overrides({}, ["run.dir=1e3x", "x=1e3"]) == {"run": {"dir": "1e3x"}, "x": 1000.0}
