"""The wandb plugin: every metrics.jsonl row reaches wandb at its step, offline by default."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

from launcher.loop import train
from launcher.config.load import validate_recipe
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
    assert calls["log"] == [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for r in rows]
    assert calls["finished"]


def test_real_wandb_offline_run_writes_its_files_without_network(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = validate_recipe(small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 5},
                                          plugins={"wandb": {}}))
    train(recipe)
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def fake_wandb_recording_inits(monkeypatch) -> list[dict]:
    """A stand-in wandb module whose runs accept everything; returns the list of wandb.init kwargs."""
    inits = []

    class FakeRun:
        def log(self, data, step):
            pass

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # other libraries probe for wandb
    fake.init = lambda **kwargs: inits.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return inits


def test_a_resumed_run_continues_the_same_wandb_run(digits, tmp_path, monkeypatch):
    inits = fake_wandb_recording_inits(monkeypatch)

    def run(folder, max_steps):
        options = {"wandb": {"project": "p", "entity": "lab", "group": "g"}, "checkpoint": {"every_steps": 10}}
        train(validate_recipe(small_recipe(digits, tmp_path / folder, train={"epochs": 2, "max_steps": max_steps},
                                           plugins=options)))

    run("a", 10)
    run("a", 20)  # resumes from step 10
    run("b", 10)  # another run
    assert [i["resume"] for i in inits] == ["allow"] * 3
    assert inits[0]["id"] == inits[1]["id"] != inits[2]["id"]
    assert (tmp_path / "a" / "wandb_run_id").read_text().strip() == inits[0]["id"]
    assert (inits[0]["entity"], inits[0]["group"]) == ("lab", "g")


def test_an_experiments_trials_are_grouped_by_experiment_with_the_rung_as_job_type(digits, tmp_path, monkeypatch):
    """launcher.experiment writes run.experiment into each trial's recipe: W&B groups the trials by
    experiment, types them by rung, names them by trial, and has rung and seed in the config."""
    from launcher.experiment.spec import load_experiment
    from tests.test_experiment import experiment_file

    inits = fake_wandb_recording_inits(monkeypatch)
    experiment = load_experiment(experiment_file(tmp_path, digits, "exp"))
    experiment.extra = ["plugins.wandb={project: p}", "train.max_steps=2"]
    trial = next(t for t in experiment.trials() if t.rung == "+ label smoothing" and t.seed == 1)
    trial.overrides = experiment.trial_overrides(trial.rung_index, trial.combo)
    train(experiment.trial_recipe(trial))
    init = inits[0]
    assert (init["group"], init["job_type"], init["name"]) == ("exp", "+ label smoothing",
                                                               "exp/01-label-smoothing/seed-1")
    assert (init["config"]["rung"], init["config"]["trial"], init["config"]["seed"]) == (
        "+ label smoothing", "01-label-smoothing/seed-1", 1)
