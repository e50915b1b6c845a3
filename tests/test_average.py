"""python -m launcher.average: the uniform average is the mean of the chosen weights (--last, --best
as logged), BatchNorm statistics are torch's update_bn of the average; a greedy soup is never
worse on data.val than its best ingredient and leaves out one that would make it worse; runs of
another model are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launcher.commands.average import main as average
from launcher.commands.evaluate import main as evaluate
from launcher.config.load import validate_recipe
from launcher.loop import train
from tests.conftest import small_recipe


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """Three short runs of one model (two seeds, and one at a far too high LR), checkpointing."""
    tmp = tmp_path_factory.mktemp("average")
    for name, seed, lr in (("a", 0, 0.05), ("b", 1, 0.05), ("bad", 2, 3.0)):
        raw = small_recipe(digits, tmp / name, seed=seed, train={"epochs": 1, "max_steps": 30},
                           optimizer={"name": "momentum", "lr": lr, "weight_decay": 5e-4},
                           plugins={"checkpoint": {"every_steps": 10, "keep_last": 5}})
        train(validate_recipe(raw))
    return tmp


def output(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_the_last_k_are_averaged_and_batchnorm_is_recomputed(runs, tmp_path, capsys):
    a = runs / "a"
    assert average([str(a), "--last", "3", "--no-update-bn", "--out", str(tmp_path / "plain.safetensors")]) == 0
    record = output(capsys)
    assert record["ingredients"] == [f"{a}@30", f"{a}@20", f"{a}@10"] and record["batchnorm"] == "averaged"
    files = [a / "final" / "model.safetensors", a / "checkpoints" / "step-00000020" / "model.safetensors",
             a / "checkpoints" / "step-00000010" / "model.safetensors"]
    states = [load_file(f) for f in files]
    averaged = load_file(tmp_path / "plain.safetensors")
    for key, value in averaged.items():
        if value.is_floating_point():
            expected = (sum(s[key].double() for s in states) / 3).float()
            assert torch.allclose(value, expected, rtol=0, atol=1e-7), key
        else:
            assert torch.equal(value, states[0][key]), key

    assert average([str(a), "--last", "3", "--out", str(tmp_path / "bn.safetensors")]) == 0
    record = output(capsys)
    recomputed = load_file(tmp_path / "bn.safetensors")
    assert record["batchnorm"] == "recomputed over data.train"
    weights = {k: v for k, v in recomputed.items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(weights[k], averaged[k]) for k in weights)  # the weights are the same average
    assert not torch.equal(recomputed["norm.running_var"], averaged["norm.running_var"])
    # What it reports is what `evaluate --weights` computes from the file.
    assert evaluate([str(a), "--weights", str(tmp_path / "bn.safetensors")]) == 0
    assert output(capsys)["val/top1"] == record["val/top1"]


def test_best_k_follow_the_logged_metric(runs, tmp_path, capsys):
    logged = {name: [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()
                     if "val/loss" in line][-1]["val/loss"] for name in ("a", "b", "bad")}
    assert average([str(runs / n) for n in ("a", "b", "bad")] + ["--best", "2", "--metric", "val/loss",
                                                                    "--out", str(tmp_path / "best.safetensors")]) == 0
    best_two = sorted(logged, key=logged.get)[:2]
    assert output(capsys)["ingredients"] == [f"{runs / n}@30" for n in best_two]


def test_a_greedy_soup_is_never_worse_than_its_best_ingredient(runs, tmp_path, capsys):
    assert average([str(runs / n) for n in ("bad", "a", "b")] + ["--greedy", "--out", str(tmp_path / "soup.safetensors")]) == 0
    record = output(capsys)
    greedy = record["greedy"]
    best = greedy["alone"]  # the best ingredient alone starts the soup
    assert record["ingredients"][0] == greedy["first"]
    for step in greedy["steps"]:
        assert step["alone"] <= best  # ranked by their own score
        assert step["added"] == (step["soup with it"] >= best)  # added only if the soup does not get worse
        best = step["soup with it"] if step["added"] else best
    assert record["val/top1"] == best >= greedy["alone"]
    assert f"{runs / 'bad'}@30" not in record["ingredients"]  # it would have made the soup worse
    assert [s["ingredient"] for s in greedy["steps"] if s["added"]] == record["ingredients"][1:]


def test_runs_of_another_model_are_refused_by_name(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs / "a", other)
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["model"]["name"] = "wrn10_2"
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert average([str(runs / "a"), str(other)]) == 2
    err = capsys.readouterr().err
    assert "train different models (model.name 'wrn10_1' vs 'wrn10_2')" in err and "cannot be averaged" in err
