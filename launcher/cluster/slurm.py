"""Submit recipes to Slurm and follow them:

    python -m launcher.slurm submit RECIPE [key=value ...] [--nodes 2 --gpus-per-node 8 --time 24:00:00
                                    --partition gpu --account A --sbatch="--mem=64G" ...]
    python -m launcher.slurm submit RECIPE --dry-run            # print the batch script, submit nothing
    python -m launcher.slurm submit RECIPE --sweep seed=0,1,2   # a job array, one run directory per value
    python -m launcher.slurm status RUN_DIR                     # job, state, restarts, last checkpoint
    python -m launcher.slurm cancel RUN_DIR                     # stop for good (checkpoint, no requeue)

`submit` validates the recipe and the run directory before anything waits in a queue,
writes the resolved recipe to <run dir>/slurm/recipe.yaml (the job trains exactly that),
fills the batch-script template (slurm/train.sbatch; --template for your own), and calls
sbatch. The template starts one `accelerate launch` per node with srun (launcher.node),
checkpoints on the time-limit warning (SIGUSR1) and requeues itself, or checkpoints on
SIGTERM (scancel, preemption) and ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from launcher.errors import LauncherError, run_command, whole_number
from launcher.runlog import checkpoints_dir, status_file

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"


def _require(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise LauncherError(f"'{command}' is not on PATH: this machine is not a Slurm submit host. Run on a login "
                            "node of your cluster (or load its Slurm module); slurm/cluster.sh starts a local "
                            "test cluster.")
    return path


def time_limit_seconds(value: str) -> int:
    """Slurm's time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = value.rpartition("-") if "-" in value else ("", "", value)
    parts = [int(p) for p in rest.split(":")]
    if days:
        seconds = [3600, 60, 1][:len(parts)]
        return int(days) * 86400 + sum(p * m for p, m in zip(parts, seconds))
    seconds = {1: [60], 2: [60, 1], 3: [3600, 60, 1]}[len(parts)]
    return sum(p * m for p, m in zip(parts, seconds))


