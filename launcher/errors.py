"""User-facing errors: one paragraph that names the problem and the fix, never a traceback."""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Iterable


class LauncherError(Exception):
    """An error caused by the user's input (recipe, data, command line).

    `python -m launcher` prints these as a single paragraph and exits with status 2.
    """


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    guess = nearest(word, choices)
    return f" Did you mean '{guess}'?" if guess else ""


def run_command(command: Callable[[], int]) -> int:
    """Run a command-line entry point: a LauncherError becomes one `error: ...` paragraph and
    exit status 2. Under several processes every rank fails alike, so only rank 0 prints it, unless
    the training loop marked which rank failed first (`failed_first`, set under its watchdog)."""
    try:
        return command()
    except LauncherError as err:
        first = getattr(err, "failed_first", None)
        if first or (first is None and os.environ.get("RANK", "0") == "0"):
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no plugin handles it (plugins.checkpoint does)
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted (Ctrl-C); nothing was saved since the last checkpoint", file=sys.stderr)
        return 130
