"""The evaluation report of a finished run:

    python -m launcher.report RUN_DIR [--weights PATH] [--out DIR]

reads RUN_DIR/recipe.yaml and the final weights, predicts the validation set once, and
writes to RUN_DIR/report/ (or --out):

    curves.png            loss, validation top-1 and learning rate against the step, with an epoch
                          axis on top (metrics.jsonl)
    confusion_matrix.png  row-normalised confusion matrix (rows: true class); with more than 30
                          classes the 25 most-confused (true, predicted) pairs instead
    pr_curves.png         precision-recall per class (one-vs-rest), AP in the legend, and the
                          micro and macro averages (per-class curves drawn faint past 20 classes)
    roc_curves.png        ROC likewise, AUC in the legend, micro and macro averages
    report.json           accuracy, per-class precision / recall / F1 / support / ROC AUC / AP,
                          macro and weighted averages, micro/macro ROC AUC and AP, the confusion
                          matrix and its most-confused pairs

The metrics are scikit-learn's; matplotlib draws. The `report` plugin calls the same
function at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launcher.commands.finished_run import class_names
from launcher.errors import LauncherError, run_command
from launcher.runlog import atomic_write_text, final_weights, metrics_file, recipe_file, report_dir


@torch.no_grad()
def predict(recipe, model: torch.nn.Module, device: torch.device, batch_size: Optional[int] = None):
    """Softmax probabilities (N, C) and labels (N,) of the whole validation set, in index order."""
    from launcher.data import EvalStream, batches, fetch_options, index_shards
    from launcher.data.transforms import ImageTransform

    data = recipe.data
    if not data.val:
        raise LauncherError("the report needs validation data; the recipe sets no data.val.")
    index = index_shards(data.val, "data.val", data.cache_dir, recipe.model.num_classes, fetch_options(data))
    transform = ImageTransform(data, recipe.model.in_chans, train=False)
    stream = EvalStream(index, transform, batch_size or data.eval_batch_size or 2 * data.batch_size, 0, 1)
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for batch in batches(stream, data.num_workers):
        logits = model(batch.images.to(device)).float()
        probs.append(torch.softmax(logits, -1).cpu())
        labels.append(batch.targets)
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def compute(probs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_fscore_support,
                                 roc_auc_score)

    classes = list(range(probs.shape[1]))
    preds = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=classes,
                                                                     zero_division=0)
    per_class = {}
    for c in classes:
        positives = labels == c
        both = 0 < positives.sum() < len(labels)  # AUC and AP need both kinds of sample
        per_class[names[c]] = {
            "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
            "support": int(support[c]),
            "roc_auc": float(roc_auc_score(positives, probs[:, c])) if both else None,
            "average_precision": float(average_precision_score(positives, probs[:, c])) if both else None,
        }
    weights = support / max(support.sum(), 1)
    cm = confusion_matrix(labels, preds, labels=classes)
    return {
        "samples": int(len(labels)), "accuracy": float((preds == labels).mean()),
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "weighted": {"precision": float(precision @ weights), "recall": float(recall @ weights),
                     "f1": float(f1 @ weights)},
        "per_class": per_class,
        "averages": ranking_averages(probs, labels),
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm, names),
        "class_names": names,
    }


def ranking_averages(probs: np.ndarray, labels: np.ndarray) -> dict:
    """scikit-learn's one-vs-rest ROC AUC and average precision, micro (every (sample, class)
    decision pooled) and macro (the mean over the classes that have positives and negatives)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    onehot = np.eye(probs.shape[1], dtype=bool)[labels]
    scorable = [c for c in range(probs.shape[1]) if 0 < onehot[:, c].sum() < len(labels)]
    if not scorable:
        return {}
    return {"roc_auc_micro": float(roc_auc_score(onehot.ravel(), probs.ravel())),
            "roc_auc_macro": float(np.mean([roc_auc_score(onehot[:, c], probs[:, c]) for c in scorable])),
            "average_precision_micro": float(average_precision_score(onehot.ravel(), probs.ravel())),
            "average_precision_macro": float(np.mean([average_precision_score(onehot[:, c], probs[:, c])
                                                      for c in scorable]))}