def parse_sweep(items: list[str]) -> list[list[str]]:
    """['seed=0,1', 'optimizer.lr=0.1,0.2'] -> every combination as a list of overrides."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise LauncherError(f"--sweep '{item}': expected KEY=V1,V2,... (e.g. --sweep seed=0,1,2).")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _task_dir(base: Path, overrides: list[str]) -> Path:
    name = ",".join(o.replace("/", "_") for o in overrides)
    return base / name if name else base


def render(template: str, values: dict[str, str]) -> str:
    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise LauncherError(f"the batch-script template uses {{{{ {key} }}}}, which submit does not know; "
                                f"known: {', '.join(sorted(values))}.")
        return values[key]

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", fill, template)


def build_script(args, run_dirs: list[Path], base: Path, job_name: str) -> str:
    procs = args.procs_per_node or args.gpus_per_node or 1
    extra = []
    if args.gpus_per_node:
        extra.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.partition:
        extra.append(f"--partition={args.partition}")
    if args.account:
        extra.append(f"--account={args.account}")
    if len(run_dirs) > 1:
        extra.append(f"--array=0-{len(run_dirs) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else ""))
    extra += args.sbatch
    accelerate_args = []
    if args.nodes * procs > 1:
        accelerate_args.append("--multi_gpu")  # also what connects N CPU processes (gloo)
    accelerate_args += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # precision is the recipe's (amp)
    environment = ["export CUDA_VISIBLE_DEVICES=  # a CPU job"] if not args.gpus_per_node else []
    output = base / "slurm" / ("%x-%A_%a.out" if len(run_dirs) > 1 else "%x-%j.out")
    values = {
        "job_name": job_name,
        "nodes": str(args.nodes),
        "cpus_per_task": str(args.cpus_per_task),
        "time": args.time,
        "grace": str(args.grace),
        "output": str(output),
        "extra_sbatch": "\n".join(f"#SBATCH {line}" for line in extra),
        "workdir": shlex.quote(os.getcwd()),
        "run_dirs": " ".join(shlex.quote(str(d)) for d in run_dirs),
        "max_requeues": str(args.max_requeues),
        "procs_per_node": str(procs),
        "environment": "\n".join(environment),
        "accelerate": shlex.quote(str(Path(sys.executable).with_name("accelerate"))),
        "accelerate_args": " ".join(accelerate_args),
        "python": shlex.quote(sys.executable),
    }
    template = Path(args.template).read_text() if args.template else TEMPLATE.read_text()
    return render(template, values)


def _refuse_control_characters(args, run_dirs: list[Path]) -> None:
    """Every user value rendered into the batch script stays on its line: a newline in a job
    name, a partition or a run directory would otherwise put a command of its own in the script."""
    values = {"--job-name": args.job_name, "--partition": args.partition, "--account": args.account,
              "--time": args.time, "current directory": os.getcwd(),
              **{f"--sbatch {i + 1}": v for i, v in enumerate(args.sbatch)},
              **{"run.dir": str(d) for d in run_dirs}}
    for name, value in values.items():
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise LauncherError(f"{name} {value!r} holds a control character (a newline, tab...), which the batch "
                                "script cannot hold safely. Remove it.")


def submit(args) -> int:
    import yaml

    from launcher.preflight import preflight
    from launcher.config.load import load_recipe
    from launcher.registry import check_run_dir, get_plugin_class

    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", args.time):
        raise LauncherError(f"--time '{args.time}': use Slurm's forms, e.g. 30, 4:00:00 or 1-12:00:00.")
    if args.grace >= time_limit_seconds(args.time):
        raise LauncherError(f"--grace {args.grace} s is not shorter than --time {args.time}: the time-limit warning "
                            "would arrive as the job starts. Ask for more time or a shorter --grace.")
    combos = parse_sweep(args.sweep)
    base_recipe = load_recipe(args.recipe, args.overrides)  # errors now, not after the queue
    base = base_recipe.run_dir.resolve()
    recipes = []
    for combo in combos:
        run_dir = _task_dir(base, combo)
        recipe = load_recipe(args.recipe, [*args.overrides, *combo, f"run.dir={run_dir}"])
        check_run_dir(recipe, run_dir)
        recipes.append((run_dir, recipe))
    if not any(get_plugin_class(n).resumes_runs for n in base_recipe.plugins):
        print("warning: no plugin in this recipe saves checkpoints (add plugins.checkpoint): a job that hits its "
              "time limit or is preempted will start again from scratch.", file=sys.stderr)
    job_name = args.job_name or base_recipe.name
    _refuse_control_characters(args, [d for d, _ in recipes])
    for run_dir, recipe in recipes:
        preflight(recipe)  # what a run checks first: the model exists, the shards are there
    script = build_script(args, [d for d, _ in recipes], base, job_name)
    if args.dry_run:
        print(script, end="")
        return 0

    sbatch = _require("sbatch")
    _require("scontrol")
    for run_dir, recipe in recipes:
        (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
        (run_dir / "slurm" / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    job_id, script_file = sbatch_script(sbatch, script, base)
    for index, (run_dir, _) in enumerate(recipes):
        task = f"{job_id}_{index}" if len(recipes) > 1 else job_id
        record_job(run_dir, task, script_file)
        print(f"submitted job {task}: run directory {run_dir}")
    return 0


def sbatch_script(sbatch: str, script: str, base: Path, suffix: str = "") -> tuple[str, Path]:
    """Write the batch script under base/slurm/ and submit it; (job id, script file)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script_file = base / "slurm" / f"submit-{stamp}{suffix}.sbatch"
    script_file.parent.mkdir(parents=True, exist_ok=True)
    script_file.write_text(script)
    result = subprocess.run([sbatch, "--parsable", str(script_file)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LauncherError(f"sbatch refused the job: {result.stderr.strip() or result.stdout.strip()} "
                            f"(script: {script_file}).")
    return result.stdout.strip().split(";")[0], script_file


def record_job(run_dir: Path, task: str, script_file: Path) -> None:
    """<run dir>/slurm/jobs.json: every job (array task) submitted for the run, the newest last."""
    jobs_file = run_dir / "slurm" / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else []
    record = {"job_id": task, "submitted": time.time(), "script": str(script_file)}
    jobs_file.write_text(json.dumps(jobs + [record], indent=1) + "\n")


def job_state(job_id: str) -> dict:
    """JobState, Restarts and the reason from `scontrol show job` (empty if Slurm forgot the job)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return {}
    result = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout.splitlines()[0] if result.stdout else ""))
    return {k: fields[k] for k in ("JobState", "Restarts", "Reason", "RunTime", "TimeLimit", "NodeList")
            if k in fields}


def describe(run_dir: Path) -> dict:
    jobs_file = run_dir / "slurm" / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else []
    status_path = status_file(run_dir)
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    checkpoints = sorted((p.name for p in checkpoints_dir(run_dir).glob("step-*")), reverse=True) \
        if checkpoints_dir(run_dir).is_dir() else []
    logs = sorted(p.name for p in (run_dir / "slurm").glob("job-*.log")) if (run_dir / "slurm").is_dir() else []
    info = {"run_dir": str(run_dir), "job_id": jobs[-1]["job_id"] if jobs else None,
            "run_state": status.get("state"), "step": status.get("step"),
            "last_checkpoint": checkpoints[0] if checkpoints else None, "logs": logs}
    if jobs:
        info.update(job_state(jobs[-1]["job_id"]))
    return info


def submitted_run_dirs(run_dir: Path) -> list[Path]:
    """The run directory, or the run directories of the sweep it holds, with their job records."""
    if not run_dir.is_dir():
        raise LauncherError(f"'{run_dir}' is not a directory.")
    dirs = [run_dir] if (run_dir / "slurm" / "jobs.json").exists() else \
        sorted(p.parent.parent for p in run_dir.glob("*/slurm/jobs.json"))
    if not dirs:
        raise LauncherError(f"'{run_dir}' has no job submitted by `python -m launcher.slurm submit` "
                            "(no slurm/jobs.json in it or its sweep folders).")
    return dirs


# Job states in which a job may still train (a requeued job waits as PENDING or REQUEUED).
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                 "CONFIGURING", "COMPLETING", "STOPPED", "SIGNALING", "STAGE_OUT")


def cancel(args) -> int:
    """Stop a run for good: scancel its job. A running job's batch script gets SIGTERM, every rank
    checkpoints at the end of its step and the job ends without requeueing itself (train.sbatch);
    a job waiting to restart is removed from the queue. Resubmitting continues from the checkpoint."""
    scancel = _require("scancel")
    for run_dir in submitted_run_dirs(Path(args.run_dir)):
        info = describe(run_dir)
        job, state = info["job_id"], info.get("JobState")
        if state not in ACTIVE_STATES:
            print(f"{run_dir}: job {job} is {state or 'unknown to Slurm now'}; nothing to cancel")
            continue
        result = subprocess.run([scancel, job], capture_output=True, text=True)
        if result.returncode != 0:
            raise LauncherError(f"scancel {job} failed: {result.stderr.strip() or result.stdout.strip()}")
        print(f"{run_dir}: cancelled job {job} ({state}); "
              + ("its ranks checkpoint at the end of their step and it will not requeue itself"
                 if state == "RUNNING" else "it will not start again"))
    return 0


def status(args) -> int:
    infos = [describe(d) for d in submitted_run_dirs(Path(args.run_dir))]
    if args.json:
        print(json.dumps(infos, indent=1))
        return 0
    for info in infos:
        print(f"{info['run_dir']}\n  job {info['job_id']}: {info.get('JobState', 'unknown to Slurm now')}"
              f", restarts {info.get('Restarts', '?')}, run {info['run_state'] or 'not started'}"
              f" at step {info['step'] if info['step'] is not None else '-'}"
              f", last checkpoint {info['last_checkpoint'] or 'none'}, logs {len(info['logs'])}")
    return 0


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """The options of a job's resources and batch script, shared by `launcher.slurm submit` and
    `launcher.experiment submit` (which fills the same template)."""
    positive, not_negative = whole_number(1), whole_number(0)
    parser.add_argument("--nodes", type=positive, default=1)
    parser.add_argument("--gpus-per-node", type=not_negative, default=0)
    parser.add_argument("--procs-per-node", type=positive, default=None,
                        help="training processes per node (default: GPUs, or 1)")
    parser.add_argument("--cpus-per-task", type=positive, default=2, help="CPUs per node task (loader workers need them)")
    parser.add_argument("--time", default="24:00:00", help="time limit (Slurm forms: 30, 4:00:00, 1-12:00:00)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--grace", type=positive, default=300,
                        help="seconds before the time limit to checkpoint (SIGUSR1)")
    parser.add_argument("--max-requeues", type=not_negative, default=3, help="times an interrupted job requeues itself")
    parser.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH option, e.g. --sbatch=--mem=64G")
    parser.add_argument("--max-parallel", type=positive, default=None, help="array tasks running at once (%%K)")
    parser.add_argument("--job-name", default=None, help="default: the recipe's (or experiment's) name")
    parser.add_argument("--template", default=None, help=f"batch-script template (default {TEMPLATE})")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="validate a recipe and submit it with sbatch")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="key=value or ~key, as for python -m launcher")
    add_job_options(s)
    s.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2,...: a job array over these values")
    st = sub.add_parser("status", help="job state, restarts and last checkpoint of a run directory")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true")
    ca = sub.add_parser("cancel", help="stop a run's job for good (it checkpoints first; no requeue)")
    ca.add_argument("run_dir")
    # Overrides may come after the options (argparse stops collecting positionals at the first option).
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if r.startswith("-") or args.command != "submit"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "submit":
        args.overrides += rest
    return run_command(lambda: {"submit": submit, "status": status, "cancel": cancel}[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
