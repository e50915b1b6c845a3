"""Where each trial stands, and the results of those that finished: read from the record, or from
the trial's run directory (and then recorded with the recipe it ran)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.errors import LauncherError
from launcher.experiment.record import Record, differences, what_ran
from launcher.experiment.results import DamagedRun, run_result, run_state
from launcher.experiment.spec import Experiment, Trial, metric_of

# A trial's state, for `status`: pending (never started), running, interrupted (stopped by a
# signal or killed: a relaunch resumes it), finished, failed, pruned (stopped by the search).
STATES = ("pending", "running", "interrupted", "finished", "failed", "pruned")


@dataclass
class Gathered:
    results: dict[str, dict] = field(default_factory=dict)  # trial name -> result
    states: dict[str, str] = field(default_factory=dict)  # trial name -> one of STATES
    notes: dict[str, str] = field(default_factory=dict)  # trial name -> why it is left out / its error
    left_out: list[str] = field(default_factory=list)  # "name: why", for the report


def expected_recipes(experiment: Experiment, trials: list[Trial]) -> dict[tuple[str, str], dict]:
    """What each group's trials run (what_ran), from the experiment's recipe and overrides."""
    out: dict[tuple[str, str], dict] = {}
    for trial in trials:
        if trial.group not in out:
            try:
                out[trial.group] = what_ran(experiment.trial_recipe(trial))
            except LauncherError as err:
                raise LauncherError(f"Experiment {experiment.path}: rung {trial.rung!r} cannot run: {err}") from None
    return out


def trial_state(run_dir: Path) -> str:
    """One of STATES, from status.json and whether a process holds the run directory."""
    return state_and_problem(run_dir)[0]


def state_and_problem(run_dir: Path) -> tuple[str, Optional[str]]:
    """(one of STATES, why the run directory is damaged or None)."""
    try:
        return _live_state(run_dir, run_state(run_dir)), None
    except DamagedRun as err:
        return "failed", str(err)


def _live_state(run_dir: Path, state: Optional[str]) -> str:
    from launcher.runlog import RunDirLock

    if state is None:
        return "running" if RunDirLock.held(run_dir) else "pending"
    if state == "running" and not RunDirLock.held(run_dir):
        return "interrupted"  # killed (kill -9, a node lost): its last checkpoint resumes
    return state if state in STATES else "failed"


def gather(experiment: Experiment, trials: list[Trial], record: Record, expected: dict[tuple[str, str], dict],
           training: bool = False) -> Gathered:
    """Each trial's state and, for finished ones, its result. A finished run directory that ran
    another recipe than its trial's is left out (when training: refused, since the launcher would
    resume into it); one that is damaged is left out with the reason."""
    from launcher.config.load import load_recipe

    metric = metric_of(experiment.spec)
    out = Gathered()
    for trial in trials:
        recipe = expected[trial.group]
        recorded = record.find(trial.name, recipe)
        if recorded is not None:  # the record answers: its run directory need not be read
            out.results[trial.name], out.states[trial.name] = recorded, "finished"
            continue
        state, problem = state_and_problem(trial.run_dir)
        if problem:
            out.notes[trial.name] = problem
            out.left_out.append(f"{trial.name}: {problem}")
        out.states[trial.name] = state
        if state != "finished":
            if state == "failed" and trial.name not in out.notes:
                out.notes[trial.name] = failure_of(trial.run_dir)
            continue
        try:
            result = run_result(trial.run_dir, metric)
            ran = what_ran(load_recipe(trial.run_dir / "recipe.yaml"))
        except LauncherError as err:
            out.states[trial.name] = "failed"
            out.notes[trial.name] = str(err)
            out.left_out.append(f"{trial.name}: {err}")
            continue
        if ran != recipe:
            why = f"its run directory ran another recipe ({differences(ran, recipe)})"
            if training:
                raise LauncherError(f"{trial.run_dir} holds a finished run of another recipe than trial "
                                    f"{trial.name}'s ({differences(ran, recipe)}). Move it away to train the trial "
                                    "again.")
            out.states[trial.name] = "pending"
            out.notes[trial.name] = why
            out.left_out.append(f"{trial.name}: {why}")
            continue
        record.add({"trial": trial.name, "rung": trial.rung, "combo": trial.combo, "seed": trial.seed,
                    "recipe": recipe, "result": result})
        out.results[trial.name] = result
    return out


def failure_of(run_dir: Path) -> str:
    try:
        status = json.loads((run_dir / "status.json").read_text())
        return str(status.get("error") or "failed")[:300]
    except (OSError, ValueError, AttributeError):
        return "status.json unreadable"


def job_of(run_dir: Path) -> Optional[str]:
    """The Slurm job (array task) that runs the trial, when it was submitted."""
    try:
        jobs = json.loads((run_dir / "slurm" / "jobs.json").read_text())
        return jobs[-1]["job_id"] if jobs else None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
