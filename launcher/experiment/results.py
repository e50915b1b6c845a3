"""What a finished run scored, read from its run directory or from a record, refusing what cannot
be a result.

A run directory may be damaged (a session cut off mid-write, a disk that filled up, a copy made
halfway) and a record may be edited by hand: each reader here names what is wrong instead of
stopping with a JSONDecodeError, or worse, reporting an accuracy of 150%.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from launcher.errors import LauncherError

# The model one would ship, first found: EMA and TTA where they are on.
SHIPPED = ("val_ema_tta/top1", "val_ema/top1", "val_tta/top1", "val/top1")


class DamagedRun(LauncherError):
    """A run directory whose files cannot give a result (the message says which file and why)."""


def read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedRun(f"{what} '{path}' is missing") from None
    except (OSError, ValueError) as err:
        raise DamagedRun(f"{what} '{path}' is unreadable ({type(err).__name__}: {err})") from None


def run_state(run_dir: Path) -> Optional[str]:
    """status.json's state ('running', 'finished', 'failed', 'interrupted', 'pruned'), or None
    when the run has not written one; DamagedRun when it is there and unreadable."""
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return None
    status = read_json_file(path, "status file")
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        raise DamagedRun(f"status file '{path}' holds no state")
    return status["state"]


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows. A finished run's file ends with a whole line: a line cut short, or one
    that is not JSON, means the file was damaged after the run wrote it."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DamagedRun(f"metrics file '{path}' is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DamagedRun(f"metrics file '{path}' is unreadable ({err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise DamagedRun(f"metrics file '{path}' line {number} is not a whole JSON row (cut short or "
                             "damaged)") from None
        if not isinstance(row, dict):
            raise DamagedRun(f"metrics file '{path}' line {number} is not a row of metrics")
        rows.append(row)
    return rows


def check_accuracy(value: Any, where: str) -> float:
    """A top-1 (or any accuracy) must be a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise DamagedRun(f"{where} is {value!r}, which is not an accuracy (a number from 0 to 1)")
    return float(value)


def check_finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DamagedRun(f"{where} is {value!r}, not a finite number")
    return float(value)


def run_result(run_dir: Path, metric: Optional[str] = None) -> Optional[dict]:
    """The final evaluation of a finished run: {metric, top1, plain_top1, step, ...}; None when
    the run has not finished; DamagedRun naming the file when a finished run cannot give one.
    `metric` is the key to report (default: the shipped model's, SHIPPED)."""
    run_dir = Path(run_dir)
    if run_state(run_dir) != "finished":
        return None
    if not (run_dir / "recipe.yaml").is_file():
        raise DamagedRun(f"'{run_dir}' has no recipe.yaml, so what it ran is unknown")
    evaluations = [row for row in metric_rows(run_dir) if "val/top1" in row]
    if not evaluations:
        raise DamagedRun(f"'{run_dir / 'metrics.jsonl'}' holds no evaluation (no val/top1 row)")
    last = evaluations[-1]
    chosen = metric or next(k for k in SHIPPED if k in last)
    if chosen not in last:
        logged = sorted(k for k in last if k.startswith("val"))
        raise DamagedRun(f"the last evaluation in '{run_dir / 'metrics.jsonl'}' has no '{chosen}' (it logs "
                         f"{', '.join(logged)})")
    where = f"'{run_dir / 'metrics.jsonl'}' step {last.get('step')}"
    check = check_accuracy if re.search(r"top\d+$", chosen) else check_finite
    # "top1" holds the chosen metric's value whatever it is (the records' field name since the ladders).
    result = {"metric": chosen, "top1": check(last[chosen], f"{chosen} in {where}"),
              "plain_top1": check_accuracy(last["val/top1"], f"val/top1 in {where}"), "step": last.get("step")}
    timing = next((t for t in (run_dir / "trial_time.json", run_dir / "ladder_time.json") if t.exists()), None)
    if timing is not None:
        try:
            times = json.loads(timing.read_text())
            result.update(seconds=times.get("seconds"), cpu_seconds=times.get("cpu_seconds"))
        except (OSError, ValueError, AttributeError):
            pass  # the time is shown, not the result: a damaged timing file leaves its cell empty
    return result


def check_recorded_result(result: Any, where: str) -> dict:
    """A result read from a record: refused unless its accuracies are accuracies."""
    if not isinstance(result, dict):
        raise DamagedRun(f"{where} holds no result")
    check_accuracy(result.get("top1"), f"top1 of {where}")
    if "plain_top1" in result:
        check_accuracy(result["plain_top1"], f"plain_top1 of {where}")
    for key in ("seconds", "cpu_seconds"):
        value = result.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise DamagedRun(f"{key} of {where} is {value!r}, not a duration in seconds")
    return result
