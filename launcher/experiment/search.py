"""A search (the experiment file's `search:`): Optuna decides each trial's parameters from the
trials before it, the launcher runs it as an ordinary run directory (<dir>/search/trial-NNNN) of
the baseline with those values, and the trial's evaluations feed Optuna's pruner.

- The study lives beside the experiment, in a real database: Optuna's RDB storage on SQLite
  (<dir>/search.db), or its journal file (<dir>/search.journal) on a shared file system.
- The parameters are decided here, before the trial's processes start, and written into its
  recipe: every rank trains the same values (Optuna's own DDP integration asks on each rank).
- A pruned trial stops on every rank together (plugins/optuna_pruning.py), with a last
  checkpoint and status "pruned"; the study records it as pruned.
- A trial interrupted (kill -9, Ctrl-C) continues its own Optuna trial when the search runs
  again: its number is in <run dir>/search_trial.json, and it is resumed, never asked anew.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from launcher.errors import LauncherError
from launcher.experiment.spec import Experiment, Trial, _yaml_value, metric_of

TRIAL_FILE = "search_trial.json"


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise LauncherError("search: needs Optuna, which is not installed. Install the search extra: pip install "
                            "'.[search]' (from the launcher's folder), or pip install optuna.") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(experiment: Experiment) -> str:
    """The launcher's form of the study's storage (open_storage reads it)."""
    if experiment.spec.search.storage == "journal":
        return f"journal:{(experiment.dir / 'search.journal').resolve()}"
    return f"sqlite:///{(experiment.dir / 'search.db').resolve()}"


def distributions(spec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, p in spec.parameters.items():
        if p.type == "categorical":
            out[key] = CategoricalDistribution(p.choices)
        elif p.type == "int":
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def open_storage(url: str):
    """An Optuna storage from the launcher's form of it (storage_url): sqlite:///PATH or journal:PATH.
    The driver and each trial's pruning plugin open the study through this."""
    optuna = require_optuna()
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    return optuna.storages.RDBStorage(url)


def make_pruner(name: str, startup_trials: int):
    """The search's pruner; Optuna keeps none in the storage, so each trial's plugin builds the same."""
    optuna = require_optuna()
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=startup_trials),
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "none": optuna.pruners.NopPruner}[name]()


def study_of(experiment: Experiment):
    """The experiment's study (created on the first run, loaded after)."""
    optuna = require_optuna()
    spec = experiment.spec.search
    experiment.dir.mkdir(parents=True, exist_ok=True)
    sampler = (optuna.samplers.TPESampler(seed=spec.seed) if spec.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.seed))
    study = optuna.create_study(study_name=experiment.name, storage=open_storage(storage_url(experiment)),
                                sampler=sampler, pruner=make_pruner(spec.pruner, spec.startup_trials),
                                direction=spec.direction, load_if_exists=True)
    if not study.trials and spec.enqueue:
        for point in spec.enqueue:
            study.enqueue_trial(point)
    return study


def search_trial(experiment: Experiment, number: int, params: dict[str, Any]) -> Trial:
    """The run of Optuna trial `number`: the baseline with the trial's parameters, pruned by it."""
    name = f"search/trial-{number:04d}"
    seed = experiment.spec.seeds[0]
    spec = experiment.spec.search
    pruning = json.dumps({"storage": storage_url(experiment), "study": experiment.name, "trial": number,
                          "metric": experiment.spec.metric, "pruner": spec.pruner,
                          "startup_trials": spec.startup_trials})
    overrides = [*experiment.trial_overrides(0, {}), *(f"{k}={_yaml_value(v)}" for k, v in params.items()),
                 f"plugins.optuna_pruning={pruning}"]
    return Trial(0, experiment.spec.rungs[0].name, "search", dict(params), seed, experiment.dir / name, name,
                 overrides, search_number=number)


def known_trials(experiment: Experiment) -> dict[int, Trial]:
    """The search trials that have a run directory (started at least once), by Optuna number."""
    out = {}
    for path in sorted((experiment.dir / "search").glob(f"trial-*/{TRIAL_FILE}")):
        info = json.loads(path.read_text())
        out[info["number"]] = search_trial(experiment, info["number"], info["params"])
    return out


