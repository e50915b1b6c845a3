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
