"""The wandb plugin: every metrics.jsonl row reaches wandb at its step, offline by default."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

from launcher.loop import train
from launcher.recipe import validate_recipe
from tests.conftest import small_recipe


def test_rows_are_logged_with_their_step_and_the_recipe_as_config(digits, tmp_path, monkeypatch):
    calls = {"init": None, "log": [], "finished": False}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # other libraries probe for wandb
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    recipe = validate_recipe(small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10},
                                          plugins={"wandb": {"project": "p"}}), name="small")
    train(recipe)
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "p"
    assert calls["init"]["name"] == "small" and calls["init"]["config"] == recipe.to_dict()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert calls["log"] == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows]
    assert calls["finished"]


def test_real_wandb_offline_run_writes_its_files_without_network(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = validate_recipe(small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 5},
                                          plugins={"wandb": {}}))
    train(recipe)
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
