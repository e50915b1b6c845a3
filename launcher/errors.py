"""User-facing errors: one paragraph that names the problem and the fix, never a traceback."""

from __future__ import annotations

import difflib
import errno
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


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least` ("'x' is not a whole number", "0 must
    be at least 1"), for every command's counts and sizes."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
        return value

    return parse


def shorten(text: str, keep: int = 60) -> str:
    """A value as an error message shows it: a 10 MB value must not become a 10 MB message."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text):,} characters)"


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
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        # Any path a user typed (a shard pattern, a run directory, an --out) may be too long for the
        # file system; that is bad input, not a crash.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: the file name '{shorten(str(err.filename))}' is too long for the file system (at most 255 "
                  "bytes per folder or file name). Check the path you gave.", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no plugin handles it (plugins.checkpoint does)
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted (Ctrl-C); nothing was saved since the last checkpoint", file=sys.stderr)
        return 130
