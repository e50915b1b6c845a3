"""Experiments (launcher.experiment): the experiment file is checked as strictly as a recipe, every
trial's recipe before anything trains; an experiment stopped anywhere (the driver or a trial
killed with kill -9) and run again ends with the records, table and final weights of one that was
never stopped; --parallel gives the records of a sequential run; the statistics are scipy's."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.experiment.__main__ import main
from tests.conftest import REPO

DIGITS_RECIPE = REPO / "recipes" / "digits.yaml"


def experiment_file(tmp_path: Path, digits: dict, name: str = "exp", **changes) -> Path:
    """A digits experiment of 2 rungs x 2 seeds, 6 steps a trial, a checkpoint every 3 steps."""
    spec = {
        "recipe": str(DIGITS_RECIPE),
        "dir": str(tmp_path / name),
        "overrides": [f"data.train={digits['train']}", f"data.val={digits['val']}", "train.max_steps=6",
                      "data.num_workers=0", "~plugins.report", "plugins.checkpoint={every_steps: 3}",
                      "model.name=wrn10_1", "run.log_every=1",
                      # tests/recorder_plugin.py: LAUNCHER_TEST_STEP_PAUSE slows the steps of a trial that a
                      # test interrupts (without it in the recipe the variable did nothing)
                      "plugins.test_fault={}"],
        "seeds": [0, 1],
        "metric": "val/top1",
        "rungs": [{"name": "baseline"}, {"name": "+ label smoothing", "about": "0.1",
                                         "overrides": ["plugins.label_smoothing={smoothing: 0.1}"]}],
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def refused(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("changes, words", [
    ({"seed": [0]}, "unknown key 'seed'. Did you mean 'seeds'?"),
    ({"seeds": "zero"}, "'seeds' = 'zero'"),
    ({"seeds": []}, "'seeds' = []: List should have at least 1 item"),
    ({"seeds": [1, 1]}, "seed 1 is listed twice"),
    ({"rungs": [{"name": "a"}, {"name": "a"}]}, "the rung name 'a' is used twice"),
    ({"rungs": [{"name": "a", "overide": []}]}, "unknown key 'rungs.0.overide'. Did you mean 'overrides'?"),
    ({"rungs": [{"name": "a", "alone": True}]}, "the first rung ('a') is the baseline: it cannot be alone"),
    ({"grid": {"optimizer.lr": []}}, "grid key 'optimizer.lr' has no values"),
    ({"search": {"trials": 4, "parameters": {"optimizer.lr": {"low": 1.0, "high": 0.1}}}}, "give low < high"),
    ({"recipe": "recipes/nope.yaml"}, "recipe 'recipes/nope.yaml' does not exist"),
    ({"rungs": [{"name": "baseline"}, {"name": "+ typo", "overrides": ["optimizer.lrr=0.1"]}]},
     "rung '+ typo' cannot run: Recipe"),
])
def test_a_bad_experiment_is_refused_before_anything_trains(digits, tmp_path, capsys, changes, words):
    path = experiment_file(tmp_path, digits, **changes)
    err = refused(["run", str(path)], capsys)
    assert words in err, err
    assert not (tmp_path / "exp").exists()  # no trial started, no folder made


def test_report_and_status_of_an_experiment_that_has_not_run(digits, tmp_path, capsys):
    path = experiment_file(tmp_path, digits)
    err = refused(["report", str(path)], capsys)
    assert "no trial has a result yet (4 pending" in err and "python -m launcher.experiment run" in err
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("pending") == 5 and "00-baseline/seed-0" in out and "01-label-smoothing/seed-1" in out
    refused(["report", str(tmp_path)], capsys)


def test_trials_go_round_the_rungs_and_a_grid_multiplies_them(digits, tmp_path):
    from launcher.experiment.spec import load_experiment

    experiment = load_experiment(experiment_file(
        tmp_path, digits, grid={"optimizer.lr": [0.05, 0.1]},
        rungs=[{"name": "baseline"}, {"name": "+ SAM", "overrides": ["plugins.sam={rho: 0.05}"]},
               {"name": "mixup alone", "overrides": ["plugins.mixup={}"], "alone": True}]))
    trials = experiment.trials()
    assert len(trials) == 3 * 2 * 2
    assert [t.name for t in trials[:2]] == ["00-baseline/optimizer.lr=0.05/seed-0", "00-baseline/optimizer.lr=0.1/seed-0"]
    assert {t.seed for t in trials[:6]} == {0}  # seed 0 of every rung first
    mixup = next(t for t in trials if t.rung == "mixup alone")
    assert "plugins.sam={rho: 0.05}" not in mixup.overrides and "plugins.mixup={}" in mixup.overrides
    sam = next(t for t in trials if t.rung == "+ SAM" and t.combo["optimizer.lr"] == 0.1)
    assert sam.overrides[-1] == "optimizer.lr=0.1" and experiment.trial_recipe(sam).optimizer.lr == 0.1
    assert experiment.below(2) is None and experiment.below(1) == 0


def test_the_statistics_are_scipys_student_t_interval_and_welchs_test():
    from scipy import stats

    from launcher.experiment.report import summary, welch

    a, b = [85.1, 84.4, 85.7], [87.9, 88.1, 87.6]
    mean, std, half = summary(b)
    low, high = stats.t.interval(0.95, len(b) - 1, loc=mean, scale=stats.sem(b))
    assert math.isclose(mean, sum(b) / 3) and math.isclose(mean - half, low) and math.isclose(mean + half, high)
    assert math.isclose(welch(a, b), stats.ttest_ind(b, a, equal_var=False).pvalue)
    assert welch(a, [1.0]) is None and math.isnan(summary([1.0])[1])
    assert welch([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch([1.0, 1.0], [2.0, 2.0]) == 0.0


def _start_driver(path: Path, *args: str, **env) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.Popen([sys.executable, "-m", "launcher.experiment", "run", str(path), *args], cwd=REPO,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(condition, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie its new parent has not reaped yet counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _holder_pid(run_dir: Path) -> int:
    """The trial's process, as its run directory's lock names it."""
    text = (run_dir / ".lock").read_text()
    return int(text.split("pid ")[1].split(",")[0])


@pytest.mark.slow
def test_an_experiment_killed_anywhere_ends_as_one_never_stopped_and_parallel_as_sequential(digits, tmp_path,
                                                                                              capsys):
    """A: 2 rungs x 2 seeds with --parallel 2, never stopped. B: the same sequentially, with its
    first trial killed (kill -9) after its step-3 checkpoint, then the driver killed (kill -9) while
    the second trial runs (the kernel hands that trial SIGTERM: it checkpoints), then run again.
    B's records and table equal A's, and each trial's final weights are A's twin's, bit for bit."""
    a, b = experiment_file(tmp_path, digits, "a"), experiment_file(tmp_path, digits, "b")
    parallel = _start_driver(a, "--parallel", "2")
    # B's first sitting: half a second a step, so the kills land mid-trial.
    driver = _start_driver(b, LAUNCHER_TEST_STEP_PAUSE="0.5")
    first, second = tmp_path / "b" / "00-baseline" / "seed-0", tmp_path / "b" / "01-label-smoothing" / "seed-0"
    _wait_for(lambda: (first / "checkpoints" / "step-00000003").is_dir())
    os.kill(_holder_pid(first), signal.SIGKILL)
    _wait_for(lambda: (second / "checkpoints" / "step-00000003").is_dir())
    trial = _holder_pid(second)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    _wait_for(lambda: json.loads((second / "status.json").read_text())["state"] == "interrupted", timeout=120)
    _wait_for(lambda: _gone(trial), timeout=60)  # the trial is gone too
    assert main(["status", str(b)]) == 0
    states = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines()[:-1])
    assert states == {"00-baseline/seed-0": "interrupted", "01-label-smoothing/seed-0": "interrupted",
                      "00-baseline/seed-1": "pending", "01-label-smoothing/seed-1": "pending"}, states
    again = _start_driver(b)
    out_b, _ = again.communicate(timeout=600)
    out_a, _ = parallel.communicate(timeout=600)
    assert parallel.returncode == 0, out_a[-3000:]
    lines = out_a.splitlines()  # --parallel 2 ran two trials at once: both started before either finished
    first_end = next(i for i, line in enumerate(lines) if ": finished in" in line)
    assert sum(": started (" in line for line in lines[:first_end]) == 2, out_a
    assert again.returncode == 0, out_b[-3000:]
    assert "4 trials, 0 finished, 4 to run" in out_b  # the interrupted ones resume: not finished yet
    for log in (first / "trial.log", second / "trial.log"):
        assert "resumed from" in log.read_text()
    record = {name: json.loads((tmp_path / name / "record.json").read_text())["trials"] for name in "ab"}
    assert [e["trial"] for e in record["a"]] == [e["trial"] for e in record["b"]] and len(record["a"]) == 4
    for ea, eb in zip(record["a"], record["b"]):
        assert ea["recipe"] == eb["recipe"]
        assert {k: v for k, v in ea["result"].items() if "seconds" not in k} == \
            {k: v for k, v in eb["result"].items() if "seconds" not in k}
        twin = [tmp_path / name / ea["trial"] / "final" / "model.safetensors" for name in "ab"]
        assert twin[0].read_bytes() == twin[1].read_bytes(), ea["trial"]
    tables = [[line for line in (tmp_path / name / "report" / "report.md").read_text().splitlines()
               if line.startswith("| ") and "time per trial" not in line] for name in "ab"]
    assert [row.rsplit("|", 2)[0] for row in tables[0]] == [row.rsplit("|", 2)[0] for row in tables[1]]
    assert len(tables[0]) == 2  # two rungs
    # A report trains nothing and reads the record: the same table again, even without the run directories.
    assert main(["report", str(b)]) == 0 and "| + label smoothing | 0.1 | val/top1 |" in capsys.readouterr().out
    # --out replaces only a report it wrote.
    mine = tmp_path / "notes.md"
    mine.write_text("mine")
    assert "exists and is not a report of this command" in refused(["report", str(b), "--out", str(mine)], capsys)
    assert mine.read_text() == "mine"


