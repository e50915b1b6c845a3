"""The finished trials' results, kept in one JSON file beside the experiment (or committed with
its report), each with the resolved recipe it was made with: a trial counts only for the recipe
it ran, so a trial made before the recipe under the experiment changed is trained again, never
reported as the new recipe's.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any, Optional

from launcher.errors import LauncherError
from launcher.experiment.results import DamagedRun, check_recorded_result

# Where a run's files are and how it is shown: not what decides its result. The data's file names
# are kept (a subset written as other shards is another experiment); their folders are not.
NOT_THE_RESULT = ("seed", "run.", "data.train", "data.val", "data.cache_dir")


def what_ran(recipe) -> dict:
    """A resolved recipe's settings that decide a run's result, flattened to dotted keys, values
    off their defaults only: a key added to the schema later (with a default that keeps what runs
    did) leaves old records valid; any change of what a run does makes a different dict."""
    from launcher.data.augment import SAME_ON_BOTH_PATHS
    from launcher.config.recipe import flatten
    from launcher.registry import parse_options

    from launcher.registry import get_plugin_class

    tree = recipe.model_dump(mode="json", exclude_defaults=True)
    tree["plugins"] = {name: parse_options(name, options).model_dump(mode="json", exclude_defaults=True)
                       for name, options in recipe.plugins.items() if not get_plugin_class(name).reports_only}
    flat = flatten(tree)
    ops = {key.split(".")[2] for key in flat if key.startswith("data.augment.")}
    ignored = NOT_THE_RESULT + (("data.augment_on",) if ops <= SAME_ON_BOTH_PATHS else ())
    kept = {k: v for k, v in sorted(flat.items()) if not any(k == n or k.startswith(n) for n in ignored)}
    if recipe.optimizer.lr_base is not None:  # lr follows from lr_base and the processes, set by the run
        kept = {k: v for k, v in kept.items() if k not in ("optimizer.lr", "optimizer.lr_base_global_batch")}
    for split in ("train", "val"):
        pattern = getattr(recipe.data, split)
        if pattern:
            kept[f"data.{split} (file names)"] = "::".join(p.rsplit("/", 1)[-1] for p in pattern.split("::"))
    return kept


def differences(recorded: dict, expected: dict) -> str:
    keys = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
    return "; ".join(f"{k}: {recorded.get(k, '(default)')!r} -> {expected.get(k, '(default)')!r}" for k in keys[:4]) \
        + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")


class Record:
    """{"trials": [{trial, rung, combo, seed, recipe, result}, ...]}, written whole under a lock and
    re-read before each addition, so drivers on several machines (or Slurm tasks) share it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {e["trial"]: e for e in self.read(self.path)} if self.path.exists() else {}

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The record's entries; a record that is not one, or holds an impossible value (a top-1 of
        1.5, -0.4, text, NaN), is refused naming the entry: it would be reported as a result."""
        try:
            entries = json.loads(path.read_text())["trials"]
            if not isinstance(entries, list):
                raise TypeError("'trials' is not a list")
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("trial"), str) \
                        or not isinstance(entry.get("recipe"), dict):
                    raise TypeError(f"an entry is not a trial's record: {str(entry)[:120]}")
                check_recorded_result(entry.get("result"), f"trial {entry['trial']!r} of record '{path}'")
        except DamagedRun as err:
            raise LauncherError(f"{err}. Fix or remove that entry (the trial is then trained again).") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LauncherError(f"'{path}' is not an experiment record ({type(err).__name__}: {err}). Move it "
                                "away to start a new one.") from None
        return entries

    def find(self, trial: str, recipe: dict) -> Optional[dict]:
        """The recorded result of `trial` made with `recipe` (what_ran), else None."""
        entry = self.entries.get(trial)
        return entry["result"] if entry is not None and entry["recipe"] == recipe else None

    def stale(self, trial: str, recipe: dict) -> Optional[str]:
        """When `trial` is recorded with another recipe: how it differs."""
        entry = self.entries.get(trial)
        if entry is None or entry["recipe"] == recipe:
            return None
        return differences(entry["recipe"], recipe)

    def add(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = {e["trial"]: e for e in self.read(self.path)} if self.path.exists() else {}
            on_disk[entry["trial"]] = entry
            self.entries = dict(sorted(on_disk.items()))
            temporary = self.path.with_name(self.path.name + ".tmp")  # whole, then renamed: a kill keeps the last
            temporary.write_text(json.dumps({"trials": list(self.entries.values())}, indent=1) + "\n")
            temporary.replace(self.path)
