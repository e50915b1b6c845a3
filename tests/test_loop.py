"""The training loop end to end on one process: run directory, metrics, final weights,
optimizer and schedule set-up, and bit-identical weights to a plain hand-written loop."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from benchmarks.plain_loop import plain_train
from launcher.errors import LauncherError
from launcher.loop import train
from launcher.optim import create_optimizer, create_schedule, default_param_groups
from launcher.config.load import validate_recipe
from tests.conftest import small_recipe


def test_a_short_run_writes_the_run_directory(digits, tmp_path):
    recipe = validate_recipe(small_recipe(digits, tmp_path / "run", train={"epochs": 2}), name="small")
    ctx = train(recipe)
    run = tmp_path / "run"
    assert ctx.steps_per_epoch == 45 and ctx.step == 90  # ceil(1437 / 32)
    resolved = validate_recipe(__import__("yaml").safe_load((run / "recipe.yaml").read_text()))
    assert resolved.to_dict() == recipe.to_dict()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["seed"] == 0 and manifest["recipe_digest"] == recipe.digest()
    assert {"torch", "timm", "accelerate", "webdataset"} <= set(manifest["versions"])
    assert manifest["host"] and manifest["start_time"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "val/top1" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 91, 5))
    assert [(r["step"], r["epoch"]) for r in eval_rows] == [(45, 1), (90, 2)]
    assert all(r["val/samples"] == 360 for r in eval_rows)
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    # Every row has the wall clock when it was logged; training rows the samples/s since the last.
    times = [r["time"] for r in rows]
    assert times == sorted(times) and abs(times[-1] - __import__("time").time()) < 120
    assert all(r["train/samples_per_s"] > 0 for r in train_rows)
    # ...the share of step time spent waiting for batches, and the process's peak memory (the CPU: its RSS).
    assert all(0.0 <= r["train/data_wait"] < 1.0 for r in train_rows)
    rss_gb = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    assert all(0.1 < r["train/peak_memory_gb"] <= rss_gb + 1e-3 for r in train_rows)
    assert eval_rows[-1]["val/top1"] > 0.5  # a tiny WRN at 16x16 after 2 epochs; chance is 0.1
    weights = load_file(run / "final" / "model.safetensors")
    model = timm.create_model("wrn10_1", num_classes=10)
    model.load_state_dict(weights)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ctx.accelerator.unwrap_model(ctx.model).state_dict()[name]), name


@pytest.mark.parametrize("augment_on", ["device", "loader"])
def test_launcher_matches_a_plain_pytorch_loop_bit_for_bit(digits, tmp_path, augment_on):
    """Same seed, data, SGD and cosine schedule: identical weights after crossing an epoch
    boundary (45 steps per epoch, so the short last batch of 29 is included), with the
    augmentation on the batch or per sample in the loader workers."""
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 3, "max_steps": 50},
                       data={"augment": {"crop_padding": 2, "rotation": 10}, "num_workers": 2,
                             "augment_on": augment_on})
    recipe = validate_recipe(raw)
    assert recipe.data.augment_on == augment_on
    ctx = train(recipe)
    reference, _ = plain_train(recipe, max_steps=50)
    ours = ctx.accelerator.unwrap_model(ctx.model).state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(value, ours[name]), name


def test_weight_decay_skips_biases_and_norm_layers(digits, tmp_path):
    recipe = validate_recipe(small_recipe(digits, tmp_path))
    model = timm.create_model("wrn10_1", num_classes=10)
    optimizer = create_optimizer(recipe.optimizer, default_param_groups(model, recipe.optimizer))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in by_decay[0.0]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert all(names[i].endswith("weight") and "bn" not in names[i] for i in by_decay[5e-4])
    recipe = validate_recipe(small_recipe(digits, tmp_path, optimizer={"decay_bias_and_norm": True}))
    groups = default_param_groups(model, recipe.optimizer)
    assert [g["weight_decay"] for g in create_optimizer(recipe.optimizer, groups).param_groups] == [5e-4]


def test_schedule_is_linear_warmup_then_cosine_per_step(digits, tmp_path):
    recipe = validate_recipe(small_recipe(digits, tmp_path, optimizer={"lr": 0.1},
                                          schedule={"warmup_epochs": 1, "warmup_lr": 0.0, "min_lr": 0.001}))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = create_schedule(recipe.schedule, optimizer, epochs=5, steps_per_epoch=10)
    lrs = []
    for step in range(50):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    for step in range(10):  # warmup: 0 -> 0.1 over 10 steps
        assert lrs[step] == pytest.approx(0.1 * step / 10)
    for step in range(10, 50):  # cosine from 0.1 to 0.001 over the remaining 40 steps
        t = (step - 10) / 40
        assert lrs[step] == pytest.approx(0.001 + 0.5 * (0.1 - 0.001) * (1 + math.cos(math.pi * t)))


def test_cosine_restarts_fill_the_run(digits, tmp_path):
    recipe = validate_recipe(small_recipe(digits, tmp_path, optimizer={"lr": 0.1},
                                          schedule={"cycles": 3, "cycle_mul": 2.0,
                                                                    "warmup_epochs": 0}))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = create_schedule(recipe.schedule, optimizer, epochs=7, steps_per_epoch=10)
    lrs = []
    for step in range(70):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    # Cycles of 10, 20 and 40 steps: the LR jumps back to its peak at steps 10 and 30.
    assert lrs[0] == lrs[10] == lrs[30] == pytest.approx(0.1)
    assert lrs[9] < 0.01 and lrs[29] < 0.01 and lrs[69] < 0.001


def test_max_steps_stops_and_still_evaluates_and_saves(digits, tmp_path):
    recipe = validate_recipe(small_recipe(digits, tmp_path / "run", train={"epochs": 5, "max_steps": 7}))
    ctx = train(recipe)
    assert ctx.step == 7
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 7 and "val/top1" in rows[-1]
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 7]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.filterwarnings("error::UserWarning")  # setting the step directly must not warn about step order
def test_onecycle_follows_smith_and_topin_per_group_and_is_stateless(digits, tmp_path):
    """Two cosine phases (Smith & Topin 2017, fastai/torch form): lr/div -> lr over pct_start of
    the run, then down to lr/div/final_div; momentum moves the other way (0.95 -> 0.85 -> 0.95).
    Each parameter group peaks at its own LR; any step can be set directly (resume)."""
    recipe = validate_recipe(small_recipe(digits, tmp_path, schedule={
        "name": "onecycle", "warmup_epochs": 0, "pct_start": 0.3, "div_factor": 10, "final_div_factor": 100}))
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02}], lr=0.1, momentum=0.9)
    scheduler = create_schedule(recipe.schedule, optimizer, epochs=5, steps_per_epoch=20)
    total, up_end = 100, 0.3 * 100 - 1

    def anneal(start, end, frac):
        return end + (start - end) / 2 * (1 + math.cos(math.pi * frac))

    for step in [0, 5, 29, 30, 64, 99, 17]:  # out of order: nothing depends on the previous call
        scheduler.step_update(step)
        for group, peak in zip(optimizer.param_groups, (0.1, 0.02)):
            low, final = peak / 10, peak / 10 / 100
            if step <= up_end:
                lr, momentum = anneal(low, peak, step / up_end), anneal(0.95, 0.85, step / up_end)
            else:
                frac = (step - up_end) / (total - 1 - up_end)
                lr, momentum = anneal(peak, final, frac), anneal(0.85, 0.95, frac)
            assert group["lr"] == pytest.approx(lr, rel=1e-9), step
            assert group["momentum"] == pytest.approx(momentum, rel=1e-9), step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * anneal(1 / 10, 1, 17 / up_end))
    with pytest.raises(LauncherError, match="warmup_epochs does not apply to onecycle"):
        validate_recipe(small_recipe(digits, tmp_path, schedule={"name": "onecycle", "warmup_epochs": 1}))


@pytest.fixture
def torch_numerics():
    """Restores torch's process-wide numerics switches after a test that runs train()."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4])