def test_damaged_trials_are_named_and_left_out_and_impossible_records_refused(digits, tmp_path, capsys):
    """The report over damaged run directories (an empty status.json, a metrics.jsonl cut mid-line,
    no evaluation, no recipe.yaml, a top-1 of 1.5) names each and leaves it out; a record holding an
    impossible accuracy (1.5, -0.4, text, NaN) or that is no record is refused, naming the entry."""
    path = experiment_file(tmp_path, digits)

    def finished(name: str, metrics: str, recipe: bool = True, status: str = '{"state": "finished"}'):
        run_dir = tmp_path / "exp" / name
        run_dir.mkdir(parents=True)
        (run_dir / "status.json").write_text(status)
        (run_dir / "metrics.jsonl").write_text(metrics)
        if recipe:
            (run_dir / "recipe.yaml").write_text("seed: 0\n")

    finished("00-baseline/seed-0", "", status="")  # an empty status.json
    finished("00-baseline/seed-1", '{"step": 10, "val/top1": 0.9}\n{"step": 20, "val/to')  # cut mid-line
    finished("01-label-smoothing/seed-0", '{"step": 10, "train/loss": 1.0}\n')  # no evaluation
    finished("01-label-smoothing/seed-1", '{"step": 10, "val/top1": 1.5}\n')  # not an accuracy
    err = refused(["report", str(path)], capsys)
    for words in ("no trial has a result yet (4 failed", "00-baseline/seed-0: status file", "is unreadable",
                  "00-baseline/seed-1: metrics file",
                  "line 2 is not a whole JSON row", "01-label-smoothing/seed-0: '", "holds no evaluation (no val/top1 row)",
                  "01-label-smoothing/seed-1: val/top1 in", "is 1.5, which is not an accuracy"):
        assert words in err, (words, err)
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "00-baseline/seed-0         failed" in out and "4 failed" in out, out
    (tmp_path / "exp" / "01-label-smoothing" / "seed-0" / "recipe.yaml").unlink()
    record = tmp_path / "exp" / "record.json"
    for value in (1.5, -0.4, "0.9", float("nan")):
        record.write_text(json.dumps({"trials": [{"trial": "00-baseline/seed-0", "recipe": {},
                                                  "result": {"metric": "val/top1", "top1": value}}]}))
        err = refused(["report", str(path)], capsys)
        assert f"top1 of trial '00-baseline/seed-0' of record '{record}' is {value!r}, which is not an accuracy" in err
    record.write_text("[1, 2]")
    assert "is not an experiment record" in refused(["report", str(path)], capsys)


