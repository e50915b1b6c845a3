"""Two CPU processes through `accelerate launch --multi_gpu --num_processes 2` (gloo):
two ranks, different shards per rank, every training sample exactly once per epoch, every
validation sample counted exactly once, and the same global batches as one process."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import accelerate_cmd, run_cli, small_recipe

pytestmark = pytest.mark.slow


def run(digits, tmp_path, name, processes, batch_size):
    raw = small_recipe(digits, tmp_path / name, train={"epochs": 2},
                       data={"batch_size": batch_size, "num_workers": 1}, plugins={"recorder": {}})
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = run_cli([*accelerate_cmd(processes), "launcher", str(recipe)])
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / name / f"recorder-rank{r}.json").read_text()) for r in range(processes)]


def test_two_processes_split_the_data_exactly(digits, tmp_path):
    ranks = run(digits, tmp_path, "two", processes=2, batch_size=32)
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    for epoch in (0, 1):
        ids = [i for r in ranks for s in r["steps"] if s["epoch"] == epoch for i in s["ids"]]
        assert sorted(ids) == list(range(1437)), f"epoch {epoch}: a sample was lost or repeated"
    # Each rank reads its own part of the shard stream; at most one shard straddles the cut.
    assert ranks[0]["shards_read"] != ranks[1]["shards_read"]
    # Both ranks took the same number of steps (no rank waits in a collective).
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 46
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val/top1" in row]
    assert evals and all(row["val/samples"] == 360 for row in evals)
    assert ranks[0]["evals"] == ranks[1]["evals"]  # metrics are reduced over ranks

    # One process with the same global batch (64) trains on exactly the same global batches.
    single = run(digits, tmp_path, "one", processes=1, batch_size=64)[0]
    assert len(single["steps"]) == 46
    for one, a, b in zip(single["steps"], ranks[0]["steps"], ranks[1]["steps"]):
        assert one["ids"] == a["ids"] + b["ids"] and one["global_count"] == a["global_count"]


def test_accumulation_all_reduces_once_per_step_under_ddp(digits, tmp_path):
    """grad_accum with k=4 micro-batches all-reduces the gradients as often as k=1 does:
    only on the last micro-batch (Accelerate's no_sync on the others)."""
    counts = {}
    for k in (1, 4):
        raw = small_recipe(digits, tmp_path / f"k{k}", train={"epochs": 1, "max_steps": 5}, data={"val": None},
                           plugins={"grad_accum": {"micro_batches": k},
                                    "recorder": {"trace": False, "count_allreduce": True}})
        recipe = tmp_path / f"k{k}.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        result = run_cli([*accelerate_cmd(2), "launcher", str(recipe)])
        assert result.returncode == 0, result.stderr[-3000:]
        counts[k] = json.loads((tmp_path / f"k{k}" / "recorder-rank0.json").read_text())["allreduce_per_step"]
    assert len(counts[1]) == 5 and all(c >= 1 for c in counts[1])  # the hook did see the all-reduces
    assert counts[4] == counts[1]


def test_freezing_then_unfreezing_keeps_ranks_in_step_under_ddp(digits, tmp_path):
    """layer_lr freezes the backbone after DDP wrapped the model: the frozen epoch must not hang
    DDP (find_unused_parameters) and, once unfrozen, the backbone's gradients must be
    all-reduced again, so both ranks end with identical weights that did train."""
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 2}, data={"batch_size": 64, "val": None},
                       plugins={"layer_lr": {"freeze_epochs": 1}, "recorder": {"trace": False}})
    recipe = tmp_path / "freeze.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = run_cli([*accelerate_cmd(2), "launcher", str(recipe)])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"recorder-rank{r}.json").read_text())["weights"] for r in range(2)]
    assert ranks[0] == ranks[1]
    import torch
    from accelerate.utils import set_seed

    from launcher.models.factory import create_model
    from launcher.config.load import validate_recipe

    set_seed(0)
    initial = create_model(validate_recipe(raw).model)
    backbone = [n for n, _ in initial.named_parameters() if not n.startswith("fc.")]
    changed = [n for n in backbone
               if ranks[0][n][1] != torch.sum(dict(initial.named_parameters())[n].detach().double() ** 2).item()]
    assert changed == backbone  # the second epoch trained every backbone parameter


def _saved_weights_loss(recipe_file, weights) -> float:
    """Validation loss of a saved weights file, evaluated in this one process."""
    import numpy as np
    import torch
    from safetensors.torch import load_model

    from launcher.models.factory import create_model
    from launcher.config.load import load_recipe
    from launcher.commands.report import predict

    recipe = load_recipe(str(recipe_file), [])
    model = create_model(recipe.model)
    load_model(model, str(weights))
    probs, labels = predict(recipe, model, torch.device("cpu"))
    return float(-np.log(probs[np.arange(len(labels)), labels].astype(np.float64)).mean())


def test_validation_metrics_on_two_processes_are_those_of_the_saved_batchnorm_weights(digits, tmp_path):
    """Each rank's BatchNorm statistics differ (its own batches); only rank 0's are saved. The
    reported val, val_ema and val_swa metrics must be those of final/model.safetensors,
    final/ema.safetensors and final/swa.safetensors (SWA's statistics recomputed by update_bn)."""
    raw = small_recipe(digits, tmp_path / "bn", train={"epochs": 1}, data={"num_workers": 0},
                       plugins={"ema": {"decay": 0.8}, "swa": {"start": 0, "every_steps": 10}})
    recipe = tmp_path / "bn.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = run_cli([*accelerate_cmd(2), "launcher", str(recipe)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "bn" / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if "val/loss" in row][-1]
    for prefix, file in (("val", "model"), ("val_ema", "ema"), ("val_swa", "swa")):
        single = _saved_weights_loss(recipe, tmp_path / "bn" / "final" / f"{file}.safetensors")
        assert abs(final[f"{prefix}/loss"] - single) <= 1e-5 * single, (prefix, final[f"{prefix}/loss"], single)
