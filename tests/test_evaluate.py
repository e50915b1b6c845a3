"""python -m launcher.evaluate: a run's weights scored as the training loop scores them."""

from __future__ import annotations

import json

import pytest

from launcher.commands.evaluate import main
from launcher.loop import train
from launcher.config.load import validate_recipe
from tests.conftest import read_only_folder, small_recipe


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
    from launcher.commands.evaluate import load_run_model
    from launcher.commands.predict import main as predict
    from launcher.commands.report import predict as report_probabilities

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

    from launcher.commands.evaluate import load_run_model
    from launcher.commands.export import main as export

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

    from launcher.commands.evaluate import load_run_model
    from launcher.commands.export import main as export

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

    from launcher.commands.export import main as export

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


# ---------------------------------------------------------------- hostile input (issue 29)


def _copy_run(finished, target):
    import shutil

    shutil.copytree(finished, target)
    return target


def _sha(path) -> str:
    from launcher.runlog import file_sha256

    return file_sha256(path)


def test_export_never_writes_into_the_runs_weights_nor_replaces_files_unasked(finished, tmp_path, capsys):
    """`export RUN --weights ema --out RUN/final` replaced final/model.safetensors with the EMA
    weights; --weights model there was a SameFileError traceback; torchscript wrote into final/."""
    from launcher.commands.export import main as export

    run = _copy_run(finished, tmp_path / "run")
    before = {p.relative_to(run): _sha(p) for p in run.rglob("*") if p.is_file()}
    for args in (["--weights", "ema", "--out", str(run / "final")], ["--weights", "model", "--out", str(run / "final")],
                 ["--format", "torchscript", "--out", str(run / "final")],
                 ["--out", str(run / "checkpoints" / "x"), "--force"], ["--out", str(run / "final"), "--force"]):
        assert export([str(run), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "an export never writes there" in err and "Traceback" not in err, args
    assert {p.relative_to(run): _sha(p) for p in run.rglob("*") if p.is_file()} == before
    # An existing file is replaced only with --force; --out an existing file is refused.
    out = tmp_path / "exported"
    assert export([str(run), "--out", str(out)]) == 0
    (out / "model.safetensors").write_bytes(b"mine")
    assert export([str(run), "--weights", "ema", "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == b"mine"
    assert export([str(run), "--weights", "ema", "--out", str(out), "--force"]) == 0
    assert _sha(out / "model.safetensors") == _sha(run / "final" / "ema.safetensors")
    (tmp_path / "a-file").write_text("keep")
    assert export([str(run), "--out", str(tmp_path / "a-file")]) == 2
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "keep"
    # --weights a file, --out the folder that holds it: never copied onto itself.
    assert export([str(run), "--weights", str(out / "model.safetensors"), "--out", str(out), "--force"]) == 2
    assert "holds the weights being exported" in capsys.readouterr().err


def test_commands_written_in_a_run_directory_are_not_run_unasked(finished, digits, tmp_path, capsys):
    """A run directory may come from someone else: evaluate and report re-read its recipe.yaml, and
    ran `pipe:` commands written there."""
    import yaml

    from launcher.commands.evaluate import main as evaluate
    from launcher.commands.report import main as report

    run = _copy_run(finished, tmp_path / "run")
    marker = tmp_path / "PWNED"
    val_shard = digits["val"].replace("{000000..000000}", "000000")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["val"] = f"pipe:touch {marker}; cat {val_shard}"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert evaluate([str(run)]) == 2
    err = capsys.readouterr().err
    assert f"`touch {marker}; cat {val_shard}`" in err and "--allow-pipe" in err and "data.val=PATTERN" in err
    assert report([str(run)]) == 2 and "--allow-pipe" in capsys.readouterr().err
    assert not marker.exists()
    # Asked for: by the flag, or by giving the command on the command line.
    assert evaluate([str(run), "--allow-pipe"]) == 0 and marker.exists()
    assert json.loads(capsys.readouterr().out)["val/top1"] == last_eval_row(finished)["val/top1"]
    marker.unlink()
    assert evaluate([str(run), f"data.val=pipe:touch {marker}; cat {val_shard}"]) == 0 and marker.exists()


def test_evaluate_predict_and_export_explain_bad_weights_recipes_and_outputs(finished, digits, tmp_path, capsys):
    import yaml

    from launcher.commands.evaluate import main as evaluate
    from launcher.commands.predict import main as predict

    (tmp_path / "not.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # a header length of 2**64 - 1
    (tmp_path / "html.safetensors").write_text("<html>not weights</html>")
    for bad in ("not.safetensors", "html.safetensors"):
        assert evaluate([str(finished), "--weights", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert f"--weights: '{tmp_path / bad}' is not a readable .safetensors file" in err, err
    # The recipe no longer matches the weights (model.kwargs changed after training).
    run = _copy_run(finished, tmp_path / "changed")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name"] = "wrn16_1"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert evaluate([str(run)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model: " in err and "wrn16_1" in err and "Traceback" not in err
    # predict's output and numbers.
    (tmp_path / "folder").mkdir()
    assert predict([str(finished), digits["val"], "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert predict([str(finished), digits["val"], "--out", str(tmp_path / "afile" / "p.csv")]) == 2
    assert "cannot be created" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        predict([str(finished), digits["val"], "--batch-size", "0"])
    assert stop.value.code == 2 and "0 must be at least 1" in capsys.readouterr().err
    with read_only_folder(tmp_path / "readonly") as readonly:
        assert predict([str(finished), digits["val"], "--out", str(readonly / "p.csv")]) == 2
        assert "not writable" in capsys.readouterr().err


def test_predict_on_odd_inputs(finished, digits, tmp_path, capsys):
    """An empty folder is an error, not a header-only CSV; x.tar.png is an image, not a shard
    pattern; a float .npy is refused (uint8 is the format); an unreadable image is skipped with a
    warning naming it (exit 1) while the others are classified."""
    import csv

    import numpy as np
    from PIL import Image

    from launcher.commands.predict import main as predict

    (tmp_path / "empty").mkdir()
    assert predict([str(finished), str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv")]) == 2
    assert "holds no image files" in capsys.readouterr().err and not (tmp_path / "e.csv").exists()
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(images / "x.tar.png")
    np.save(images / "floats.npy", np.random.rand(8, 8))
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    assert predict([str(finished), str(images / "x.tar.png"), "--out", str(tmp_path / "one.csv")]) == 0
    assert [r["input"] for r in csv.DictReader(open(tmp_path / "one.csv"))] == [str(images / "x.tar.png")]
    capsys.readouterr()
    assert predict([str(finished), str(images), "--out", str(tmp_path / "all.csv")]) == 1
    err = capsys.readouterr().err
    assert "2 file(s) could not be read as images and were skipped" in err
    assert "floats.npy (ValueError: a .npy image must be a uint8" in err and "broken.png" in err
    assert [r["input"] for r in csv.DictReader(open(tmp_path / "all.csv"))] == [str(images / "x.tar.png")]
    assert predict([str(finished), str(images / "broken.png"), "--out", str(tmp_path / "none.csv")]) == 2
    assert "no image could be read" in capsys.readouterr().err and not (tmp_path / "none.csv").exists()
