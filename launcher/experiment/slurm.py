"""An experiment on Slurm: its unfinished trials as one job array (throttled with %K), split into
several arrays when it holds more tasks than the cluster's MaxArraySize. Each task is one trial,
run by the same batch script as `launcher.slurm submit` (slurm/train.sbatch): it checkpoints at
the time-limit warning and requeues itself, exactly as single runs do, and resumes exactly.
"""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from launcher.errors import LauncherError


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices run 0 .. MaxArraySize - 1); Slurm's default 1001."""
    from launcher.cluster.slurm import _require

    result = subprocess.run([_require("scontrol"), "show", "config"], capture_output=True, text=True)
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return int(found.group(1)) if found else 1001


def submit_experiment(experiment, trials, record, args) -> int:
    from launcher.experiment.gather import expected_recipes, gather, trial_state
    from launcher.registry import check_run_dir
    from launcher.cluster.slurm import _refuse_control_characters, _require, build_script, record_job, sbatch_script
    from launcher.cluster.slurm import time_limit_seconds

    if experiment.spec.search is not None:
        raise LauncherError("submit runs ladders and grids; a search decides each trial from the ones before it, so "
                            "run it with `python -m launcher.experiment run` (in a job of its own on a cluster).")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", args.time):
        raise LauncherError(f"--time '{args.time}': use Slurm's forms, e.g. 30, 4:00:00 or 1-12:00:00.")
    if args.grace >= time_limit_seconds(args.time):
        raise LauncherError(f"--grace {args.grace} s is not shorter than --time {args.time}.")
    expected = expected_recipes(experiment, trials)
    gathered = gather(experiment, trials, record, expected, training=True)
    todo = [t for t in trials if t.name not in gathered.results and trial_state(t.run_dir) != "running"]
    if not todo:
        print(f"[experiment] {experiment.name}: every trial has finished or is running; nothing to submit")
        return 0
    recipes = {}
    for trial in todo:
        recipe = experiment.trial_recipe(trial)
        check_run_dir(recipe, trial.run_dir)
        recipes[trial.name] = recipe
    args.sweep = []
    _refuse_control_characters(args, [t.run_dir.resolve() for t in todo])
    size = args.max_array_size or (None if args.dry_run else max_array_size())
    size = size or 1001
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    job_name = args.job_name or experiment.name
    base = experiment.dir.resolve()
    scripts = [build_script(args, [t.run_dir.resolve() for t in chunk], base, job_name) for chunk in chunks]
    if args.dry_run:
        for script in scripts:
            print(script, end="")
        return 0
    sbatch = _require("sbatch")
    _require("scontrol")
    for trial in todo:
        folder = trial.run_dir / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipes[trial.name].to_dict(), sort_keys=False))
    for number, (chunk, script) in enumerate(zip(chunks, scripts)):
        job_id, script_file = sbatch_script(sbatch, script, base, f"-{number}" if len(chunks) > 1 else "")
        for index, trial in enumerate(chunk):
            task = f"{job_id}_{index}" if len(chunk) > 1 else job_id
            record_job(trial.run_dir, task, script_file)
        throttle = f", at most {args.max_parallel} at once" if args.max_parallel else ""
        print(f"[experiment] submitted job {job_id}: {len(chunk)} trial(s) as an array{throttle}")
    print(f"[experiment] follow it: python -m launcher.experiment status {experiment.path}; the table: "
          f"python -m launcher.experiment report {experiment.path}")
    return 0


def cancel_jobs(experiment, trials) -> int:
    """scancel every queued or running task of the experiment's trials: a running one checkpoints
    and ends without requeueing itself (train.sbatch), a waiting one is removed. Returns how many."""
    import shutil

    from launcher.experiment.gather import job_of
    from launcher.cluster.slurm import ACTIVE_STATES, job_state

    if shutil.which("scancel") is None:
        return 0
    cancelled = 0
    for trial in trials:
        job = job_of(trial.run_dir)
        if job is None:
            continue
        state = job_state(job).get("JobState")
        if state not in ACTIVE_STATES:
            continue
        result = subprocess.run(["scancel", job], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"[experiment] scancel {job} failed: {result.stderr.strip()}", file=sys.stderr)
            continue
        cancelled += 1
        print(f"[experiment] {trial.name}: cancelled job {job} ({state})")
    return cancelled


