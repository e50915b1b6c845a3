"""What each node of a Slurm job runs (slurm/train.sbatch): `accelerate launch`, in this process,
with the stop signals handed to the training processes instead of to torch elastic's agent.

    python -m launcher.node [accelerate launch options] -m launcher RECIPE

Why not plain `accelerate launch`: its agent turns SIGTERM into a `SignalException` traceback
per node, then gives the training processes 30 s before SIGKILL (too short to checkpoint a
large model), and reports their exit 75 ("checkpointed, relaunch") as a `ChildFailedError`
table. Here the agent ignores SIGTERM and SIGUSR1; this process passes them on to the training
processes (Slurm may also signal them directly: a second signal changes nothing), which finish
their step, checkpoint and exit 75; the node then prints one line and exits 75.
Written by hand: neither accelerate nor torch elastic has a switch for this.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Optional

import psutil  # imported now: a signal must be passed on at once, not after an import

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a training process checkpointed on a signal (relaunch to continue)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _pass_on(signum, frame) -> None:
    """Send the signal to the training processes (this process's children)."""
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    print(f"[launcher.node] {signal.Signals(signum).name}: passed on to the training processes, which "
          "checkpoint at the end of their step", file=sys.stderr, flush=True)


def _quiet_exit_barrier(record: logging.LogRecord) -> bool:
    """torch elastic's agents meet at an exit barrier once their training processes have ended. When
    the node that hosts the barrier's store leaves first, another node's wait fails (a race in torch
    elastic, seen on a 2-node job that had finished) and its agent logs the error with a traceback,
    though the run is over and its exit status unchanged. Said in one line instead."""
    if record.getMessage().startswith("Error waiting on exit barrier"):
        print("[launcher.node] the training processes had finished; the other nodes left torch elastic's exit "
              "barrier before this one (nothing is lost)", file=sys.stderr, flush=True)
        return False
    return True


def quiet_exit_barrier_race() -> logging.Logger:
    """Put _quiet_exit_barrier on the logger torch elastic's agent logs through (the module's own
    object, not a name that could drift from it); returns that logger."""
    from torch.distributed.elastic.agent.server import api

    api.logger.addFilter(_quiet_exit_barrier)
    return api.logger


def main(argv: Optional[list[str]] = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    quiet_exit_barrier_race()
    args = launch_command_parser().parse_args(argv)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _pass_on)
    # The agent registers its own handlers (which raise SignalException) for these only
    # (torch.distributed.run's --signals_to_handle; accelerate copies it over from these args).
    args.signals_to_handle = "SIGINT,SIGHUP,SIGQUIT"
    try:
        launch_command(args)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if codes == [EXIT_PREEMPTED]:
            print(f"[launcher.node] the training processes checkpointed and exited with status {EXIT_PREEMPTED} "
                  "(stopped by a signal)", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        first = err.get_first_failure()[1]
        print(f"[launcher.node] a training process failed (exit codes {codes}); the first, rank {first.local_rank} "
              f"on this node: exit {first.exitcode}; its error is above in this log", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