def run_search(experiment: Experiment, trials, record, args) -> int:
    """Run (or continue) the search on this machine: resume the trials a stop interrupted, then ask
    Optuna for new ones until the study has `trials` of them."""
    optuna = require_optuna()

    from launcher.experiment.gather import trial_state
    from launcher.experiment.local import Driver, driving

    spec = experiment.spec.search
    with driving(experiment):
        study = study_of(experiment)
        TrialState = optuna.trial.TrialState
        known = known_trials(experiment)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        resume = []
        for number, trial in known.items():
            if states.get(number) != TrialState.RUNNING:
                continue
            state = trial_state(trial.run_dir)
            if state in ("finished", "pruned", "failed"):
                tell(study, trial, state, experiment)  # the driver stopped before it could say
            else:
                resume.append(trial)
        # Asked before a kill, but never started: Optuna holds them as RUNNING with no run directory.
        orphans = [n for n, s in states.items() if s == TrialState.RUNNING and n not in known]
        for number in orphans:
            study.tell(number, state=TrialState.FAIL)
        distributions_ = distributions(spec)
        asked = {"count": len(known)}  # every trial that started counts; orphans and enqueued ones do not

        def next_trial() -> Optional[Trial]:
            if resume:
                return resume.pop(0)
            if asked["count"] >= spec.trials:
                return None
            optuna_trial = study.ask(distributions_)
            asked["count"] += 1
            params = dict(optuna_trial.params)
            trial = search_trial(experiment, optuna_trial.number, params)
            trial.run_dir.mkdir(parents=True, exist_ok=True)
            (trial.run_dir / TRIAL_FILE).write_text(json.dumps({"number": optuna_trial.number,
                                                               "params": params}) + "\n")
            return trial

        def finished(trial: Trial) -> str:
            state = trial_state(trial.run_dir)
            value = tell(study, trial, state, experiment)
            if state == "pruned":
                return f": pruned ({json.dumps(trial.combo)})"
            return f": {value:.4f} ({json.dumps(trial.combo)})" if value is not None else ""

        already = sum(1 for n in known if states.get(n) in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        print(f"[experiment] {experiment.name}: search of {spec.trials} trials ({spec.sampler}, pruner "
              f"{spec.pruner}), {already} done, {len(resume)} to resume; study {storage_url(experiment)}",
              flush=True)
        driver = Driver(experiment, args.parallel, args.processes, finished)
        status = driver.run(next_trial, spec.trials)
        for trial, _ in driver.failed:
            tell(study, trial, "failed", experiment)
    search_report(experiment, None)
    return status


def tell(study, trial: Trial, state: str, experiment: Experiment) -> Optional[float]:
    """Say how a trial ended; returns its value when it finished."""
    import optuna

    from launcher.experiment.results import run_result

    TrialState = optuna.trial.TrialState
    current = next(t.state for t in study.get_trials(deepcopy=False) if t.number == trial.search_number)
    if current != TrialState.RUNNING:
        return None
    if state == "finished":
        try:
            result = run_result(trial.run_dir, metric_of(experiment.spec))
        except LauncherError as err:
            print(f"[experiment] {trial.name}: {err}", file=sys.stderr)
            study.tell(trial.search_number, state=TrialState.FAIL)
            return None
        study.tell(trial.search_number, result["top1"])
        return result["top1"]
    if state == "pruned":
        study.tell(trial.search_number, state=TrialState.PRUNED)
    elif state == "failed":
        study.tell(trial.search_number, state=TrialState.FAIL)
    return None


def search_report(experiment: Experiment, out: Optional[str]) -> Optional[Path]:
    """search.md (every trial: parameters, value, state; the best) and Optuna's parameter-
    importance plot, beside the experiment's report."""
    optuna = require_optuna()
    if not (experiment.dir / "search.db").exists() and not (experiment.dir / "search.journal").exists():
        return None
    study = study_of(experiment)
    folder = (Path(out) if out else experiment.report).parent
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(experiment.spec.search.parameters)
    lines = [f"# Search: {experiment.spec.title or experiment.name}", "",
             f"{len(study.trials)} trials, {experiment.spec.search.sampler} sampler, "
             f"{experiment.spec.search.pruner} pruner, {experiment.spec.search.direction} {experiment.spec.metric}; "
             f"study `{storage_url(experiment)}`.", "",
             "| trial | " + " | ".join(keys) + " | value | state | steps reported |",
             "|---|" + "---|" * len(keys) + "---|---|---|"]
    for t in study.trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        lines.append(f"| {t.number} | " + " | ".join(f"{t.params.get(k, '-')}" for k in keys)
                     + f" | {value} | {t.state.name.lower()} | {len(t.intermediate_values)} |")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        lines += ["", f"Best: trial {best.number}, {experiment.spec.metric} {best.value:.4f}, with "
                  + ", ".join(f"`{k}={v}`" for k, v in best.params.items()) + "."]
    if len(complete) >= 2 and len(keys) >= 1:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import warnings

            from optuna.visualization.matplotlib import plot_param_importances

            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

            axes = plot_param_importances(study)
            axes.figure.tight_layout()
            axes.figure.savefig(folder / "search_importance.png", dpi=110)
            lines += ["", "![parameter importance](search_importance.png)"]
        except (ValueError, RuntimeError, ImportError) as err:  # too few distinct values to rank them
            lines += ["", f"(No parameter-importance plot: {err})"]
    path = folder / "search.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
