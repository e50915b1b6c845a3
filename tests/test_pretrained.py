"""pretrained: every tensor loads by name and shape; a classifier for another number of
classes keeps its fresh initialisation; other mismatches are refused with the names;
fine-tuning starts from the loaded weights (lower first loss than from scratch)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.plugins.pretrained import load_pretrained, resolve_weights
from tests.conftest import small_recipe


@pytest.fixture(scope="module")
def source_run(digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained") / "source"
    train(validate_recipe(small_recipe(digits, run, train={"epochs": 2}, data={"val": None})))
    return run


def test_loads_every_tensor_and_resets_a_mismatched_head(source_run):
    weights = resolve_weights(str(source_run))  # a run directory names its final weights
    assert weights == source_run / "final" / "model.safetensors"
    saved = load_file(str(weights))
    same = timm.create_model("wrn10_1", num_classes=10)
    assert load_pretrained(same, weights, "auto") == []
    assert all(torch.equal(t, saved[n]) for n, t in same.state_dict().items())
    torch.manual_seed(3)
    other = timm.create_model("wrn10_1", num_classes=12)
    fresh_fc = other.fc.weight.detach().clone()
    assert load_pretrained(other, weights, "auto") == ["fc.bias", "fc.weight"]
    assert torch.equal(other.fc.weight, fresh_fc)
    assert all(torch.equal(t, saved[n]) for n, t in other.state_dict().items() if not n.startswith("fc."))
    assert load_pretrained(timm.create_model("wrn10_1", num_classes=10), weights, "reset") == ["fc.bias", "fc.weight"]


def test_another_architecture_is_refused_with_names(source_run):
    with pytest.raises(LauncherError, match=r"does not fit model: .*stages\.0\.0\.conv1\.weight' has shape"):
        load_pretrained(timm.create_model("wrn10_2", num_classes=10), source_run / "final" / "model.safetensors",
                        "auto")
    with pytest.raises(LauncherError, match="missing 'conv1.weight'"):
        load_pretrained(timm.create_model("resnet18", num_classes=10), source_run / "final" / "model.safetensors",
                        "auto")


def test_a_missing_file_is_refused_before_training(digits, tmp_path):
    with pytest.raises(LauncherError, match="is not a .safetensors file, a finished run"):
        validate_recipe(small_recipe(digits, tmp_path, plugins={"pretrained": {"weights": str(tmp_path / "nope")}}))


def test_fine_tuning_starts_from_the_loaded_weights(digits, source_run, tmp_path):
    def first_loss(run, plugins):
        raw = small_recipe(digits, run, run={"log_every": 1}, train={"epochs": 1, "max_steps": 1},
                           model={"name": "wrn10_1", "num_classes": 10}, data={"val": None}, plugins=plugins)
        train(validate_recipe(raw))
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train/loss"]

    scratch = first_loss(tmp_path / "scratch", {})
    tuned = first_loss(tmp_path / "tuned", {"pretrained": {"weights": str(source_run)},
                                            "layer_lr": {"lrs": [0.005, 0.05]}})
    assert scratch > 2.0 and tuned < 1.0, (scratch, tuned)


def test_pytorch_weight_files_load_with_weights_only_and_a_pickled_payload_is_refused(source_run, tmp_path):
    """pytorch_model.bin (a plain or wrapped state dict) loads like safetensors; a .bin that pickles
    code is refused without running it; a .safetensors that is not one is an error, not a traceback."""
    from tests.test_checkpoint import _Evil

    saved = load_file(str(source_run / "final" / "model.safetensors"))
    torch.save(saved, tmp_path / "pytorch_model.bin")
    torch.save({"state_dict": saved}, tmp_path / "wrapped.pth")
    for name in ("pytorch_model.bin", "wrapped.pth"):
        model = timm.create_model("wrn10_1", num_classes=10)
        assert load_pretrained(model, tmp_path / name, "auto") == []
        assert all(torch.equal(t, saved[n]) for n, t in model.state_dict().items())
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _Evil(marker)}, tmp_path / "evil.bin")
    with pytest.raises(LauncherError, match=r"refused by torch.load\(weights_only=True\)"):
        load_pretrained(timm.create_model("wrn10_1", num_classes=10), tmp_path / "evil.bin", "auto")
    assert not marker.exists()
    (tmp_path / "fake.safetensors").write_bytes((tmp_path / "pytorch_model.bin").read_bytes())
    with pytest.raises(LauncherError, match="is not a readable .safetensors file"):
        load_pretrained(timm.create_model("wrn10_1", num_classes=10), tmp_path / "fake.safetensors", "auto")
