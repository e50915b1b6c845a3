"""report: per-class metrics equal a hand computation; a real run writes the PNGs (labelled
axes, one curve per class) and report.json, whose accuracy equals the loop's own val/top1;
the command reproduces it from the run directory."""

from __future__ import annotations

import json
import sys

import matplotlib.figure
import numpy as np
import pytest
from PIL import Image

from launcher.loop import train
from launcher.recipe import validate_recipe
from launcher.report import compute
from tests.conftest import run_cli, small_recipe


def test_metrics_equal_a_hand_computation():
    # 3 classes; predictions: argmax of probs
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[.8, .1, .1], [.6, .3, .1], [.2, .7, .1],   # 0,0 right; third predicted 1
                      [.1, .8, .1], [.5, .4, .1],                  # 1 right; second predicted 0
                      [.1, .1, .8]])                               # 2 right
    r = compute(probs, labels, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert b["f1"] == pytest.approx(0.5) and c["f1"] == pytest.approx(1.0)
    # class c is perfectly separated by its score: AUC 1 and AP 1
    assert c["roc_auc"] == pytest.approx(1.0) and c["average_precision"] == pytest.approx(1.0)
    # class a: positives scores .8 .6 .2 vs negatives .1 .5 .1 -> 8 of 9 pairs ordered right
    assert a["roc_auc"] == pytest.approx(8 / 9)
    assert r["macro"]["f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


@pytest.fixture(scope="module")
def reported_run(digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    figures = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):  # inspect what was drawn, not only that a file exists
        figures.append(fig)
        return original(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep
    try:
        ctx = train(validate_recipe(small_recipe(digits, run, train={"epochs": 2}, plugins={"report": {}})))
    finally:
        matplotlib.figure.Figure.savefig = original
    return run, ctx, figures


def test_a_run_writes_the_report(reported_run):
    run, ctx, figures = reported_run
    report = json.loads((run / "report" / "report.json").read_text())
    # The report's accuracy is the loop's own evaluation of the same final model.
    assert report["accuracy"] == pytest.approx(ctx.metrics["val/top1"]) and report["samples"] == 360
    assert sorted(report["per_class"]) == [str(i) for i in range(10)]
    assert np.sum(report["confusion_matrix"]) == 360
    for name in ("curves", "confusion_matrix", "pr_curves", "roc_curves"):
        with Image.open(run / "report" / f"{name}.png") as img:
            assert img.size[0] >= 500 and img.size[1] >= 400, name
    by_title = {ax.get_title(): ax for fig in figures for ax in fig.axes if ax.get_title()}
    for title in ("precision-recall per class (one-vs-rest)", "ROC per class (one-vs-rest)", "loss"):
        ax = by_title[title]
        assert ax.get_xlabel() and ax.get_ylabel(), title
    pr, roc = by_title["precision-recall per class (one-vs-rest)"], by_title["ROC per class (one-vs-rest)"]
    assert len(pr.get_lines()) == 10 and len(roc.get_lines()) == 11  # + the chance diagonal
    assert [t.get_text().split(" ")[0] for t in pr.get_legend().get_texts()] == [str(i) for i in range(10)]
    assert {ln.get_label() for ln in by_title["loss"].get_lines()} == {"train/loss", "val/loss"}


def test_the_command_reproduces_the_report(reported_run, tmp_path):
    run, _, _ = reported_run
    proc = run_cli([sys.executable, "-m", "launcher.report", str(run), "--out", str(tmp_path / "again")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((run / "report" / "report.json").read_text())
    b = json.loads((tmp_path / "again" / "report.json").read_text())
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["per_class"] == b["per_class"]
    bad = run_cli([sys.executable, "-m", "launcher.report", str(tmp_path)])
    assert bad.returncode == 2 and "is not a finished run directory" in bad.stderr
