"""Kill it anywhere, relaunch the same command, get the same model: real processes killed
with SIGKILL (also in the middle of a checkpoint write) or stopped with SIGTERM, on 1 and 2
processes, with 2 loader workers and random augmentation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, accelerate_cmd, metric_rows, run_cli, small_recipe, written_lines

pytestmark = pytest.mark.slow


def write_recipe(digits, tmp_path, name, plugins=None, **data) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    raw = small_recipe(digits, run_dir, train={"epochs": 2}, run={"log_every": 5, "progress": False},
                       data={"num_workers": 2, "augment": {"crop_padding": 2, "rotation": 10, "random_erasing": 0.3},
                             **data},
                       plugins=plugins or {"checkpoint": {"every_steps": 10},
                                           "recorder": {"trace": False, "stream": True}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, run_dir


def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: kill it with its workers


def wait_for(condition, proc, timeout=180) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError


def kill(proc, sig=signal.SIGKILL) -> int:
    os.killpg(proc.pid, sig)
    return proc.wait(timeout=120)


def checkpoints(run_dir: Path, pattern="step-*") -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def finish(cmd, log, **env) -> None:
    proc = start(cmd, log, **env)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()
    assert metric_rows(a) == metric_rows(b)


def trained_ids(run_dir: Path, ranks: int) -> dict:
    """(epoch, step) -> the sample ids of that step over all ranks. A step redone after a
    kill must have used exactly the same samples as its first try."""
    per_step = defaultdict(dict)
    for rank in range(ranks):
        path = run_dir / f"ids-rank{rank}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            key = (entry["epoch"], entry["step"])
            previous = per_step[key].setdefault(rank, entry["ids"])
            assert previous == entry["ids"], f"step {key} rank {rank} trained on other samples after the resume"
    return {key: sorted(i for ids in by_rank.values() for i in ids) for key, by_rank in per_step.items()}


def assert_each_sample_once_per_epoch(ids: dict, epochs=(0, 1)) -> None:
    for epoch in epochs:
        used = [i for (e, _), step_ids in ids.items() if e == epoch for i in step_ids]
        assert sorted(used) == list(range(1437)), f"epoch {epoch}: a sample was lost or repeated"


@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory) -> Path:
    """The uninterrupted one-process run the interrupted ones must reproduce."""
    tmp_path = tmp_path_factory.mktemp("straight")
    recipe, run = write_recipe(digits, tmp_path, "straight")
    finish([sys.executable, "-m", "launcher", str(recipe)], tmp_path / "straight.log")
    return run


def test_sigkill_at_several_moments_then_relaunch_gives_the_same_model(digits, tmp_path, straight):
    """Also the dashboards: TensorBoard's curves and metrics.csv end with one point per logged row,
    none lost or repeated, equal to metrics.jsonl's (and so to the uninterrupted run's)."""
    recipe, run = write_recipe(digits, tmp_path, "killed", plugins={
        "checkpoint": {"every_steps": 10}, "recorder": {"trace": False, "stream": True}, "tensorboard": {},
        "csv_log": {}})
    cmd = [sys.executable, "-m", "launcher", str(recipe)]
    log = tmp_path / "killed.log"
    # 1. before any checkpoint exists: the relaunch starts from scratch
    proc = start(cmd, log)
    wait_for(lambda: (run / "ids-rank0.jsonl").exists(), proc)
    kill(proc)
    assert checkpoints(run) == []
    # 2. in the middle of a checkpoint write (the recorder plugin slows the write down)
    proc = start(cmd, log, LAUNCHER_TEST_STATE_PAUSE="3")
    assert wait_for(lambda: checkpoints(run, ".tmp-step-*"), proc)
    kill(proc)
    assert checkpoints(run, ".tmp-step-*") and not checkpoints(run)  # half-written, never visible
    # 3. mid-epoch, a second after a complete checkpoint
    proc = start(cmd, log)
    assert wait_for(lambda: len(checkpoints(run)) >= 2, proc)
    time.sleep(1.0)
    kill(proc)
    # 4. at the start of the second epoch
    proc = start(cmd, log)
    assert wait_for(lambda: any(json.loads(x)["epoch"] == 1 for x in written_lines(run / "ids-rank0.jsonl")), proc)
    kill(proc)
    finish(cmd, log)
    assert "resumed from" in log.read_text()
    assert_same_run(straight, run)
    assert_each_sample_once_per_epoch(trained_ids(run, 1))
    _assert_dashboards_equal_metrics_jsonl(run)


def _assert_dashboards_equal_metrics_jsonl(run: Path) -> None:
    import csv

    from launcher.plugins.csv_log import metrics_csv
    from tests.test_tensorboard import assert_curves_equal_metrics_jsonl

    assert_curves_equal_metrics_jsonl(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    written = (run / "metrics.csv").read_text()
    assert written == metrics_csv((run / "metrics.jsonl").read_text())
    assert [int(r["step"]) for r in csv.DictReader(written.splitlines())] == [r["step"] for r in rows]


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def steps_done(run: Path) -> int:
    return len(written_lines(run / "ids-rank0.jsonl"))


# Ctrl-C in a terminal signals the whole foreground process group: the launcher and its loader workers.
@pytest.mark.parametrize("sig, to_group, code", [(signal.SIGTERM, False, 75), (signal.SIGUSR1, False, 75),
                                                 (signal.SIGINT, True, 130)], ids=["SIGTERM", "SIGUSR1", "Ctrl-C"])
def test_a_signal_checkpoints_exits_75_or_130_and_resumes_exactly(sig, to_group, code, digits, tmp_path, straight):
    recipe, run = write_recipe(digits, tmp_path, "stopped")
    cmd = [sys.executable, "-m", "launcher", str(recipe)]
    log = tmp_path / "stopped.log"
    proc = start(cmd, log)
    assert wait_for(lambda: steps_done(run) >= 13, proc)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    assert proc.wait(timeout=120) == code, log.read_text()[-2000:]
    step = int(checkpoints(run)[-1].name.split("-")[1])
    assert step >= 13 and step % 10 != 0  # saved at the step it was working on, not a periodic one
    assert not (run / "final").exists()
    assert status(run)["state"] == "interrupted" and status(run)["exit_code"] == code
    assert "Traceback" not in log.read_text()
    finish(cmd, log)
    assert_same_run(straight, run)


def test_ctrl_c_without_checkpoints_stops_with_one_line_and_status_interrupted(digits, tmp_path):
    recipe, run = write_recipe(digits, tmp_path, "plain", plugins={"recorder": {"trace": False, "stream": True}})
    log = tmp_path / "plain.log"
    proc = start([sys.executable, "-m", "launcher", str(recipe)], log)
    assert wait_for(lambda: steps_done(run) >= 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert "Traceback" not in log.read_text() and "interrupted (Ctrl-C)" in log.read_text()
    assert status(run)["state"] == "interrupted" and status(run)["exit_code"] == 130


def test_a_signal_during_the_final_evaluation_lets_the_run_finish_with_its_final_weights(digits, tmp_path):
    recipe, run = write_recipe(digits, tmp_path, "ending", plugins={"checkpoint": {"every_steps": 10},
                                                                   "test_fault": {}})
    log = tmp_path / "ending.log"
    proc = start([sys.executable, "-m", "launcher", str(recipe), "train.max_steps=12"], log,
                 LAUNCHER_TEST_EVAL_PAUSE="3")
    assert wait_for(lambda: (run / "final-eval").exists(), proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert status(run)["state"] == "finished" and status(run)["step"] == 12
    assert (run / "final" / "model.safetensors").exists()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]).keys() >= {"step", "val/top1"}
    assert [p.name for p in checkpoints(run)] == ["step-00000010", "step-00000012"]


def test_a_second_run_in_the_same_run_directory_is_refused_while_the_first_runs(digits, tmp_path):
    """Two launches in one run directory would overwrite each other's checkpoints (orphaned ranks
    of a killed launch too); the lock dies with its processes, so a kill -9 leaves none behind."""
    recipe, run = write_recipe(digits, tmp_path, "shared", plugins={"checkpoint": {"every_steps": 10},
                                                                   "recorder": {"trace": False, "stream": True},
                                                                   "test_fault": {}})
    cmd = [sys.executable, "-m", "launcher", str(recipe)]
    log = tmp_path / "shared.log"
    first = start(cmd, log, LAUNCHER_TEST_STEP_PAUSE="0.5")
    assert wait_for(lambda: steps_done(run) >= 2, first)
    second = run_cli(cmd)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}," in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None and status(run)["state"] == "running"
    kill(first)
    finish(cmd, log)
    assert status(run)["state"] == "finished"


def killed_after_a_checkpoint_and_relaunched(recipe: Path, run: Path, log: Path) -> None:
    """2 processes, SIGKILL a second after the first checkpoint, then the same command to the end."""
    proc = start([*accelerate_cmd(2), "launcher", str(recipe)], log)
    assert wait_for(lambda: checkpoints(run), proc)
    time.sleep(1.0)
    kill(proc)
    finish([*accelerate_cmd(2), "launcher", str(recipe)], log)


def test_two_processes_killed_and_relaunched_give_the_same_model(digits, tmp_path):
    """DDP, then FSDP, each killed with SIGKILL after a checkpoint and relaunched: the same
    weights and metrics as an uninterrupted DDP run, every sample once per epoch."""
    recipe, straight = write_recipe(digits, tmp_path, "straight")
    finish([*accelerate_cmd(2), "launcher", str(recipe)], tmp_path / "straight.log")
    recipe, run = write_recipe(digits, tmp_path, "killed")
    killed_after_a_checkpoint_and_relaunched(recipe, run, tmp_path / "killed.log")
    assert_same_run(straight, run)
    assert_each_sample_once_per_epoch(trained_ids(run, 2))
    # FSDP, killed and relaunched from its sharded checkpoint: the uninterrupted DDP run's weights
    # (2 ranks add the same two terms, so FSDP and DDP agree bit for bit; the files differ in layout).
    recipe, run = write_recipe(digits, tmp_path, "fsdp-killed")
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**raw, "distributed": {"strategy": "fsdp"}}))
    log = tmp_path / "fsdp-killed.log"
    killed_after_a_checkpoint_and_relaunched(recipe, run, log)
    assert "resumed from" in log.read_text()
    from safetensors.torch import load_file

    fsdp, ddp = (load_file(str(r / "final" / "model.safetensors")) for r in (run, straight))
    assert fsdp.keys() == ddp.keys() and all(torch.equal(fsdp[k], ddp[k]) for k in ddp)
    assert metric_rows(run) == metric_rows(straight)
    assert_each_sample_once_per_epoch(trained_ids(run, 2))


def test_resuming_on_a_different_number_of_processes_continues_the_epoch(digits, tmp_path):
    """Killed mid-epoch on 2 processes (batch 32 each), resumed on 1 (batch 64): the same
    global batch, so the epoch goes on with exactly the samples not used yet."""
    recipe, run = write_recipe(digits, tmp_path, "moved")
    log = tmp_path / "moved.log"
    proc = start([*accelerate_cmd(2), "launcher", str(recipe)], log)
    assert wait_for(lambda: checkpoints(run), proc)
    kill(proc)
    step = int(checkpoints(run)[-1].name.split("-")[1])
    assert 0 < step < 23  # mid-epoch (global batch 64: 23 steps per epoch)
    finish([sys.executable, "-m", "launcher", str(recipe), "data.batch_size=64"], log)
    assert "random states are re-seeded" in log.read_text()
    assert_each_sample_once_per_epoch(trained_ids(run, 2))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 46
