"""Running an experiment's trials on this machine: one after another, or --parallel N at once
(each on its own GPUs, or on the CPU with its share of the cores), each trial an ordinary launch
of the launcher (`python -m launcher`, or launcher.node with --processes P ranks) in its own run
directory, so it checkpoints and resumes as any run does.

A stop anywhere costs at most the work since each trial's last checkpoint: Ctrl-C or SIGTERM to
the driver reaches every trial, which checkpoints at the end of its step; a driver killed with
kill -9 takes its trials with it (they get SIGTERM from the kernel: PR_SET_PDEATHSIG, so they
checkpoint too); a trial killed alone is resumed when the experiment runs again.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from launcher.errors import LauncherError

EXIT_PREEMPTED = 75  # a trial checkpointed on a signal
PR_SET_PDEATHSIG = 1


def _die_with_the_driver() -> None:
    """In the trial's process, before exec: SIGTERM when the driver dies (even by kill -9), so a
    trial never trains on without it (it would hold its run directory's lock) and checkpoints."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    import torch  # only where a GPU may be: torch takes seconds to import

    return torch.cuda.device_count()


def gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(gpu_count())]


@dataclass
class Slot:
    """What one running trial gets: its GPUs (none on the CPU) and its CPU threads."""

    gpus: list[str]
    threads: int


