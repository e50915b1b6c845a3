"""The evaluation report of a finished run:

    python -m launcher.report RUN_DIR [--weights PATH] [--out DIR]

reads RUN_DIR/recipe.yaml and the final weights, predicts the validation set once, and
writes to RUN_DIR/report/ (or --out):

    curves.png            training loss, validation loss and top-1 against the step (metrics.jsonl)
    confusion_matrix.png  row-normalised confusion matrix (rows: true class), counts in report.json
    pr_curves.png         one precision-recall curve per class (one-vs-rest), average precision in the legend
    roc_curves.png        one ROC curve per class (one-vs-rest), AUC in the legend
    report.json           accuracy, per-class precision / recall / F1 / support / ROC AUC / AP,
                          macro and weighted averages, the confusion matrix

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

from launcher.errors import LauncherError, run_command
from launcher.runlog import atomic_write_text, final_weights, metrics_file, recipe_file, report_dir, shard_info


@torch.no_grad()
def predict(recipe, model: torch.nn.Module, device: torch.device, batch_size: Optional[int] = None):
    """Softmax probabilities (N, C) and labels (N,) of the whole validation set, in index order."""
    from launcher.data import EvalStream, batches, fetch_options, index_shards
    from launcher.transforms import ImageTransform

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


def class_names(recipe) -> list[str]:
    """From the shards' info.json (written by python -m launcher.shards) where there is one."""
    num = recipe.model.num_classes
    classes = shard_info(recipe.data.val).get("classes")
    if isinstance(classes, list) and len(classes) == num:
        return [str(c) for c in classes]
    return [str(i) for i in range(num)]


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
    return {
        "samples": int(len(labels)), "accuracy": float((preds == labels).mean()),
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "weighted": {"precision": float(precision @ weights), "recall": float(recall @ weights),
                     "f1": float(f1 @ weights)},
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
        "class_names": names,
    }


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
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(*zip(*train), label="train/loss", color="C0", linewidth=1)
    for key, color in (("val/loss", "C1"), ("val_ema/loss", "C2")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_loss.plot(*zip(*points), "o-", label=key, color=color, markersize=3)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend()
    keys = sorted({k for r in rows for k in r if k.endswith("/top1")})
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax_acc.plot(*zip(*points), "o-", label=key, markersize=3)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_title("validation accuracy")
    if keys:
        ax_acc.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(report: dict, out: Path) -> Path:
    plt = _plt()
    cm = np.asarray(report["confusion_matrix"], dtype=np.float64)
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


def plot_pr_roc(probs: np.ndarray, labels: np.ndarray, report: dict, out: Path) -> list[Path]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _plt()
    names, n = report["class_names"], probs.shape[1]
    paths = []
    for kind in ("pr", "roc"):
        fig, ax = plt.subplots(figsize=(7, 6))
        colors = plt.get_cmap("tab20" if n > 10 else "tab10")
        for c in range(n):
            entry = report["per_class"][names[c]]
            if entry["roc_auc"] is None:
                continue
            positives = labels == c
            if kind == "pr":
                precision, recall, _ = precision_recall_curve(positives, probs[:, c])
                ax.plot(recall, precision, color=colors(c % colors.N), linewidth=1,
                        label=f"{names[c]} (AP {entry['average_precision']:.3f})")
            else:
                fpr, tpr, _ = roc_curve(positives, probs[:, c])
                ax.plot(fpr, tpr, color=colors(c % colors.N), linewidth=1,
                        label=f"{names[c]} (AUC {entry['roc_auc']:.3f})")
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
        if n <= 20:
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
    args = parser.parse_args(argv)
    return run_command(lambda: _report_command(args))


def _report_command(args) -> int:
    from safetensors.torch import load_file

    from launcher.models import create_model
    from launcher.recipe import load_recipe

    recipe_path = recipe_file(args.run_dir)
    weights = args.weights or final_weights(args.run_dir)
    if not recipe_path.is_file() or not weights.is_file():
        raise LauncherError(f"'{args.run_dir}' is not a finished run directory: it needs recipe.yaml and "
                            f"{weights.relative_to(args.run_dir) if not args.weights else weights} "
                            "(train it first, or pass --weights).")
    recipe = load_recipe(recipe_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(recipe.model)
    model.load_state_dict(load_file(str(weights)))
    probs, labels = predict(recipe, model.to(device), device)
    report, images = write_report(args.run_dir, recipe, probs, labels, args.out, weights)
    print(f"accuracy {report['accuracy']:.4f} on {report['samples']} samples; macro F1 {report['macro']['f1']:.4f}")
    for path in images + [images[0].parent / "report.json"]:
        print(f"  {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
