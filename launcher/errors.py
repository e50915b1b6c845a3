"""User-facing errors: one paragraph that names the problem and the fix, never a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


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
