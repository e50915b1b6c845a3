"""train.compile (torch.compile): a compiled run trains the same model as an eager one, within
float tolerance, with the plugins that change the step (gradient accumulation, SAM's second pass,
EMA, TTA at evaluation, a distillation teacher), and its weights and checkpoints stay plain: no
`_orig_mod.` prefix, loadable into timm and resumable by an uncompiled run.

aot_eager traces forward and backward through dynamo and AOTAutograd (what inductor also does)
without generating code, so the CPU tests stay fast; one test runs inductor itself (C++ kernels).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch._dynamo
import yaml
from safetensors.torch import load_file
from timm.models import register_model

from launcher.errors import LauncherError
from launcher.loop import train
from launcher.models.factory import WideResNet
from launcher.config.load import validate_recipe
from tests.conftest import accelerate_cmd, metric_rows, run_cli, small_recipe

PLUGINS = {"grad_accum": {"micro_batches": 2}, "sam": {"rho": 0.05}, "ema": {"decay": 0.9}, "tta": {}}

GRAPHS: list = []  # (training?, graph) handed to the counting backend: what really went through dynamo


@torch._dynamo.register_backend
def counting_aot_eager(graph, example_inputs, **kwargs):
    """aot_eager, recording each graph dynamo compiles (and whether grad mode was on: training)."""
    GRAPHS.append((torch.is_grad_enabled(), graph))
    return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs, **kwargs)


def run(digits, run_dir, compile_option, max_steps=6, plugins=PLUGINS, batch_size=24, **sections):
    raw = small_recipe(digits, run_dir, train={"epochs": 1, "max_steps": max_steps, "compile": compile_option},
                       data={"batch_size": batch_size}, plugins=plugins, **sections)
    # 3 evaluation batches of different sizes: the eval graph sees a changing batch dimension too.
    raw["data"]["eval_batch_size"] = 150
    return train(validate_recipe(raw))


def weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest weight difference {worst:g} > {atol:g}"


def test_a_compiled_run_with_the_step_changing_plugins_matches_the_eager_run(digits, tmp_path):
    run(digits, tmp_path / "eager", None)
    GRAPHS.clear()
    compiled = run(digits, tmp_path / "compiled", {"backend": "counting_aot_eager"})
    assert getattr(compiled.model, "_compiled_call_impl", None) is not None
    # It did run compiled: training graphs (grad on) and evaluation graphs (no_grad) went through dynamo.
    assert any(training for training, _ in GRAPHS) and any(not training for training, _ in GRAPHS)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert not any(k.startswith("_orig_mod") for k in b)
    assert_close(a, b, atol=1e-4)
    # Same losses and the same evaluation (TTA on the model and on EMA), to float tolerance.
    for row_a, row_b in zip(metric_rows(tmp_path / "eager"), metric_rows(tmp_path / "compiled"), strict=True):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            assert row_b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert any("val_ema_tta/top1" in row for row in metric_rows(tmp_path / "compiled"))
    # The final weights load into a plain timm model.
    model = timm.create_model("wrn10_1", num_classes=digits["num_classes"])
    model.load_state_dict(b)


def test_a_compiled_run_resumes_uncompiled_and_its_checkpoint_is_plain(digits, tmp_path):
    checkpoint = {"checkpoint": {"every_steps": 3, "every_epochs": None}}
    run(digits, tmp_path / "whole", None, plugins=checkpoint)
    run(digits, tmp_path / "split", {"backend": "aot_eager"}, max_steps=3, plugins=checkpoint)
    saved = next((tmp_path / "split" / "checkpoints").glob("*/model.safetensors"))
    assert not any(k.startswith("_orig_mod") for k in load_file(str(saved)))
    resumed = run(digits, tmp_path / "split", None, plugins=checkpoint)  # train.compile off: safe to change
    assert resumed.step == 6
    assert_close(weights(tmp_path / "whole"), weights(tmp_path / "split"), atol=1e-5)


def test_inductor_compiles_forward_and_backward_on_the_cpu(digits, tmp_path):
    from torch._dynamo.utils import counters

    run(digits, tmp_path / "eager", None, max_steps=3, plugins={})
    before = counters["stats"]["unique_graphs"]
    run(digits, tmp_path / "inductor", True, max_steps=3, plugins={})  # true: torch.compile's defaults
    assert counters["stats"]["unique_graphs"] > before  # dynamo compiled graphs for the run
    assert_close(weights(tmp_path / "eager"), weights(tmp_path / "inductor"), atol=1e-4)
    saved = yaml.safe_load((tmp_path / "inductor" / "recipe.yaml").read_text())
    assert saved["train"]["compile"] == {"backend": "inductor", "mode": None, "dynamic": None, "fullgraph": False}


def test_compile_options_are_checked_when_the_recipe_loads(digits, tmp_path):
    with pytest.raises(LauncherError, match="Did you mean 'backend'"):
        validate_recipe(small_recipe(digits, tmp_path, train={"epochs": 1, "compile": {"bakend": "inductor"}}))
    with pytest.raises(LauncherError, match="distributed.strategy=ddp only"):
        validate_recipe(small_recipe(digits, tmp_path, train={"epochs": 1, "compile": True},
                                     distributed={"strategy": "deepspeed"}))


def test_accelerate_launch_dynamo_backend_does_not_override_the_recipe(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    with pytest.raises(LauncherError, match="--dynamo_backend inductor.*does not compile"):
        run(digits, tmp_path / "r", None, max_steps=1, plugins={})


def test_a_compiled_student_distills_like_an_eager_one(digits, tmp_path):
    run(digits, tmp_path / "teacher", None, max_steps=3, plugins={})
    distill = {"distill": {"checkpoint": str(tmp_path / "teacher"), "alpha": 0.5}}
    run(digits, tmp_path / "eager", None, max_steps=3, plugins=distill)
    GRAPHS.clear()
    run(digits, tmp_path / "compiled", {"backend": "counting_aot_eager"}, max_steps=3, plugins=distill)
    assert GRAPHS
    assert_close(weights(tmp_path / "eager"), weights(tmp_path / "compiled"), atol=1e-4)


@pytest.mark.slow
def test_two_compiled_ddp_processes_with_accumulation_match_one_eager_process(digits, tmp_path):
    """torch.compile around DDP (its graph split at the gradient buckets), micro-batches under no_sync.
    GroupNorm: BatchNorm statistics are per rank by design, so 1 and 2 processes differ with it."""
    groupnorm = {"name": "wrn10_1", "num_classes": 10, "kwargs": {"norm_layer": "groupnorm"}}
    run(digits, tmp_path / "one", None, max_steps=4, plugins={"grad_accum": {"micro_batches": 2}},
        batch_size=48, model=groupnorm)
    raw = small_recipe(digits, tmp_path / "two", train={"epochs": 1, "max_steps": 4, "compile": {"backend": "aot_eager"}},
                       data={"batch_size": 24}, plugins={"grad_accum": {"micro_batches": 2}}, model=groupnorm)
    raw["data"]["eval_batch_size"] = 150
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli([*accelerate_cmd(2), "launcher", str(tmp_path / "two.yaml")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-4)


class _GraphBreakingWRN(WideResNet):
    def forward(self, x):
        torch._dynamo.graph_break()  # what a print, .item() or a data-dependent branch does
        return super().forward(x)


@register_model
def graph_breaking_wrn10_1(pretrained=False, **kwargs):
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's, not the model's
        kwargs.pop(key, None)
    return _GraphBreakingWRN(depth=10, width=1, **kwargs)


def test_fullgraph_on_a_model_that_breaks_graphs_is_one_paragraph_naming_the_option(digits, tmp_path):
    model = {"name": "graph_breaking_wrn10_1", "num_classes": 10}
    with pytest.raises(LauncherError) as err:
        run(digits, tmp_path / "full", {"backend": "aot_eager", "fullgraph": True}, max_steps=1, plugins={},
            model=model)
    text = str(err.value)
    assert text.startswith("train.compile.fullgraph is true, and the model breaks the graph: Call to "
                           "`torch._dynamo.graph_break()`") and "set train.compile.fullgraph=false" in text
    assert "\n" not in text and "test_compile.py" in text  # one paragraph, naming where
    status = json.loads((tmp_path / "full" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == text
    run(digits, tmp_path / "broken", {"backend": "aot_eager"}, max_steps=1, plugins={}, model=model)  # runs