def slots(parallel: int, processes: int) -> list[Slot]:
    gpus = gpu_ids()
    if gpus:
        if parallel * processes > len(gpus):
            raise LauncherError(f"--parallel {parallel} x --processes {processes} needs {parallel * processes} GPUs; "
                                f"this machine shows {len(gpus)}. Lower --parallel or --processes.")
        per = processes
        return [Slot(gpus[i * per:(i + 1) * per], max(1, (os.cpu_count() or 1) // parallel)) for i in range(parallel)]
    cores = os.cpu_count() or 1
    share = max(1, cores // (parallel * processes))
    if "OMP_NUM_THREADS" in os.environ:  # the user's setting is an upper bound (the tests run with 1)
        share = max(1, min(share, int(os.environ["OMP_NUM_THREADS"] or share)))
    return [Slot([], share) for _ in range(parallel)]


def trial_command(recipe_file: Path, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "launcher", str(recipe_file)]
    from launcher.strategies.select import free_port

    # launcher.node: accelerate launch, with SIGTERM handed to the ranks (no 30 s limit, no traceback).
    return [sys.executable, "-m", "launcher.node", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "launcher", str(recipe_file)]


@contextlib.contextmanager
def driving(experiment):
    """One driver per experiment folder (its lock, as a run directory has), and driver.json naming
    it, so that `cancel` can find it; removed when the driver ends."""
    from launcher.runlog import RunDirLock

    experiment.dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(experiment.dir)
    problem = lock.acquire_main()
    if problem:
        raise LauncherError(problem.replace("run directory", "experiment folder").replace(
            "another run", "another experiment driver"))
    info = experiment.dir / "driver.json"
    try:
        info.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        yield
    finally:
        info.unlink(missing_ok=True)
        lock.release()


@dataclass
class Running:
    trial: object
    process: subprocess.Popen
    slot: Slot
    started: float
    log: object


class Driver:
    """Starts trials into free slots and collects them as they end."""

    def __init__(self, experiment, parallel: int, processes: int, on_finished, quiet: bool = False):
        self.experiment, self.processes = experiment, processes
        self.free = slots(parallel, processes)
        self.running: list[Running] = []
        self.on_finished = on_finished  # trial -> a summary to print, for each trial that exits 0
        self.stop_signal: Optional[int] = None
        self.failed: list[tuple[object, str]] = []
        self.interrupted: list[object] = []
        self.quiet = quiet

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            print(f"[experiment] {signal.Signals(signum).name}: the running trials checkpoint and stop; no new trial "
                  "starts", file=sys.stderr, flush=True)
        self.stop_signal = signum
        for run in self.running:
            if signum != signal.SIGINT:  # Ctrl-C reaches the trials from the terminal already
                try:
                    run.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self, pending, total: Optional[int] = None) -> int:
        """Run `pending` (a list of trials, or a callable that returns the next trial or None when
        there is none to start now: a search asks its sampler as slots free up)."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if isinstance(pending, list):
            queue = list(pending)
            total = len(queue)
            pending = lambda: queue.pop(0) if queue else None  # noqa: E731
        try:
            done = 0
            while True:
                while self.free and self.stop_signal is None:
                    trial = pending()
                    if trial is None:
                        break
                    self._start(trial)
                if not self.running:
                    break  # nothing runs and nothing more could start
                ended = self._reap()
                if not ended:
                    time.sleep(0.1)
                    continue
                for run, status, cpu in ended:
                    done += 1
                    self._ended(run, status, cpu, f"{done}/{total}" if total else f"{done}")
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if self.stop_signal is not None:
            return 130 if self.stop_signal == signal.SIGINT else EXIT_PREEMPTED
        if self.failed:
            return 1
        return EXIT_PREEMPTED if self.interrupted else 0  # 75: run the experiment again to finish them

    def _start(self, trial) -> None:
        slot = self.free.pop(0)
        run_dir: Path = trial.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe = self.experiment.trial_recipe(trial)
        recipe_file = run_dir / "trial.yaml"  # what the trial trains, frozen when it starts
        recipe_file.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        env = {**os.environ, "OMP_NUM_THREADS": str(slot.threads), "CUDA_VISIBLE_DEVICES": ",".join(slot.gpus)}
        log = open(run_dir / "trial.log", "a")
        log.write(f"[experiment] {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: "
                  f"trial {trial.name} starts\n")
        log.flush()
        process = subprocess.Popen(trial_command(recipe_file, self.processes), stdout=log,
                                   stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_the_driver)
        self.running.append(Running(trial, process, slot, time.perf_counter(), log))
        if not self.quiet:
            where = f"GPUs {','.join(slot.gpus)}" if slot.gpus else f"{slot.threads} CPU thread(s)"
            print(f"[experiment] {trial.name}: started ({where}; log {run_dir / 'trial.log'})", flush=True)

    def _reap(self) -> list[tuple[Running, int, float]]:
        """The trials that ended, with their exit status and CPU seconds (their process tree's:
        os.wait4 returns what the trial and the ranks it waited for used)."""
        ended = []
        for run in list(self.running):
            try:
                pid, status, usage = os.wait4(run.process.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status, usage = run.process.pid, 0, None
            if pid == 0:
                continue
            run.process.returncode = os.waitstatus_to_exitcode(status)
            self.running.remove(run)
            self.free.append(run.slot)
            run.log.close()
            cpu = (usage.ru_utime + usage.ru_stime) if usage is not None else 0.0
            ended.append((run, run.process.returncode, cpu))
        return ended

    def _ended(self, run: Running, status: int, cpu: float, progress: str) -> None:
        trial = run.trial
        seconds = time.perf_counter() - run.started
        timing = trial.run_dir / "trial_time.json"
        try:  # summed over the sittings a trial took
            before = json.loads(timing.read_text()) if timing.exists() else {}
        except (OSError, ValueError):
            before = {}
        timing.write_text(json.dumps({"seconds": before.get("seconds", 0.0) + seconds,
                                      "cpu_seconds": before.get("cpu_seconds", 0.0) + cpu}) + "\n")
        if status == 0:
            summary = self.on_finished(trial)
            if not self.quiet:
                print(f"[experiment] {trial.name}: finished in {seconds:.0f} s{summary} ({progress})", flush=True)
        elif status in (EXIT_PREEMPTED, 130) or status < 0:  # a signal stopped it (kill -9 too): resumable
            self.interrupted.append(trial)
            print(f"[experiment] {trial.name}: interrupted (exit {status}); it resumes from its last checkpoint "
                  "when the experiment runs again", flush=True)
        else:
            from launcher.experiment.gather import failure_of

            why = failure_of(trial.run_dir)
            self.failed.append((trial, why))
            print(f"[experiment] {trial.name}: failed (exit {status}): {why} (log {trial.run_dir / 'trial.log'})",
                  file=sys.stderr, flush=True)
