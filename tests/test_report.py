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
from launcher.config.load import validate_recipe
from launcher.commands.report import compute
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
    assert len(pr.get_lines()) == 12 and len(roc.get_lines()) == 13  # + micro, macro (+ the chance diagonal)
    legend = [t.get_text() for t in pr.get_legend().get_texts()]
    assert [t.split(" ")[0] for t in legend[:10]] == [str(i) for i in range(10)]
    assert legend[10].startswith("micro average (AP ") and legend[11].startswith("macro average (mean AP ")
    assert {ln.get_label() for ln in by_title["loss"].get_lines()} == {"train/loss", "val/loss"}
    # The learning-rate panel draws the logged train/lr; every panel has an epoch axis on top.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr_line = by_title["learning rate"].get_lines()[0]
    assert list(lr_line.get_ydata()) == [r["train/lr"] for r in rows if "train/lr" in r]
    curves_fig = by_title["loss"].figure
    assert sum(any(c.get_xlabel() == "epoch" for c in ax.child_axes) for ax in curves_fig.axes) == 3


def test_the_epoch_axis_maps_steps_to_epochs():
    from launcher.commands.report import epoch_axis

    # 2 epochs of 45 steps, logged every 5 steps (the last step of each epoch logged too)
    rows = [{"step": s, "epoch": (s - 1) // 45, "train/loss": 1.0} for s in list(range(5, 91, 5))]
    to_epoch, to_step = epoch_axis(rows)
    assert to_epoch(0) == 0 and to_epoch(45) == pytest.approx(1.0) and to_epoch(90) == pytest.approx(2.0)
    assert to_step(1.5) == pytest.approx(67.5)
    assert epoch_axis(rows[:5]) == (None, None)  # one epoch logged: nothing to map


def test_averages_equal_scikit_learns_and_many_classes_show_the_most_confused_pairs(tmp_path):
    """Micro/macro ROC AUC and AP against scikit-learn's own averaging; with 100 classes the confusion
    figure is the ranked list of confused pairs, read from the matrix."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.preprocessing import label_binarize

    from launcher.commands.report import plot_confusion, plot_pr_roc

    rng = np.random.default_rng(0)
    labels = np.arange(1000) % 100
    logits = rng.normal(size=(1000, 100))
    logits[np.arange(1000), labels] += 2.5
    logits[labels == 7, 3] += 3.0  # class 7 is often taken for class 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = [f"c{i}" for i in range(100)]
    report = compute(probs, labels, names)
    onehot = label_binarize(labels, classes=range(100))
    averages = report["averages"]
    assert averages["roc_auc_macro"] == pytest.approx(roc_auc_score(onehot, probs, average="macro"))
    assert averages["roc_auc_micro"] == pytest.approx(roc_auc_score(onehot, probs, average="micro"))
    assert averages["average_precision_macro"] == pytest.approx(average_precision_score(onehot, probs, average="macro"))
    assert averages["average_precision_micro"] == pytest.approx(average_precision_score(onehot, probs, average="micro"))
    top = report["most_confused"][0]
    cm = np.asarray(report["confusion_matrix"])
    assert (top["true"], top["predicted"]) == ("c7", "c3") and top["count"] == cm[7, 3]
    assert top["fraction_of_true"] == pytest.approx(cm[7, 3] / 10)
    counts = [p["count"] for p in report["most_confused"]]
    assert len(counts) == 25 and counts == sorted(counts, reverse=True)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    assert counts == sorted(off.ravel(), reverse=True)[:25]

    figures = []
    original = matplotlib.figure.Figure.savefig
    matplotlib.figure.Figure.savefig = lambda fig, *a, **k: (figures.append(fig), original(fig, *a, **k))[1]
    try:
        plot_confusion(report, tmp_path)
        plot_pr_roc(probs, labels, report, tmp_path)
    finally:
        matplotlib.figure.Figure.savefig = original
    confusion, pr, roc = (fig.axes[0] for fig in figures)
    assert confusion.get_title().startswith("25 most-confused pairs of 100 classes")
    assert confusion.get_yticklabels()[-1].get_text() == "c7 -> c3"  # the top pair on top
    assert [t.get_text().split(" (")[0] for t in roc.get_legend().get_texts()] == ["micro average", "macro average"]


def test_the_command_reproduces_the_report(reported_run, tmp_path):
    run, _, _ = reported_run
    proc = run_cli([sys.executable, "-m", "launcher.report", str(run), "--out", str(tmp_path / "again")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((run / "report" / "report.json").read_text())
    b = json.loads((tmp_path / "again" / "report.json").read_text())
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["per_class"] == b["per_class"]
    bad = run_cli([sys.executable, "-m", "launcher.report", str(tmp_path)])
    assert bad.returncode == 2 and "is not a finished run directory" in bad.stderr
