"""csv_log: metrics.jsonl as a spreadsheet, <run dir>/metrics.csv.

One line per metrics row, one column per metric (the union over all rows, `step` and
`epoch` first, blank where a row has no value). Rewritten from metrics.jsonl after every
evaluation and at the end of the run, atomically, so it always agrees with metrics.jsonl,
also after a resume replaced rows. Main process only.

Hooks: setup (refuses a folder where its file goes), on_log (an evaluation's row), on_train_end.
"""

from __future__ import annotations

import csv
import io
import json

from launcher.errors import LauncherError
from launcher.registry import Plugin, register
from launcher.runlog import atomic_write_text, metrics_file


def metrics_csv(jsonl_text: str) -> str:
    rows = [json.loads(line) for line in jsonl_text.splitlines() if line.strip()]
    columns = ["step", "epoch"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


@register("csv_log")
class CsvLog(Plugin):
    """Write metrics.csv next to metrics.jsonl (after each evaluation and at the end)."""

    reports_only = True

    def setup(self, ctx) -> None:
        target = metrics_file(ctx.run_dir).with_suffix(".csv")
        if target.is_dir():
            raise LauncherError(f"plugins.csv_log writes '{target}', which is a folder: move it away.")

    def _write(self, ctx) -> None:
        source = metrics_file(ctx.run_dir)
        if ctx.is_main and source.exists():
            atomic_write_text(source.with_suffix(".csv"), metrics_csv(source.read_text()))

    def on_log(self, ctx, row: dict) -> None:
        if "train/loss" not in row:  # an evaluation's row (written to metrics.jsonl just before)
            self._write(ctx)

    def on_train_end(self, ctx) -> None:
        self._write(ctx)
