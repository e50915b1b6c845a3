"""Export a trained run's weights for use outside the launcher.

    python -m launcher.export RUN_DIR                        # timm folder: RUN_DIR/export/timm/
    python -m launcher.export RUN_DIR --format torchscript   # RUN_DIR/export/model.torchscript.pt
    python -m launcher.export RUN_DIR --format onnx          # RUN_DIR/export/model.onnx (pip install '.[onnx]')
    python -m launcher.export RUN_DIR --weights ema --out DIR

An export never writes into the run's final/ or checkpoints/ (the weights it trained), and never
replaces an existing file unless --force is given (then only the files of its format).

timm: model.safetensors + config.json in the layout of timm's Hugging Face hub folders
(architecture, num_classes, num_features, model_args, label_names, pretrained_cfg with the
run's input size, mean and std), loadable without the launcher:

    cfg = json.load(open("DIR/config.json"))
    timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                      pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="DIR/model.safetensors"),
                      **cfg["model_args"])

The pretrained_cfg tells timm that the file's classifier has num_classes outputs, so timm keeps
it instead of replacing it with a new head. The CIFAR WideResNets need `import launcher` first,
which registers them with timm.

torchscript: torch.jit.trace of the model in evaluation mode on one input of the run's size.

onnx: torch.onnx.export (torch.export-based) of the model in evaluation mode, input `images`
(N, C, H, W) with a dynamic batch dimension, output `logits`; then checked with onnxruntime
against PyTorch on a random batch of 3 (largest difference printed; above 1e-4 is an error).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from launcher.errors import LauncherError, run_command


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--format", choices=("timm", "torchscript", "onnx"), default="timm")
    parser.add_argument("--weights", default="model", help="model, ema, swa, or a .safetensors path")
    parser.add_argument("--out", type=Path, default=None, help="a folder; default: RUN_DIR/export/timm or RUN_DIR/export")
    parser.add_argument("--force", action="store_true", help="replace files of an earlier export in --out")
    args = parser.parse_args(argv)
    return run_command(lambda: _export_command(args))


OUTPUT_FILES = {"timm": ("model.safetensors", "config.json"), "onnx": ("model.onnx",),
                "torchscript": ("model.torchscript.pt",)}


def output_folder(run_dir: Path, fmt: str, out: Optional[Path], weights: Path, force: bool) -> Path:
    """Where the export goes, refused when it would touch what the run trained or another file."""
    from launcher.runlog import checkpoints_dir, final_weights

    out = out or (run_dir / "export" / "timm" if fmt == "timm" else run_dir / "export")
    for kept in (final_weights(run_dir).parent, checkpoints_dir(run_dir)):
        if out.resolve() == kept.resolve() or kept.resolve() in out.resolve().parents:
            raise LauncherError(f"--out '{out}' is inside the run's {kept.name}/, which holds the weights the run "
                                "trained; an export never writes there. Give another folder (the default is "
                                f"{run_dir / 'export'}).")
    if out.exists() and not out.is_dir():
        raise LauncherError(f"--out '{out}' is an existing file; give a folder (it is created if missing).")
    targets = [out / name for name in OUTPUT_FILES[fmt]]
    if any(t.exists() and t.resolve() == weights.resolve() for t in targets):
        raise LauncherError(f"--out '{out}' holds the weights being exported ('{weights}'); give another folder.")
    existing = [str(t) for t in targets if t.exists() or t.is_symlink()]
    if existing and not force:
        raise LauncherError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; an export "
                            "does not replace files unless told: add --force to replace them, or give another --out.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _export_command(args) -> int:
    from launcher.commands.finished_run import class_names, load_run_model
    from launcher.runlog import atomic_path, atomic_write_text

    recipe, model, _, weights = load_run_model(args.run_dir, args.weights)
    out = output_folder(args.run_dir, args.format, args.out, weights, args.force)
    model = model.cpu().float()
    size = recipe.data.image_size
    if args.format == "timm":
        with atomic_path(out / "model.safetensors") as tmp:
            shutil.copyfile(weights, tmp)
        model_args = {"in_chans": recipe.model.in_chans, **recipe.model.kwargs}
        config = {
            "architecture": recipe.model.name,
            "num_classes": recipe.model.num_classes,
            "num_features": getattr(model, "num_features", None),
            "model_args": model_args,
            "label_names": class_names(recipe),
            "pretrained_cfg": {
                "input_size": [recipe.model.in_chans, size, size], "mean": list(recipe.data.mean),
                "std": list(recipe.data.std), "crop_pct": recipe.data.crop_pct or 1.0,
                "interpolation": recipe.data.interpolation,
                "num_classes": recipe.model.num_classes, "classifier": _classifier_name(model),
            },
        }
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
        print(f"timm folder -> {out}")
    elif args.format == "onnx":
        with atomic_path(out / "model.onnx") as tmp:
            written = tmp.with_suffix(".onnx")  # the exporter wants the suffix
            try:
                difference = export_onnx(model, recipe.model.in_chans, size, written)
                written.replace(tmp)
            finally:
                written.unlink(missing_ok=True)
        print(f"onnx -> {out / 'model.onnx'} (onnxruntime vs PyTorch: largest difference {difference:.2e})")
    else:
        example = torch.zeros(1, recipe.model.in_chans, size, size)
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        with atomic_path(out / "model.torchscript.pt") as tmp:
            traced.save(str(tmp))
        print(f"torchscript -> {out / 'model.torchscript.pt'}")
    return 0


def export_onnx(model, in_chans: int, size: int, path: Path, atol: float = 1e-4) -> float:
    """Write the model as ONNX and check it with onnxruntime; returns the largest difference."""

    try:
        import onnxruntime
    except ImportError:
        raise LauncherError("--format onnx needs onnx, onnxscript and onnxruntime: pip install '.[onnx]' "
                            "(or pip install onnx onnxscript onnxruntime).") from None
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(2, in_chans, size, size),), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        images = torch.randn(3, in_chans, size, size, generator=torch.Generator().manual_seed(0))
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    difference = float(abs(got - expected).max())
    if not difference <= atol:
        raise LauncherError(f"the ONNX model computes other logits than PyTorch (largest difference {difference:.2e} "
                            f"> {atol}): {path} is not usable as it is.")
    return difference


def _classifier_name(model) -> Optional[str]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    return next((name for name, module in model.named_modules() if module is classifier), None)


if __name__ == "__main__":
    sys.exit(main())
