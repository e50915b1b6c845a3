"""Slurm, against a real cluster: slurm/cluster.sh installs and starts Debian's slurm-wlm and
munge with two emulated nodes on this machine (and stops them afterwards).

- a 2-node job trains with two ranks and ends with the same weights as a local 2-process run;
- a DeepSpeed ZeRO-3 recipe runs on 2 nodes through the same script, same weights as locally;
- the time-limit warning (SIGUSR1 to the batch shell) and `scancel --signal=USR1` both make
  every rank checkpoint; the job requeues itself, restarts with SLURM_RESTART_COUNT=1,
  resumes, and ends with the same weights as the uninterrupted run, with one line per node
  in the log (no torch elastic traceback);
- `launcher.slurm cancel` (scancel) checkpoints and ends the job for good: no requeue;
- --dry-run prints the script (snapshot), a sweep makes one run directory per value, and bad
  input (invalid recipe, another recipe's run directory, no sbatch) fails before the queue.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, accelerate_cmd, metric_rows, run_cli, small_recipe, written_lines

pytestmark = pytest.mark.slow
SNAPSHOT = REPO / "tests" / "snapshots" / "slurm_dry_run.sbatch"


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("LAUNCHER_SKIP_SLURM") == "1":
        pytest.skip("LAUNCHER_SKIP_SLURM=1")
    start = subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "start"], capture_output=True, text=True,
                           timeout=600)
    assert start.returncode == 0, f"could not start the test cluster:\n{start.stdout}\n{start.stderr}"
    yield
    for job in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
        subprocess.run(["scancel", job])
    subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "stop"], capture_output=True, timeout=120)


# A run that a test interrupts paces its first attempt (30 ms a step, not CPU time, see
# tests/recorder_plugin.py) so that 50 epochs take about 90 s: long enough to interrupt (the
# time-limit warning comes within Slurm's 30 s check); the references and a requeued run go at
# full speed.
PACE = {"LAUNCHER_TEST_STEP_PAUSE": "0.03"}


def recipe_file(digits, tmp_path, name, epochs=50, **sections) -> Path:
    raw = small_recipe(digits, tmp_path / name, train={"epochs": epochs, "eval_every": 10},
                       data={"image_size": 8, "batch_size": 32},
                       plugins={"checkpoint": {"every_epochs": 10}, "test_fault": {}}, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def submit(*args: str, env: dict | None = None) -> tuple[str, subprocess.CompletedProcess]:
    proc = run_cli([sys.executable, "-m", "launcher.slurm", "submit", *args], env=env)
    match = re.search(r"submitted job (\d+)", proc.stdout)
    return (match.group(1) if match else ""), proc


def job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(job_id: str, timeout: float = 400) -> dict:
    return wait_for(lambda: (lambda j: j if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                             else None)(job(job_id)), timeout, f"job {job_id} to end")


def trained_steps(run_dir: Path) -> int:
    return max((json.loads(r)["step"] for r in written_lines(run_dir / "metrics.jsonl")), default=0)


def weights(run_dir: Path) -> bytes:
    return (run_dir / "final" / "model.safetensors").read_bytes()


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*")) if p.suffix in (".out", ".log"))


def on_two_nodes_and_locally(recipe: Path, tmp: Path, minutes: str) -> None:
    """The recipe as a 2-node Slurm job (tmp/slurm_run) and, meanwhile, as a local 2-process
    run (tmp/local_run); both must finish."""
    job_id, proc = submit(str(recipe), "--nodes", "2", "--time", minutes, f"run.dir={tmp / 'slurm_run'}")
    assert job_id, proc.stderr
    local = run_cli([*accelerate_cmd(2), "launcher", str(recipe), f"run.dir={tmp / 'local_run'}"])
    assert local.returncode == 0, local.stderr[-3000:]
    state = wait_done(job_id)
    assert state["JobState"] == "COMPLETED", logs(tmp / "slurm_run")


def reach_step_100(run_dir: Path, reached: threading.Event) -> None:
    """Wait for the run to train 100 steps; then (or on failing to) let the waiting scenarios start."""
    try:
        wait_for(lambda: trained_steps(run_dir) >= 100, 400, "training to reach step 100")
    finally:
        reached.set()


def interrupted_then_resumed(tmp: Path, recipe: Path, name: str, interrupt, interrupted: threading.Event) -> Path:
    run_dir = tmp / name
    # A grace far longer than the signal path needs; the limit itself is far away until a test shortens it.
    job_id, proc = submit(str(recipe), "--nodes", "2", "--time", "30", "--grace", "600", f"run.dir={run_dir}",
                          env=PACE)
    assert job_id, proc.stderr
    reach_step_100(run_dir, interrupted)
    interrupt(job_id)
    # The job checkpoints, requeues itself and waits until its old credential expires
    # (cred_expire, 10 s on the test cluster; forcing an earlier start fails the job:
    # "Job credential revoked").
    # Restarts=1 shows while the first run still completes; wait for the requeued job itself.
    wait_for(lambda: (lambda j: j.get("Restarts") == "1" and j.get("JobState") in ("PENDING", "RUNNING"))(job(job_id)),
             180, "the job to requeue itself")
    # The shortened limit would signal the restart at once: give it back before it starts.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=30"], check=True)
    # What the first run left (read from its log: the restart may already have replaced status.json).
    first = (run_dir / "slurm" / f"job-{job_id}-restart-0.log").read_text()
    assert "run state: interrupted" in first, first[-3000:]  # every rank checkpointed and exited 75
    step = int(re.search(r"saved step (\d+), exiting with status 75", first).group(1))
    assert 100 <= step < 1150
    state = wait_done(job_id)
    log = logs(run_dir)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log
    assert "restart 1 on n[1-2]" in log and "run state: finished" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'}" in log  # the checkpoint of the signal
    assert (run_dir / "slurm" / f"job-{job_id}-restart-0.log").exists()
    assert (run_dir / "slurm" / f"job-{job_id}-restart-1.log").exists()
    return run_dir


def shorten_time_limit(job_id: str) -> None:
    # Leave 1-2 minutes, less than the 600 s grace: at its next check (every 30 s or so) Slurm
    # sends the warning, SIGUSR1 to the batch shell, well before the job would time out.
    elapsed = sum(int(x) * m for x, m in zip(reversed(job(job_id)["RunTime"].split(":")), (1, 60, 3600)))
    minutes = math.ceil((elapsed + 61) / 60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True)


def cancelled_for_good(tmp: Path, recipe: Path, interrupted: threading.Event) -> Path:
    """`launcher.slurm cancel` (scancel: SIGTERM to the batch shell and the steps) checkpoints and
    ends the job; it must not requeue itself as it does on the time-limit warning."""
    run_dir = tmp / "cancelled"
    job_id, proc = submit(str(recipe), "--nodes", "2", "--time", "30", f"run.dir={run_dir}", env=PACE)
    assert job_id, proc.stderr
    reach_step_100(run_dir, interrupted)
    cancel = run_cli([sys.executable, "-m", "launcher.slurm", "cancel", str(run_dir)])
    assert cancel.returncode == 0 and f"cancelled job {job_id} (RUNNING)" in cancel.stdout, cancel.stderr
    wait_done(job_id)
    time.sleep(5)  # a requeue would show as Restarts=1, PENDING
    state = job(job_id)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", (state, logs(run_dir))
    return run_dir


def experiment_as_arrays(tmp: Path, digits, reached: threading.Event) -> Path:
    """A 3-trial experiment (one rung, seeds 0-2) submitted as arrays of at most 2 tasks: an array
    of seeds 0 and 1 (run 2 at a time) and a job for seed 2. Seeds 1 and 2 are cancelled through
    `experiment cancel` (they checkpoint and do not requeue); seed 0 gets its time-limit warning,
    requeues itself and resumes. Returns the experiment file."""
    from tests.test_experiment import experiment_file

    recipe = recipe_file(digits, tmp, "exp_recipe")
    path = experiment_file(tmp, digits, "exp", recipe=str(recipe), overrides=[], seeds=[0, 1, 2],
                           rungs=[{"name": "baseline"}])
    experiment = tmp / "exp"
    trials = [experiment / "00-baseline" / f"seed-{seed}" for seed in range(3)]
    try:
        proc = run_cli([sys.executable, "-m", "launcher.experiment", "submit", str(path), "--time", "30",
                        "--grace", "600", "--max-parallel", "2", "--max-array-size", "2"], env=PACE)
        assert proc.returncode == 0, proc.stderr
        jobs = re.findall(r"submitted job (\d+): (\d) trial", proc.stdout)
        assert [n for _, n in jobs] == ["2", "1"], proc.stdout
        (array, _), (single, _) = jobs
        assert [json.loads((t / "slurm" / "jobs.json").read_text())[-1]["job_id"] for t in trials] == [
            f"{array}_0", f"{array}_1", single]
        for run_dir in trials:
            wait_for(lambda: trained_steps(run_dir) >= 100, 400, f"{run_dir} to reach step 100")
    finally:
        reached.set()
    cancel = run_cli([sys.executable, "-m", "launcher.experiment", "cancel", str(path), "--seeds", "1", "2"])
    assert cancel.returncode == 0 and cancel.stdout.count("cancelled job") == 2, cancel.stdout + cancel.stderr
    shorten_time_limit(f"{array}_0")
    wait_for(lambda: (lambda j: j.get("Restarts") == "1" and j.get("JobState") in ("PENDING", "RUNNING"))(
        job(f"{array}_0")), 180, "the task to requeue itself")
    subprocess.run(["scontrol", "update", f"JobId={array}_0", "TimeLimit=30"], check=True)
    for job_id in (f"{array}_0", f"{array}_1", single):
        wait_done(job_id)
    return path


@pytest.fixture(scope="module")
def slurm_runs(cluster, digits, tmp_path_factory):
    """The long scenarios run side by side (the test cluster's nodes hold several jobs, and most of
    each scenario is waiting for Slurm): the same recipe as an uninterrupted 2-node job and a local
    2-process run (the reference), interrupted by the time-limit warning, by `scancel
    --signal=USR1`, cancelled for good; and a DeepSpeed ZeRO-3 and an FSDP recipe on 2 nodes. Each test checks
    its own scenario: `.result()` raises what failed in it."""
    tmp = tmp_path_factory.mktemp("slurm")
    recipe = recipe_file(digits, tmp, "ref")
    (tmp / "zero3").mkdir()
    zero3 = recipe_file(digits, tmp / "zero3", "zero3", epochs=2,
                        distributed={"strategy": "deepspeed", "zero_stage": 3})
    (tmp / "fsdp").mkdir()
    fsdp = recipe_file(digits, tmp / "fsdp", "fsdp", epochs=2, distributed={"strategy": "fsdp"})
    # The interrupted scenarios must reach step 100 within their wait; the others start only once
    # they have (or have failed to): 18 ranks starting at once on 2 cores took CI past 400 s.
    interrupted = {name: threading.Event() for name in ("time_limit", "scancel", "cancel", "experiment")}

    def after_the_interruptions(scenario):
        def run():
            for event in interrupted.values():
                event.wait(450)
            return scenario()
        return run

    scenarios = {
        "time_limit": lambda: interrupted_then_resumed(tmp, recipe, "time_limit", shorten_time_limit,
                                                       interrupted["time_limit"]),
        "scancel": lambda: interrupted_then_resumed(
            tmp, recipe, "scancel", lambda job_id: subprocess.run(["scancel", "--signal=USR1", job_id], check=True),
            interrupted["scancel"]),
        "cancel": lambda: cancelled_for_good(tmp, recipe, interrupted["cancel"]),
        "experiment": lambda: experiment_as_arrays(tmp, digits, interrupted["experiment"]),
        "reference": after_the_interruptions(lambda: on_two_nodes_and_locally(recipe, tmp, "30")),
        "zero3": after_the_interruptions(lambda: on_two_nodes_and_locally(zero3, tmp / "zero3", "30")),
        "fsdp": after_the_interruptions(lambda: on_two_nodes_and_locally(fsdp, tmp / "fsdp", "30")),
    }
    with ThreadPoolExecutor(len(scenarios)) as pool:
        runs = {name: pool.submit(scenario) for name, scenario in scenarios.items()}
        futures_wait(runs.values())
    return tmp, runs


def test_two_nodes_train_with_two_ranks_like_a_local_run(slurm_runs):
    tmp, runs = slurm_runs
    runs["reference"].result()
    manifest = json.loads((tmp / "slurm_run" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    log = logs(tmp / "slurm_run")
    assert "on n[1-2] (2 nodes x 1 processes)" in log and "run state: finished" in log
    assert weights(tmp / "slurm_run") == weights(tmp / "local_run")
    assert metric_rows(tmp / "slurm_run") == metric_rows(tmp / "local_run")
    status = run_cli([sys.executable, "-m", "launcher.slurm", "status", str(tmp / "slurm_run")])
    assert re.search(r"job \d+: COMPLETED, restarts 0, run finished at step 1150, last checkpoint step-00001150",
                     status.stdout), status.stdout


def test_time_limit_warning_checkpoints_requeues_and_resumes_exactly(slurm_runs):
    tmp, runs = slurm_runs
    runs["reference"].result()
    run_dir = runs["time_limit"].result()
    assert "SIGUSR1 received" in logs(run_dir)
    # One line per node, not torch elastic's SignalException traceback and ChildFailedError table.
    assert "the training processes checkpointed and exited with status 75" in logs(run_dir)
    assert "Traceback" not in logs(run_dir) and "SignalException" not in logs(run_dir)
    assert weights(run_dir) == weights(tmp / "slurm_run")


def test_scancel_usr1_behaves_the_same(slurm_runs):
    tmp, runs = slurm_runs
    runs["reference"].result()
    assert weights(runs["scancel"].result()) == weights(tmp / "slurm_run")


def test_cancel_checkpoints_and_stops_for_good(slurm_runs):
    run_dir = slurm_runs[1]["cancel"].result()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] >= 100
    assert (run_dir / "checkpoints" / f"step-{status['step']:08d}").is_dir()
    log = logs(run_dir)
    assert "SIGTERM received (scancel or preemption)" in log and "not requeueing" in log
    assert "Traceback" not in log and "SignalException" not in log
    again = run_cli([sys.executable, "-m", "launcher.slurm", "cancel", str(run_dir)])
    # Slurm forgets a finished job after MinJobAge: on a busy machine the second cancel may come later.
    assert again.returncode == 0 and re.search(r"(is CANCELLED|is unknown to Slurm now); nothing to cancel",
                                               again.stdout), again.stdout


def test_an_experiment_runs_as_a_job_array_that_requeues_and_cancels(slurm_runs, tmp_path):
    """`python -m launcher.experiment submit` on the test cluster: the trials as arrays (split at
    --max-array-size, %K at --max-parallel); a task that hits its time-limit warning checkpoints,
    requeues itself and resumes exactly (its weights equal a local run of its recipe); `cancel`
    checkpoints and stops the others for good; `status` says where each stands, with its job."""
    path = slurm_runs[1]["experiment"].result()
    experiment = path.parent / "exp"
    seed0 = experiment / "00-baseline" / "seed-0"
    log = logs(seed0)
    # The time-limit warning (or, on a loaded machine, the limit itself: SIGTERM) made it checkpoint.
    assert "requeueing (restart 1" in log and "resumed from" in log and "run state: finished" in log, log
    assert "#SBATCH --array=0-1%2" in next((experiment / "slurm").glob("submit-*-0.sbatch")).read_text()
    local = run_cli([sys.executable, "-m", "launcher", str(seed0 / "slurm" / "recipe.yaml"),
                     f"run.dir={tmp_path / 'local'}"])
    assert local.returncode == 0, local.stderr[-3000:]
    assert weights(seed0) == weights(tmp_path / "local")
    for seed in (1, 2):
        run_dir = experiment / "00-baseline" / f"seed-{seed}"
        assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted", logs(run_dir)
        assert "not requeueing" in logs(run_dir)
    status = run_cli([sys.executable, "-m", "launcher.experiment", "status", str(path), "--json"])
    states = {r["trial"]: (r["state"], r["job"]) for r in json.loads(status.stdout)}
    assert [s for s, _ in states.values()] == ["finished", "interrupted", "interrupted"], states
    assert all(job for _, job in states.values())
    report = run_cli([sys.executable, "-m", "launcher.experiment", "report", str(path)])
    assert report.returncode == 0 and "2 trial(s) not finished" in report.stdout, report.stdout + report.stderr


def test_time_limits_in_slurm_forms():
    from launcher.cluster.slurm import time_limit_seconds

    assert [time_limit_seconds(t) for t in ("30", "4:30", "1:00:00", "2-0", "1-1:30", "1-0:0:5")] == \
        [1800, 270, 3600, 172800, 91800, 86405]


def test_the_nodes_say_torch_elastics_exit_barrier_race_in_one_line(capsys):
    """A node whose agent finds the barrier's store gone after a finished run (the node hosting it
    left first; it made test_time_limit_warning... fail once on its no-traceback check) prints one
    line, not torch elastic's traceback; the agent's other errors are kept."""
    import logging

    from torch.distributed.elastic.agent.server import api

    from launcher.cluster.node import _quiet_exit_barrier, quiet_exit_barrier_race

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    api.logger.addHandler(handler)
    assert quiet_exit_barrier_race() is api.logger  # what launcher.node's main() installs
    try:
        try:
            raise RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed.")
        except RuntimeError:
            # as torch elastic's agent logs it (agent/server/api.py, _exit_barrier)
            api.logger.exception("Error waiting on exit barrier. Elapsed: %s seconds", 0.01)
        api.logger.error("Some other agent error")
    finally:
        api.logger.removeFilter(_quiet_exit_barrier)
        api.logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Some other agent error"]
    assert "left torch elastic's exit barrier before this one" in capsys.readouterr().err


def normalise(script: str, run_dir: Path) -> str:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return (script.replace(str(run_dir), "<RUN_DIR>").replace(accelerate, "<ACCELERATE>")
            .replace(sys.executable, "<PYTHON>").replace(str(REPO), "<WORKDIR>"))


def test_dry_run_matches_the_snapshot(digits, tmp_path):
    recipe = recipe_file(digits, tmp_path, "dry")
    proc = run_cli([sys.executable, "-m", "launcher.slurm", "submit", str(recipe), "--dry-run", "--nodes", "2",
                    "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "gpu", "--account", "lab",
                    "--sbatch=--mem=64G", "--grace", "120", f"run.dir={tmp_path / 'dry_run'}"])
    assert proc.returncode == 0, proc.stderr
    script = normalise(proc.stdout, tmp_path / "dry_run")
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(script)
    assert script == SNAPSHOT.read_text()
    assert not (tmp_path / "dry_run").exists()  # nothing written, nothing submitted


def test_deepspeed_zero3_on_two_nodes_matches_a_local_run(slurm_runs):
    """The recipe picks DeepSpeed; the same sbatch script runs it on 2 nodes (gloo on CPU)."""
    tmp, runs = slurm_runs
    runs["zero3"].result()
    run = tmp / "zero3" / "slurm_run"
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= {
        p.name for p in (run / "checkpoints" / "step-00000046" / "deepspeed").iterdir()}
    assert weights(run) == weights(tmp / "zero3" / "local_run")


def test_fsdp_on_two_nodes_matches_a_local_run(slurm_runs):
    """The recipe picks FSDP; the same sbatch script runs it on 2 nodes, each rank writing its
    shard of every checkpoint."""
    tmp, runs = slurm_runs
    runs["fsdp"].result()
    run = tmp / "fsdp" / "slurm_run"
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {
        p.name for p in (run / "checkpoints" / "step-00000046" / "fsdp").iterdir()}
    assert weights(run) == weights(tmp / "fsdp" / "local_run")


def test_a_sweep_makes_one_run_directory_per_value(cluster, digits, tmp_path):
    recipe = recipe_file(digits, tmp_path, "sweep", epochs=1)
    base = tmp_path / "sweep_run"
    job_id, proc = submit(str(recipe), "--sweep", "seed=3,4", "--time", "10", f"run.dir={base}")
    assert job_id, proc.stderr
    for index, seed in enumerate((3, 4)):
        run_dir = base / f"seed={seed}"
        assert yaml.safe_load((run_dir / "slurm" / "recipe.yaml").read_text())["seed"] == seed
        state = wait_done(f"{job_id}_{index}")
        assert state["JobState"] == "COMPLETED", logs(run_dir)
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
        assert (run_dir / "final" / "model.safetensors").exists()
    status = run_cli([sys.executable, "-m", "launcher.slurm", "status", str(base)])
    assert status.stdout.count("COMPLETED") == 2, status.stdout


def test_bad_input_fails_before_the_queue(cluster, digits, tmp_path):
    recipe = recipe_file(digits, tmp_path, "bad", epochs=1)
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    _, proc = submit(str(recipe), "train.epochz=3")
    assert proc.returncode == 2 and "train.epochz" in proc.stderr and "epochs" in proc.stderr
    # A run directory whose checkpoints another recipe wrote.
    run_dir = tmp_path / "taken"
    every = "plugins.checkpoint.every_epochs=1"
    done = run_cli([sys.executable, "-m", "launcher", str(recipe), every, f"run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-2000:]
    _, proc = submit(str(recipe), every, "optimizer.lr=0.2", f"run.dir={run_dir}")
    assert proc.returncode == 2 and "different recipe (optimizer.lr: 0.05 -> 0.2)" in proc.stderr, proc.stderr
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    # A warning period as long as the job (it would arrive at once and requeue forever).
    _, proc = submit(str(recipe), "--time", "5", "--grace", "300")
    assert proc.returncode == 2 and "--grace 300 s is not shorter than --time 5" in proc.stderr, proc.stderr
    # No sbatch on PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    proc = run_cli([sys.executable, "-m", "launcher.slurm", "submit", str(recipe)], env={"PATH": str(bin_dir)})
    assert proc.returncode == 2 and "'sbatch' is not on PATH" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, message", [
    ([r'run.dir="/tmp/x\ntouch /tmp/pwned"'], "run.dir '/tmp/x\\ntouch /tmp/pwned' holds a control character"),
    (["--job-name", "a\ntouch /tmp/pwned"], "--job-name 'a\\ntouch /tmp/pwned' holds a control character"),
    (["--partition", "gpu\rx"], "--partition 'gpu\\rx' holds a control character"),
    (["--sbatch=--mem=1G\ntouch /tmp/pwned"], "--sbatch 1 '--mem=1G\\ntouch /tmp/pwned' holds a control character"),
    (["model.name=resnet181"], "Unknown model 'resnet181' (model.name). Did you mean 'resnet18'?"),
    (["data.val=/nowhere/val-{0..1}.tar"], "data.val: shard '/nowhere/val-0.tar' does not exist"),
    (["--nodes", "0"], "argument --nodes: 0 must be at least 1"),
    (["--grace", "-5"], "argument --grace: -5 must be at least 1"),
    (["--max-requeues", "x"], "argument --max-requeues: 'x' is not a whole number"),
    (["--cpus-per-task", "0"], "argument --cpus-per-task: 0 must be at least 1"),
    (["--time", "1:2:3:4"], "--time '1:2:3:4': use Slurm's forms"),
])
def test_bad_submissions_are_refused_before_a_script_is_written(digits, tmp_path, capsys, args, message):
    """Checked without a cluster (dry runs in this process): what a run would check first, and
    no user value may add a line of its own to the batch script."""
    from launcher.cluster.slurm import main

    recipe = recipe_file(digits, tmp_path, "bad", epochs=1)
    try:
        code = main(["submit", str(recipe), "--dry-run", *args])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and "#SBATCH" not in captured.out, captured.err
