"""model.pretrained: timm's pretrained weights from a local Hugging Face cache, with no internet.
The test writes a cache itself (models--timm--NAME/refs/main + snapshots/<commit>/...), as
`hf download` or timm would have left it, and every load runs in huggingface_hub's offline mode."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from launcher.errors import LauncherError
from launcher.models.factory import create_model
from launcher.config.recipe import ModelSection
from launcher.config.load import validate_recipe
from tests.conftest import REPO, run_cli, small_recipe

NAME = "resnet10t.c3_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding timm/resnet10t.c3_in1k (random weights, 1000 classes) as
    safetensors, and the same weights as a pytorch_model.bin in a second layout."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(1)
    model = timm.create_model(NAME, pretrained=False)
    repo = root / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    config = {"architecture": "resnet10t", "num_classes": 1000, "pretrained_cfg": model.pretrained_cfg}
    (snapshot / "config.json").write_text(json.dumps(config, default=str))
    bin_folder = root / "bin-snapshot"
    bin_folder.mkdir()
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    return {"root": root, "repo": repo, "state": model.state_dict(), "bin": bin_folder}


@pytest.fixture
def offline_cache(hub, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub["root"]))
    return hub


def body_matches(model, state) -> bool:
    ours = model.state_dict()
    return all(torch.equal(ours[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_pretrained_loads_from_the_cache_and_replaces_the_classifier(offline_cache):
    model = create_model(ModelSection(name=NAME, num_classes=7, pretrained=True))
    assert body_matches(model, offline_cache["state"])
    assert model.fc.weight.shape == (7, 512)
    # the same weights through the hf-hub: name (config.json from the cache too) and 1000 classes kept
    hub_model = create_model(ModelSection(name="hf-hub:timm/resnet10t.c3_in1k", num_classes=1000, pretrained=True))
    assert all(torch.equal(hub_model.state_dict()[k], v) for k, v in offline_cache["state"].items())


@pytest.mark.parametrize("where", ["repo", "snapshot", "file", "bin"])
def test_pretrained_file_takes_a_cache_folder_a_snapshot_or_a_file(hub, where):
    snapshot = hub["repo"] / "snapshots" / COMMIT
    path = {"repo": hub["repo"], "snapshot": snapshot, "file": snapshot / "model.safetensors",
            "bin": hub["bin"]}[where]
    model = create_model(ModelSection(name=NAME, num_classes=3, pretrained=True, pretrained_file=str(path)))
    assert body_matches(model, hub["state"])


def test_a_pickle_with_code_is_not_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LauncherError, match=r"model.pretrained_file: .*pytorch_model.bin' was refused by "
                                            r"torch.load\(weights_only=True\).*never unpickles code"):
        create_model(ModelSection(name=NAME, num_classes=3, pretrained=True, pretrained_file=str(tmp_path)))


def test_a_pretrained_file_is_loaded_without_pretrained_true_and_bad_files_are_named(digits, hub, tmp_path, capsys):
    """model.pretrained_file without model.pretrained=true was silently ignored (the run trained from
    scratch whatever the path). A file means "load it"; the resolved recipe says so; every bad file
    is one paragraph naming it and what is wrong (no SafetensorError, no Hugging Face cache advice)."""
    from launcher.__main__ import main as launcher_main

    good = hub["repo"] / "snapshots" / COMMIT / "model.safetensors"
    raw = small_recipe(digits, tmp_path / "run", model={"name": NAME, "num_classes": 10, "pretrained_file": str(good)})
    recipe = validate_recipe(raw)
    assert recipe.model.pretrained is True and recipe.to_dict()["model"]["pretrained"] is True
    assert body_matches(create_model(recipe.model), hub["state"])
    raw["model"]["pretrained"] = False
    with pytest.raises(LauncherError, match="model.pretrained is false but model.pretrained_file is set"):
        validate_recipe(raw)
    # The reproduction, through the command line's --check (what a run checks first).
    assert launcher_main(["--check", str(REPO / "recipes" / "digits.yaml"), "model.pretrained_file=/nonexistent.bin",
                          "train.max_steps=1"]) == 2
    assert "model.pretrained_file: '/nonexistent.bin' is not a weights file" in capsys.readouterr().err
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.bin").write_bytes(b"not a torch file at all")
    (tmp_path / "html.safetensors").write_bytes(b"<!DOCTYPE html><html>404</html>")
    other = timm.create_model("resnet18", num_classes=1000)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "resnet18.safetensors"))
    for name, message in (("truncated.safetensors", "is not a readable .safetensors file .*truncated"),
                          ("html.safetensors", "is not a readable .safetensors file"),
                          ("garbage.bin", "cannot be read as PyTorch weights"),
                          ("resnet18.safetensors", "does not fit 'resnet10t.c3_in1k'.*(missing|unexpected|size mismatch)")):
        with pytest.raises(LauncherError, match=f"model.pretrained_file: '.*{name}' {message}") as err:
            create_model(ModelSection(name=NAME, num_classes=3, pretrained_file=str(tmp_path / name)))
        assert "Hugging Face cache" not in str(err.value)


def test_missing_weights_say_where_the_launcher_looked_and_how_to_fetch(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(LauncherError) as err:
        create_model(ModelSection(name=NAME, num_classes=3, pretrained=True))
    message = str(err.value)
    assert str(tmp_path / "empty") in message and "timm/resnet10t.c3_in1k" in message
    assert "hf download timm/resnet10t.c3_in1k" in message and "model.pretrained_file" in message


def test_data_settings_come_from_the_pretrained_cfg_unless_the_recipe_sets_them(digits, tmp_path, offline_cache):
    raw = small_recipe(digits, tmp_path, model={"name": NAME, "num_classes": 10, "pretrained": True})
    raw["data"] = {k: v for k, v in raw["data"].items() if k != "image_size"}
    raw["data"]["std"] = [0.3, 0.3, 0.3]
    data = validate_recipe(raw).data
    assert data.mean == [0.485, 0.456, 0.406] and data.std == [0.3, 0.3, 0.3]  # std was set: kept
    assert (data.image_size, data.interpolation, data.crop_pct) == (176, "bicubic", 0.875)


def test_a_run_fine_tunes_timm_weights_offline_from_the_command_line(digits, tmp_path, hub):
    """python -m launcher ... model.pretrained=true with HF_HUB_CACHE pointing at the cache and
    HF_HUB_OFFLINE=1: the recipe the run saved shows the pretrained_cfg's normalisation."""
    import yaml

    raw = small_recipe(digits, tmp_path / "run", model={"name": NAME, "num_classes": 10, "pretrained": True},
                       train={"epochs": 1, "max_steps": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli([sys.executable, "-m", "launcher", str(tmp_path / "r.yaml")],
                     env={"HF_HUB_CACHE": str(hub["root"]), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["model"]["pretrained"] is True and saved["data"]["mean"] == [0.485, 0.456, 0.406]