def test_gpu_numerics_follow_the_recipe_each_run(digits, tmp_path, torch_numerics):
    """train.tf32 / train.deterministic set torch's process-wide switches at the start of every
    run (a second run in the process does not inherit the first one's); on the CPU,
    deterministic anyway, the weights do not change. The GPU side: tests/test_gpu.py."""
    finals = []
    for deterministic in (True, False):
        raw = small_recipe(digits, tmp_path / str(deterministic), data={"val": None},
                           train={"epochs": 1, "max_steps": 5, "deterministic": deterministic,
                                  "tf32": not deterministic})
        ctx = train(validate_recipe(raw))
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.backends.cudnn.benchmark is (not deterministic)
        assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is (not deterministic)
        finals.append(ctx.accelerator.unwrap_model(ctx.model).state_dict())
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), name


def test_a_diverged_run_writes_strict_json_with_null_for_non_finite_values(digits, tmp_path):
    """A loss that overflows to inf/nan is written as null: every metrics.jsonl line (and the
    checkpoint's meta.json) parses as strict JSON."""
    import json as strict

    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 6}, run={"log_every": 1},
                       optimizer={"name": "sgd", "lr": 1e30, "weight_decay": 0.0}, schedule={"name": "constant"},
                       plugins={"checkpoint": {"every_steps": 3}})
    train(validate_recipe(raw))

    def refuse(text):
        raise ValueError(f"not JSON: {text}")

    rows = [strict.loads(line, parse_constant=refuse) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("train/loss") is None for row in rows), rows  # the run did diverge
    for meta in (tmp_path / "run" / "checkpoints").glob("*/meta.json"):
        strict.loads(meta.read_text(), parse_constant=refuse)


