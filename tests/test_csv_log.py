"""The csv_log plugin: metrics.csv holds the same rows and values as metrics.jsonl."""

from __future__ import annotations

import csv
import json

from launcher.loop import train
from launcher.config.load import validate_recipe
from tests.conftest import small_recipe


def test_metrics_csv_equals_metrics_jsonl_column_by_column(digits, tmp_path):
    run = tmp_path / "run"
    train(validate_recipe(small_recipe(digits, run, train={"epochs": 2, "max_steps": 50},
                                       plugins={"csv_log": {}, "ema": {"decay": 0.9}})))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0])[:2] == ["step", "epoch"]
    assert {"train/loss", "val/top1", "val_ema/top1"} <= set(table[0])
    for row, line in zip(rows, table):
        for key, value in line.items():
            assert (float(value) == row[key]) if value != "" else key not in row, (row["step"], key)
