"""python -m launcher.evaluate: a run's weights scored as the training loop scores them."""

from __future__ import annotations

import json

import pytest

from launcher.evaluate import main
from launcher.loop import train
from launcher.recipe import validate_recipe
from tests.conftest import small_recipe


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    train(validate_recipe(small_recipe(digits, run, train={"epochs": 1, "max_steps": 20},
                                       plugins={"ema": {"decay": 0.9}})))
    return run


def last_eval_row(run) -> dict:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/loss" in r][-1]


def test_the_final_weights_give_the_numbers_the_loop_logged(finished, capsys):
    row = last_eval_row(finished)
    for weights, prefix in (("model", "val"), ("ema", "val_ema")):
        assert main([str(finished), "--weights", weights]) == 0
        printed = json.loads(capsys.readouterr().out)
        for key in ("loss", "top1", "top5", "samples"):
            assert printed[f"{prefix}/{key}"] == row[f"{prefix}/{key}"], (weights, key)  # exactly
        assert json.loads((finished / f"evaluate-{weights}.json").read_text()) == printed


def test_any_shard_set_and_clear_errors(finished, digits, capsys):
    assert main([str(finished), f"data.val={digits['train']}"]) == 0
    assert json.loads(capsys.readouterr().out)["val/samples"] == 1437
    assert main([str(finished.parent / "nothing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main([str(finished), "--weights", str(finished / "missing.safetensors")]) == 2
    assert "no weights at" in capsys.readouterr().err


def test_predict_classifies_shards_and_image_files_alike(finished, digits, tmp_path):
    import csv

    import numpy as np
    import torch
    from PIL import Image

    from launcher.data import decode_image, index_shards
    from launcher.evaluate import load_run_model
    from launcher.predict import main as predict
    from launcher.report import predict as report_probabilities

    assert predict([str(finished), digits["val"], "--out", str(tmp_path / "shards.csv"), "--top-k", "3"]) == 0
    with open(tmp_path / "shards.csv") as f:
        rows = list(csv.DictReader(f))
    recipe, model, device, _ = load_run_model(finished, "model")
    probs, labels = report_probabilities(recipe, model, device)  # the report's own pass over data.val
    assert len(rows) == 360 and [int(r["label"]) for r in rows] == labels.tolist()
    assert [int(r["class1"]) for r in rows] == probs.argmax(1).tolist()
    assert [float(r["probability1"]) for r in rows] == pytest.approx(probs.max(1).tolist(), abs=1e-6)
    assert all(float(r["probability1"]) >= float(r["probability2"]) >= float(r["probability3"]) for r in rows)
    # The first 5 validation images as PNG files (lossless): the same classes.
    index, folder = index_shards(digits["val"], "v"), tmp_path / "pngs"
    folder.mkdir()
    for i in range(5):
        pixels = decode_image(*index.read_image(i, {}))[0].numpy().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    assert predict([str(finished), str(folder), "--out", str(tmp_path / "files.csv")]) == 0
    with open(tmp_path / "files.csv") as f:
        files = list(csv.DictReader(f))
    assert [r["input"] for r in files] == [str(folder / f"img{i}.png") for i in range(5)]
    assert [r["class"] for r in files] == [r["class1"] for r in rows[:5]]
    assert torch.tensor([float(r["probability"]) for r in files]).allclose(
        torch.tensor([float(r["probability1"]) for r in rows[:5]]), atol=1e-5)


def test_export_gives_a_timm_folder_and_torchscript_that_compute_the_same(finished, tmp_path):
    import timm
    import torch

    from launcher.evaluate import load_run_model
    from launcher.export import main as export

    recipe, model, _, _ = load_run_model(finished, "model")
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
    assert export([str(finished), "--out", str(tmp_path / "timm")]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "wrn10_1" and config["num_classes"] == 10 and len(config["label_names"]) == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    loaded = timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                               pretrained_cfg_overlay=dict(config["pretrained_cfg"],
                                                           file=str(tmp_path / "timm" / "model.safetensors")),
                               **config["model_args"]).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)
    assert export([str(finished), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.torchscript.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(images), expected, atol=1e-6)


def test_onnx_export_computes_the_same_logits_in_onnxruntime(finished, tmp_path, capsys):
    """--format onnx: checked by the command itself (onnxruntime vs PyTorch, atol 1e-4), and here
    again on another batch size (the batch dimension is dynamic)."""
    import numpy as np
    import onnxruntime
    import torch

    from launcher.evaluate import load_run_model
    from launcher.export import main as export

    assert export([str(finished), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert "onnxruntime vs PyTorch: largest difference" in capsys.readouterr().out
    _, model, _, _ = load_run_model(finished, "model")
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    assert got.shape == (5, 10) and np.abs(got - expected).max() <= 1e-4


def test_export_of_a_timm_model_loads_through_timms_own_pretrained_path(digits, tmp_path):
    import timm
    import torch
    import yaml
    from safetensors.torch import save_model

    from launcher.export import main as export

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    raw = small_recipe(digits, run, model={"name": "resnet10t", "num_classes": 10})
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    save_model(model, str(run / "final" / "model.safetensors"))
    assert export([str(run)]) == 0
    folder = run / "export" / "timm"
    config = json.loads((folder / "config.json").read_text())
    loaded = timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                               pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=str(folder / "model.safetensors")),
                               **config["model_args"]).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_tta_numbers_equal_the_loops_and_tta_can_be_added_afterwards(finished, digits, tmp_path, capsys):
    """A run trained with plugins.tta gets its val_tta/* back exactly; --tta adds flip TTA to a run
    trained without it, leaving val/* as logged."""
    run = tmp_path / "tta"
    train(validate_recipe(small_recipe(digits, run, train={"epochs": 1, "max_steps": 10}, plugins={"tta": {}})))
    row = last_eval_row(run)
    capsys.readouterr()  # the training's own lines
    assert main([str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert all(printed[k] == row[k] for k in row if k.startswith("val_tta/") or k.startswith("val/"))

    assert main([str(finished), "--tta"]) == 0
    added = json.loads(capsys.readouterr().out)
    logged = last_eval_row(finished)
    assert all(added[f"val/{k}"] == logged[f"val/{k}"] for k in ("loss", "top1", "top5"))
    assert added["val_tta/samples"] == 360 and added["val_tta/loss"] != added["val/loss"]
    assert "val_tta/loss" not in logged
