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
