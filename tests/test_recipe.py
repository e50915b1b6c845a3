"""Recipes: schema validation, overrides, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.errors import LauncherError
from launcher.recipe import apply_overrides, load_recipe, validate_recipe
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
    with pytest.raises(LauncherError, match=r"'train.epochs' = 'ten': Input should be a valid integer"):
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
