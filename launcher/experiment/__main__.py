"""Experiments: a ladder of tricks over seeds, a grid, a search, as one command.

    python -m launcher.experiment run FILE [--parallel N] [--processes P] [key=value ...]
    python -m launcher.experiment submit FILE --nodes 1 --gpus-per-node 8 --time 24:00:00 [--max-parallel K]
    python -m launcher.experiment status FILE [--json]     # each trial: pending, running, interrupted, ...
    python -m launcher.experiment report FILE [--out F]    # table, CSV, JSON and plot of what finished
    python -m launcher.experiment cancel FILE              # every trial checkpoints and stops

FILE is an experiment file (see launcher/experiment/spec.py and experiments/). Each trial is an
ordinary run directory under the experiment's folder (<dir>/<rung>/seed-<s>), with the launcher's
own checkpoints: an experiment stopped anywhere and started again reads the finished trials,
resumes the interrupted ones and starts the rest. key=value overrides given here apply to every
trial (and so are part of what each trial ran: a quick look with train.max_steps=2 is recorded
apart from the real runs).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

from launcher.cluster.slurm import add_job_options
from launcher.errors import LauncherError, run_command, whole_number


def _load(args, check: bool = False):
    from launcher.experiment.record import Record
    from launcher.experiment.spec import check_trials, load_experiment

    experiment = load_experiment(args.file, args.overrides)
    trials = experiment.trials(getattr(args, "seeds", None), getattr(args, "rungs", None))
    if check:
        check_trials(experiment, trials)
    return experiment, trials, Record(experiment.record)


def run(args) -> int:
    from launcher.experiment.gather import expected_recipes, gather
    from launcher.experiment.local import Driver, driving
    from launcher.experiment.spec import percent

    experiment, trials, record = _load(args, check=True)  # every trial's recipe checked before any trains
    if experiment.spec.search is not None:
        from launcher.experiment.search import run_search

        return run_search(experiment, trials, record, args)
    expected = expected_recipes(experiment, trials)
    with driving(experiment):
        gathered = gather(experiment, trials, record, expected, training=True)
        pending = [t for t in trials if t.name not in gathered.results]
        print(f"[experiment] {experiment.name}: {len(trials)} trials, {len(trials) - len(pending)} finished, "
              f"{len(pending)} to run ({args.parallel} at a time, {args.processes} process(es) each)", flush=True)
        if experiment.extra:
            (experiment.dir / "variant.json").write_text(json.dumps({"overrides": experiment.extra}, indent=1) + "\n")

        def finished(trial) -> str:
            try:  # records the trial's result with the recipe it ran
                result = gather(experiment, [trial], record, expected, training=True).results.get(trial.name)
            except LauncherError as err:
                print(f"[experiment] {trial.name}: {err}", file=sys.stderr)
                return ""
            if not result:
                return ""
            return f": {result['metric']} " + (f"{100 * result['top1']:.2f}%" if percent(result["metric"])
                                               else f"{result['top1']:.4g}")

        driver = Driver(experiment, args.parallel, args.processes, finished)
        status = driver.run(pending)
    write(experiment, trials, record, expected, None, quiet=True)
    if driver.failed:
        print(f"[experiment] {len(driver.failed)} trial(s) failed: "
              + "; ".join(f"{t.name}: {why}" for t, why in driver.failed), file=sys.stderr)
    print(f"[experiment] report: {experiment.report}")
    return status


def write(experiment, trials, record, expected, out: Optional[Path], quiet: bool = False) -> list[str]:
    from launcher.experiment.gather import gather
    from launcher.experiment.report import build_rows, write_report

    gathered = gather(experiment, trials, record, expected)
    rows = build_rows(experiment, gathered.results, trials)
    pending = sum(1 for t in trials if t.name not in gathered.results)
    lines = write_report(experiment, rows, pending, gathered.left_out, out or experiment.report)
    if not quiet:
        print("\n".join(lines))
    return lines


def report(args) -> int:
    from launcher.experiment.gather import expected_recipes, gather

    experiment, trials, record = _load(args)
    if experiment.spec.search is not None:  # a search runs the baseline with sampled parameters
        from launcher.experiment.search import search_report

        if search_report(experiment, args.out) is None:
            raise LauncherError(f"Experiment {experiment.path}: the search has not started (no study in "
                                f"{experiment.dir}). Run it: python -m launcher.experiment run {experiment.path}")
        return 0
    expected = expected_recipes(experiment, trials)
    gathered = gather(experiment, trials, record, expected)
    if not gathered.results:
        states = {}
        for state in gathered.states.values():
            states[state] = states.get(state, 0) + 1
        why = f" Left out: {'; '.join(gathered.left_out[:5])}." if gathered.left_out else ""
        raise LauncherError(f"Experiment {experiment.path}: no trial has a result yet ("
                            + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + f"; run directories under "
                            f"{experiment.dir}, record {experiment.record}).{why} Run it: python -m launcher.experiment "
                            f"run {experiment.path}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.with_suffix(".table.json").exists():
        # Only a report this command wrote (its .table.json beside it) is replaced: --out may be a typo.
        raise LauncherError(f"--out '{out}' exists and is not a report of this command (no "
                            f"{out.with_suffix('.table.json').name} beside it): choose another file.")
    write(experiment, trials, record, expected, out)
    return 0


def status(args) -> int:
    from launcher.experiment.gather import STATES, expected_recipes, gather, job_of

    experiment, trials, record = _load(args)
    gathered = gather(experiment, trials, record, expected_recipes(experiment, trials))
    rows = [{"trial": t.name, "state": gathered.states[t.name], "job": job_of(t.run_dir),
             "note": gathered.notes.get(t.name)} for t in trials]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["trial"]) for r in rows)
    for r in rows:
        extra = (f"  job {r['job']}" if r["job"] else "") + (f"  ({r['note']})" if r["note"] else "")
        print(f"{r['trial']:{width}s}  {r['state']}{extra}")
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in STATES}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


def cancel(args) -> int:
    """Every trial checkpoints and stops: the local driver gets SIGTERM (and hands it to its
    trials); trials submitted to Slurm are scancelled (they checkpoint and do not requeue)."""
    from launcher.experiment.spec import load_experiment

    experiment = load_experiment(args.file, args.overrides)
    stopped = 0
    driver = experiment.dir / "driver.json"
    if driver.exists() and not (args.seeds or args.rungs):
        import psutil

        try:
            info = json.loads(driver.read_text())
            process = psutil.Process(int(info["pid"]))
            # The pid of a driver killed long ago may belong to another program now.
            if info.get("host") == socket.gethostname() and "launcher.experiment" in " ".join(process.cmdline()):
                process.send_signal(signal.SIGTERM)
                stopped += 1
                print(f"[experiment] sent SIGTERM to the driver (pid {info['pid']}): its running trials checkpoint "
                      "and stop")
        except (psutil.Error, ValueError, KeyError, TypeError, OSError):
            pass
    from launcher.experiment.slurm import cancel_jobs

    stopped += cancel_jobs(experiment, experiment.trials(args.seeds, args.rungs))
    if not stopped:
        print(f"[experiment] {experiment.name}: nothing is running (no driver, no job in the queue)")
    return 0


def submit(args) -> int:
    from launcher.experiment.slurm import submit_experiment

    experiment, trials, record = _load(args, check=True)
    return submit_experiment(experiment, trials, record, args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.experiment", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the trials on this machine (resumes a stopped experiment)")
    r.add_argument("--parallel", type=whole_number(1), default=1, help="trials at once (each its GPUs or CPU share)")
    r.add_argument("--processes", type=whole_number(1), default=1, help="processes (ranks) per trial")
    s = sub.add_parser("submit", help="submit the trials to Slurm as a job array")
    for p in (r, s):
        p.add_argument("--seeds", nargs="+", default=None, help="only these of the experiment's seeds")
        p.add_argument("--rungs", nargs="+", default=None, help="only these rungs (names or numbers, 0 = baseline)")
    add_job_options(s)
    s.add_argument("--max-array-size", type=whole_number(1), default=None,
                   help="split into arrays of at most this many tasks (default: the cluster's MaxArraySize)")
    st = sub.add_parser("status", help="each trial's state (and job)")
    st.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", help="the table, CSV, JSON and plot of the finished trials")
    rp.add_argument("--out", default=None, help="markdown file (default: the experiment's report:, else "
                                                "<dir>/report/report.md); CSV, .table.json and PNG beside it")
    c = sub.add_parser("cancel", help="every running trial checkpoints and stops")
    c.add_argument("--seeds", nargs="+", default=None, help="only the Slurm jobs of these seeds")
    c.add_argument("--rungs", nargs="+", default=None, help="only the Slurm jobs of these rungs")
    for p in sub.choices.values():
        p.add_argument("file", help="the experiment file (YAML)")
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if r.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = rest
    # --seeds and --rungs take several values: overrides written after them land there; move them back.
    for name in ("seeds", "rungs"):
        values = getattr(args, name, None) or []
        args.overrides += [v for v in values if "=" in v or v.startswith("~")]
        kept = [v for v in values if not ("=" in v or v.startswith("~"))]
        if name == "seeds":
            try:
                kept = [int(v) for v in kept]
            except ValueError:
                parser.error(f"--seeds takes whole numbers, got {' '.join(kept)}")
        setattr(args, name, kept or None)
    return run_command(lambda: {"run": run, "submit": submit, "status": status, "report": report,
                                "cancel": cancel}[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
