"""Kill it anywhere, relaunch the same command, get the same model: real processes killed
with SIGKILL (also in the middle of a checkpoint write) or stopped with SIGTERM, on 1 and 2
processes, with 2 loader workers and random augmentation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, accelerate_cmd, small_recipe

pytestmark = pytest.mark.slow


def write_recipe(digits, tmp_path, name, **data) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    raw = small_recipe(digits, run_dir, train={"epochs": 2}, run={"log_every": 5, "progress": False},
                       data={"num_workers": 2, "augment": {"crop_padding": 2, "rotation": 10, "random_erasing": 0.3},
                             **data},
                       plugins={"checkpoint": {"every_steps": 10}, "recorder": {"trace": False, "stream": True}})
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
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


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
    recipe, run = write_recipe(digits, tmp_path, "killed")
    cmd = [sys.executable, "-m", "launcher", str(recipe)]
    log = tmp_path / "killed.log"
    # 1. before any checkpoint exists: the relaunch starts from scratch
    proc = start(cmd, log)
    wait_for(lambda: (run / "ids-rank0.jsonl").exists(), proc)
    kill(proc)
    assert checkpoints(run) == []
    # 2. in the middle of a checkpoint write (the test slows the write down)
    proc = start(cmd, log, LAUNCHER_TEST_CHECKPOINT_DELAY="3")
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
    assert wait_for(lambda: any(json.loads(x)["epoch"] == 1
                                for x in (run / "ids-rank0.jsonl").read_text().splitlines()), proc)
    kill(proc)
    finish(cmd, log)
    assert "resumed from" in log.read_text()
    assert_same_run(straight, run)
    assert_each_sample_once_per_epoch(trained_ids(run, 1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_checkpoints_exits_75_and_resumes_exactly(sig, digits, tmp_path, straight):
    recipe, run = write_recipe(digits, tmp_path, "stopped")
    cmd = [sys.executable, "-m", "launcher", str(recipe)]
    log = tmp_path / "stopped.log"
    proc = start(cmd, log)
    assert wait_for(lambda: (run / "ids-rank0.jsonl").exists()
                    and len((run / "ids-rank0.jsonl").read_text().splitlines()) >= 13, proc)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=120) == 75, log.read_text()[-2000:]
    step = int(checkpoints(run)[-1].name.split("-")[1])
    assert step >= 13 and step % 10 != 0  # saved at the step it was working on, not a periodic one
    assert not (run / "final").exists()
    finish(cmd, log)
    assert_same_run(straight, run)


def test_two_processes_killed_and_relaunched_give_the_same_model(digits, tmp_path):
    recipe, straight = write_recipe(digits, tmp_path, "straight")
    finish([*accelerate_cmd(2), "launcher", str(recipe)], tmp_path / "straight.log")
    recipe, run = write_recipe(digits, tmp_path, "killed")
    log = tmp_path / "killed.log"
    proc = start([*accelerate_cmd(2), "launcher", str(recipe)], log)
    assert wait_for(lambda: checkpoints(run), proc)
    time.sleep(1.0)
    kill(proc)
    finish([*accelerate_cmd(2), "launcher", str(recipe)], log)
    assert_same_run(straight, run)
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