def test_a_log_file_gets_one_plain_line_per_row_and_no_carriage_returns(digits, tmp_path):
    """stdout is a pipe here, as in a Slurm log: no progress bar, a line per logged row."""
    import re
    import sys

    import yaml

    from tests.conftest import run_cli

    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10})
    raw["run"]["progress"] = True  # the default; a pipe still gets plain lines
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli([sys.executable, "-m", "launcher", str(tmp_path / "r.yaml")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[train]")]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(lines) == len(train_rows) == 2
    for line, row in zip(lines, train_rows):
        match = re.fullmatch(r"\[train\] step (\d+)/10 \((\d+)%\) epoch 0 \| loss (\S+) \| lr (\S+) \| "
                             r"([\d,]+) samples/s \| ETA (\d+):(\d\d):(\d\d) \| data wait (\d+)% \| peak ([\d.]+) GB"
                             r"( \| first step [\d.]+ s \(compilation, warm-up: not in samples/s or the ETA\))?", line)
        assert match, line
        assert bool(match[11]) == (row is train_rows[0])  # the first step is timed on its own
        assert int(match[9]) == round(100 * row["train/data_wait"]) and match[10] == f"{row['train/peak_memory_gb']:.2f}"
        assert int(match[1]) == row["step"] and int(match[2]) == row["step"] * 10
        assert match[3] == f"{row['train/loss']:.4f}" and float(match[4]) == pytest.approx(row["train/lr"], rel=1e-3)
        assert int(match[5].replace(",", "")) > 0
    assert re.search(r"^\[eval\] step 10 epoch 0: val/loss=\d\.\d{4}, val/top1=\d\.\d{4}", result.stdout, re.M)


def test_speed_and_eta_leave_out_the_first_step_and_evaluations(monkeypatch, capsys):
    """A first step that compiles for 30 s and a 5 s evaluation do not count as training speed:
    samples/s and the ETA are the steady state's (issue: '5 samples/s | ETA 0:03:20' while compiling)."""
    from types import SimpleNamespace

    import launcher.console as console_module

    clock = [100.0]
    monkeypatch.setattr(console_module.time, "perf_counter", lambda: clock[0])
    ctx = SimpleNamespace(total_steps=105, step=0, recipe=SimpleNamespace(name="r"))
    console = console_module.Console(ctx, enabled=True, live_bar=False)

    def steps(count, seconds_each):
        for _ in range(count):
            clock[0] += seconds_each
            console.step_done(128)

    def row(step):
        console.row({"step": step, "epoch": 0, "train/loss": 1.0, "train/lr": 0.1,
                     "train/samples_per_s": console.samples_per_second()})
        return capsys.readouterr().out

    steps(1, 30.0)  # compiling
    steps(4, 0.1)
    first = row(5)
    assert "1,280 samples/s | ETA 0:00:10" in first and "first step 30.0 s (compilation, warm-up" in first, first
    steps(5, 0.1)
    clock[0] += 5.0
    console.evaluation(10, 0, {"val/top1": 0.5}, seconds=5.0)
    steps(5, 0.1)
    second = row(15)
    assert "1,280 samples/s | ETA 0:00:09" in second and "first step" not in second, second