def most_confused(cm: np.ndarray, names: list[str], top: int = 25) -> list[dict]:
    """The off-diagonal cells with the most samples: which true class is mistaken for which."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        if off[i, j] == 0:
            break
        pairs.append({"true": names[i], "predicted": names[j], "count": int(off[i, j]),
                      "fraction_of_true": float(off[i, j] / max(cm[i].sum(), 1))})
    return pairs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_file: Path, out: Path) -> Optional[Path]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.is_file() else []
    rows = [{k: float("nan") if v is None else v for k, v in r.items()} for r in rows]  # null: non-finite
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    if not train:
        return None
    plt = _plt()
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(*zip(*train), label="train/loss", color="C0", linewidth=1)
    for key, color in (("val/loss", "C1"), ("val_ema/loss", "C2")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_loss.plot(*zip(*points), "o-", label=key, color=color, markersize=3)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend()
    keys = sorted({k for r in rows for k in r if k.endswith("/top1")})
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax_acc.plot(*zip(*points), "o-", label=key, markersize=3)
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_title("validation accuracy")
    if keys:
        ax_acc.legend()
    lrs = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
    if lrs:
        ax_lr.plot(*zip(*lrs), color="C3", linewidth=1.2, label="train/lr")
    ax_lr.set_ylabel("learning rate (first parameter group)")
    ax_lr.set_title("learning rate")
    to_epoch, to_step = epoch_axis(rows)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("optimizer step")
        if to_epoch is not None:
            ax.secondary_xaxis("top", functions=(to_epoch, to_step)).set_xlabel("epoch")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def epoch_axis(rows: list[dict]):
    """(step -> epoch, epoch -> step) from the logged rows: epoch e ends at the last step logged in
    it; in between, linear. None when the rows cannot tell (one logged epoch, no steps)."""
    last_step = {}
    for r in rows:
        if "train/loss" in r:
            last_step[int(r["epoch"])] = max(last_step.get(int(r["epoch"]), 0), int(r["step"]))
    epochs = sorted(last_step)
    if len(epochs) < 2:
        return None, None
    # Epoch e+1 starts where e's last logged step is; e=first starts at step 0.
    steps = [0.0] + [float(last_step[e]) for e in epochs[:-1]]
    marks = [float(epochs[0])] + [float(e + 1) for e in epochs[:-1]]
    per_epoch = (steps[-1] - steps[0]) / max(marks[-1] - marks[0], 1e-9)
    steps.append(steps[-1] + per_epoch * 10 ** 6)  # extrapolate past the last boundary at the same rate
    marks.append(marks[-1] + 10 ** 6)

    def to_epoch(x):
        return np.interp(x, steps, marks)

    def to_step(e):
        return np.interp(e, marks, steps)

    return to_epoch, to_step


def plot_confusion(report: dict, out: Path) -> Path:
    plt = _plt()
    cm = np.asarray(report["confusion_matrix"], dtype=np.float64)
    if len(cm) > 30:  # a 100 x 100 grid cannot be read: the pairs that matter instead
        return plot_most_confused(report, out)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(cm)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    if n <= 30:
        names = report["class_names"]
        ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix (accuracy {report['accuracy']:.4f})")
    fig.tight_layout()
    path = out / "confusion_matrix.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_most_confused(report: dict, out: Path) -> Path:
    plt = _plt()
    pairs = report["most_confused"]
    fig, ax = plt.subplots(figsize=(9, 0.32 * max(len(pairs), 4) + 1.5))
    labels = [f"{p['true']} -> {p['predicted']}" for p in pairs][::-1]
    counts = [p["count"] for p in pairs][::-1]
    bars = ax.barh(range(len(pairs)), counts, color="C0")
    for bar, p in zip(bars, pairs[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {100 * p['fraction_of_true']:.0f}% of "
                f"{p['true']}", va="center", fontsize=7)
    ax.set_yticks(range(len(pairs)), labels, fontsize=7)
    ax.set_xlabel("validation samples (true class -> predicted class)")
    ax.set_ylabel("most-confused pairs")
    ax.set_title(f"{len(pairs)} most-confused pairs of {len(report['class_names'])} classes "
                 f"(accuracy {report['accuracy']:.4f})")
    fig.tight_layout()
    path = out / "confusion_matrix.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pr_roc(probs: np.ndarray, labels: np.ndarray, report: dict, out: Path) -> list[Path]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _plt()
    names, n = report["class_names"], probs.shape[1]
    paths = []
    onehot = np.eye(n, dtype=bool)[labels]
    averages = report.get("averages", {})
    grid = np.linspace(0, 1, 201)
    faint = n > 20  # many classes: the averages carry the picture, the classes are context
    for kind in ("pr", "roc"):
        fig, ax = plt.subplots(figsize=(7, 6))
        colors = plt.get_cmap("tab20" if n > 10 else "tab10")
        curves = []
        for c in range(n):
            entry = report["per_class"][names[c]]
            if entry["roc_auc"] is None:
                continue
            positives = labels == c
            if kind == "pr":
                precision, recall, _ = precision_recall_curve(positives, probs[:, c])
                x, y, label = recall, precision, f"{names[c]} (AP {entry['average_precision']:.3f})"
                curves.append(np.interp(grid, recall[::-1], precision[::-1]))
            else:
                fpr, tpr, _ = roc_curve(positives, probs[:, c])
                x, y, label = fpr, tpr, f"{names[c]} (AUC {entry['roc_auc']:.3f})"
                curves.append(np.interp(grid, fpr, tpr))
            ax.plot(x, y, color="0.75" if faint else colors(c % colors.N), linewidth=0.6 if faint else 1,
                    label="_nolegend_" if faint else label)
        if curves:
            pooled, scores = onehot.ravel(), probs.ravel()
            if kind == "pr":
                precision, recall, _ = precision_recall_curve(pooled, scores)
                ax.plot(recall, precision, color="black", linewidth=2.2,
                        label=f"micro average (AP {averages['average_precision_micro']:.3f})")
                ax.plot(grid, np.mean(curves, axis=0), color="C1", linewidth=2.2, linestyle="--",
                        label=f"macro average (mean AP {averages['average_precision_macro']:.3f})")
            else:
                fpr, tpr, _ = roc_curve(pooled, scores)
                ax.plot(fpr, tpr, color="black", linewidth=2.2,
                        label=f"micro average (AUC {averages['roc_auc_micro']:.3f})")
                ax.plot(grid, np.mean(curves, axis=0), color="C1", linewidth=2.2, linestyle="--",
                        label=f"macro average (mean AUC {averages['roc_auc_macro']:.3f})")
        if kind == "pr":
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_title("precision-recall per class (one-vs-rest)")
        else:
            ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title("ROC per class (one-vs-rest)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower left" if kind == "pr" else "lower right")
        fig.tight_layout()
        path = out / f"{kind}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(run_dir: Path, recipe, probs: np.ndarray, labels: np.ndarray, out: Optional[Path] = None,
                 weights: Optional[Path] = None) -> tuple[dict, list[Path]]:
    out = Path(out) if out else report_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = compute(probs, labels, class_names(recipe))
    report["weights"] = str(weights) if weights else None
    images = [p for p in [plot_curves(metrics_file(run_dir), out), plot_confusion(report, out),
                          *plot_pr_roc(probs, labels, report, out)] if p is not None]
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    return report, images


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--weights", type=Path, default=None, help="default: RUN_DIR/final/model.safetensors")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="run the pipe: shard commands written in RUN_DIR/recipe.yaml (refused by default)")
    args = parser.parse_args(argv)
    return run_command(lambda: _report_command(args))


def _report_command(args) -> int:
    from launcher.models.factory import create_model
    from launcher.config.load import load_run_recipe
    from launcher.models.weights import load_into

    recipe_path = recipe_file(args.run_dir)
    weights = args.weights or final_weights(args.run_dir)
    if not recipe_path.is_file() or not weights.is_file():
        raise LauncherError(f"'{args.run_dir}' is not a finished run directory: it needs recipe.yaml and "
                            f"{weights.relative_to(args.run_dir) if not args.weights else weights} "
                            "(train it first, or pass --weights).")
    recipe = load_run_recipe(args.run_dir, allow_pipe=args.allow_pipe, shards_read=("val",))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(recipe.model.model_copy(update={"pretrained": False, "pretrained_file": None}))
    load_into(model, weights, "--weights" if args.weights else str(args.run_dir),
              f"The weights must come from a run of {recipe_path}'s model ({recipe.model.name}).")
    probs, labels = predict(recipe, model.to(device), device)
    report, images = write_report(args.run_dir, recipe, probs, labels, args.out, weights)
    print(f"accuracy {report['accuracy']:.4f} on {report['samples']} samples; macro F1 {report['macro']['f1']:.4f}")
    for path in images + [images[0].parent / "report.json"]:
        print(f"  {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