def test_the_cifar100_ladder_is_ready_for_a_cluster(tmp_path, capsys):
    """experiments/cifar100_ladder.yaml: every trial's recipe resolves (the write-up's table as rungs,
    3 seeds), and `submit --dry-run` on stand-in shards prints one array of its 27 trials, 8 at a time."""
    from launcher.experiment.gather import expected_recipes
    from launcher.experiment.spec import load_experiment
    from launcher.data.writer import main as write_shards

    experiment = load_experiment(REPO / "experiments" / "cifar100_ladder.yaml")
    trials = experiment.trials()
    assert len(trials) == 9 * 3 and len(experiment.spec.references) == 9
    recipes = {t.rung: experiment.trial_recipe(t) for t in trials if t.seed == 0}
    assert recipes["ResNet-50: SGD + warmup + CE"].model.name == "resnet50"
    assert not recipes["ResNet-50: SGD + warmup + CE"].plugins.get("sam")
    top = recipes["+ TTA"]
    assert (top.model.name, top.data.augment.random_erasing, top.data.augment.auto_augment) == ("wrn40_10", 0.5, "cifar10")
    assert {"sam", "label_smoothing", "tta"} <= set(top.plugins)
    assert recipes["ResNet-18"].model.name == "resnet18" and not recipes["ResNet-18"].data.augment.random_erasing
    assert len(expected_recipes(experiment, trials)) == 9
    assert write_shards(["synthetic", "--out", str(tmp_path / "c100"), "--num-classes", "100", "--train", "64",
                         "--val", "32"]) == 0
    info = json.loads((tmp_path / "c100" / "info.json").read_text())
    capsys.readouterr()
    assert main(["submit", str(REPO / "experiments" / "cifar100_ladder.yaml"), "--nodes", "1", "--gpus-per-node", "1",
                 "--time", "24:00:00", "--max-parallel", "8", "--dry-run", f"data.train={info['train']}",
                 f"data.val={info['val']}"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-26%8" in script and script.count("/seed-") == 27 and "--gpus-per-node=1" in script


def search_file(tmp_path: Path, digits: dict, **search) -> Path:
    """A search over the learning rate on digits (wrn10_1 at 8 px, 2 epochs, an evaluation and a
    checkpoint each epoch), trying 0.05 then 1e-6 first; the median pruner learns from one trial."""
    return experiment_file(tmp_path, digits, "search", seeds=[0], overrides=[
        f"data.train={digits['train']}", f"data.val={digits['val']}", "data.num_workers=0", "~plugins.report",
        "model.name=wrn10_1", "data.image_size=8", "train.epochs=2", "train.eval_every=1",
        "plugins.checkpoint={every_epochs: 1}", "plugins.recorder={trace: false}", "plugins.test_fault={}"],
        search={"trials": 2, "parameters": {"optimizer.lr": {"low": 1e-6, "high": 0.3, "log": True}},
                "enqueue": [{"optimizer.lr": 0.05}, {"optimizer.lr": 1e-6}], "startup_trials": 1, **search})


def test_a_search_without_optuna_says_how_to_install_it(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    err = refused(["run", str(search_file(tmp_path, digits))], capsys)
    assert "needs Optuna, which is not installed" in err and "pip install '.[search]'" in err
    bad = search_file(tmp_path, digits, enqueue=[{"optimizer.momentum": 0.5}])
    assert "search.enqueue names 'optimizer.momentum', which is not a searched parameter" in refused(
        ["run", str(bad)], capsys)


@pytest.mark.slow
def test_a_search_decides_parameters_before_the_ranks_start_prunes_on_every_rank_and_resumes_its_trial(
        digits, tmp_path, capsys):
    """2-process trials. Trial 0 (lr 0.05) is interrupted (`experiment cancel` after the trial's first
    checkpoint: the driver hands SIGTERM to the trial, which checkpoints) and continues its own Optuna
    trial when the search runs again; trial 1 (lr 1e-6) is below the median at its first evaluation
    and is pruned on both ranks together."""
    pytest.importorskip("optuna")
    import optuna

    path = search_file(tmp_path, digits)
    first = tmp_path / "search" / "search" / "trial-0000"
    driver = _start_driver(path, "--processes", "2", LAUNCHER_TEST_STEP_PAUSE="0.2")
    _wait_for(lambda: any((first / "checkpoints").glob("step-*")) if (first / "checkpoints").is_dir() else False)
    assert main(["cancel", str(path)]) == 0
    assert "sent SIGTERM to the driver" in capsys.readouterr().out
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 75, out[-3000:]  # stopped: run it again to finish
    assert json.loads((first / "status.json").read_text())["state"] == "interrupted"
    again = _start_driver(path, "--processes", "2")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert "0 done, 1 to resume" in out and "resumed from" in (first / "trial.log").read_text()
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search' / 'search.db'}")
    assert [(t.number, t.state.name, t.params["optimizer.lr"]) for t in study.trials] == [
        (0, "COMPLETE", 0.05), (1, "PRUNED", 1e-6)]  # the interrupted trial kept its number: no third trial
    assert sorted(p.name for p in (tmp_path / "search" / "search").iterdir()) == ["trial-0000", "trial-0001"]
    pruned = tmp_path / "search" / "search" / "trial-0001"
    status = json.loads((pruned / "status.json").read_text())
    assert status["state"] == "pruned" and "pruned by the search" in status["reason"]
    ranks = [json.loads((pruned / f"recorder-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["recipe_lr"] for r in ranks] == [1e-6, 1e-6]  # the sampled value, on both ranks
    assert [s["lr"] for s in ranks[0]["steps"]] == [s["lr"] for s in ranks[1]["steps"]]
    steps = [len(r["steps"]) for r in ranks]
    assert steps[0] == steps[1] == status["step"] < 2 * steps[0]  # both stopped at the first evaluation
    assert (pruned / "checkpoints" / f"step-{status['step']:08d}").is_dir()
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 1e-06 |" in out and "pruned" in out and "Best: trial 0" in out


def test_the_shipped_search_resolves_its_trials(digits, tmp_path):
    """experiments/digits_lr_search.yaml: its first trial is the enqueued point, in the recipe."""
    pytest.importorskip("optuna")
    from launcher.experiment.search import distributions, search_trial, study_of
    from launcher.experiment.spec import load_experiment

    experiment = load_experiment(REPO / "experiments" / "digits_lr_search.yaml",
                                 [f"data.train={digits['train']}", f"data.val={digits['val']}"])
    experiment.dir = tmp_path / "search"
    study = study_of(experiment)
    first = study.ask(distributions(experiment.spec.search))
    trial = search_trial(experiment, first.number, {"optimizer.lr": 0.05, "optimizer.weight_decay": 5e-4})
    assert first.params == {"optimizer.lr": 0.05, "optimizer.weight_decay": 5e-4}  # enqueued
    recipe = experiment.trial_recipe(trial)
    assert (recipe.optimizer.lr, recipe.train.epochs, recipe.plugins["optuna_pruning"]["trial"]) == (0.05, 4, 0)
    assert recipe.plugins["optuna_pruning"]["startup_trials"] == 4


def test_a_metric_no_trial_logs_is_named_with_what_the_trials_log(digits, tmp_path, capsys):
    path = experiment_file(tmp_path, digits, metric="val_ema/top1")
    run_dir = tmp_path / "exp" / "00-baseline" / "seed-0"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text('{"state": "finished"}')
    (run_dir / "metrics.jsonl").write_text('{"step": 6, "val/top1": 0.5, "val/loss": 1.2}\n')
    (run_dir / "recipe.yaml").write_text("seed: 0\n")
    err = refused(["report", str(path)], capsys)
    assert "has no 'val_ema/top1' (it logs val/loss, val/top1)" in err, err


def test_a_search_study_can_live_in_optunas_journal_file(digits, tmp_path):
    """storage: journal (for a shared file system): the driver's study and the trial's plugin open
    the same journal file."""
    pytest.importorskip("optuna")
    from launcher.experiment.search import distributions, open_storage, storage_url, study_of
    from launcher.experiment.spec import load_experiment

    experiment = load_experiment(search_file(tmp_path, digits, storage="journal"))
    study = study_of(experiment)
    trial = study.ask(distributions(experiment.spec.search))
    url = storage_url(experiment)
    assert url == f"journal:{(tmp_path / 'search' / 'search.journal').resolve()}"
    import optuna

    seen = optuna.load_study(study_name="search", storage=open_storage(url))
    assert [(t.number, t.params) for t in seen.trials if t.state.name == "RUNNING"] == [(0, {"optimizer.lr": 0.05})]
    assert trial.number == 0 and (tmp_path / "search" / "search.journal").exists()
