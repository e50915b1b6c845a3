"""train/data_wait: the share of step time spent waiting for the next batch, measured against
known waits; one warning with the fix when the loader starves the steps. train/mfu's FLOP count."""

from __future__ import annotations

import json
import time

import torch

import launcher.loop
from launcher.config.load import validate_recipe
from launcher.loop import train
from launcher.throughput import DataWait
from tests.conftest import small_recipe


def slow(items, seconds):
    for item in items:
        time.sleep(seconds)
        yield item


def measured(loader_seconds: float, step_seconds: float, steps: int = 8) -> tuple[float, DataWait]:
    meter = DataWait(window=5)
    for _ in meter.batches(slow(range(steps), loader_seconds)):
        time.sleep(step_seconds)
        meter.step_done()
    return meter.row_share(), meter


def test_the_share_is_the_time_spent_waiting():
    # Sleeps only ever run long: a wait of 40 ms against no work is almost all waiting, and work of
    # 40 ms against no wait almost none, however loaded the machine.
    starved, meter = measured(0.04, 0.0)
    assert starved > 0.9 and meter.starved_share() > 0.9 and meter.starved_share() is None  # warned once
    assert len(meter.recent) == 5  # the pass's first batch (the loader starting) is not in the window
    fed, meter = measured(0.0, 0.04)
    assert fed < 0.1 and meter.starved_share() is None
    assert meter.row_share() == 0.0  # a new row starts empty


def test_a_starved_run_says_so_once_with_the_fix(digits, tmp_path, monkeypatch, capsys):
    """The loop's batches held back 100 ms each (several times a step of this tiny model, even on a
    loaded machine): the rows show it, and one warning names the fixes."""
    real = launcher.loop.batches
    monkeypatch.setattr(launcher.loop, "batches", lambda *args, **kwargs: slow(real(*args, **kwargs), 0.1))
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 2, "max_steps": 60},
                       run={"dir": str(tmp_path / "run"), "log_every": 20, "progress": False})
    train(validate_recipe(raw))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["train/data_wait"] for r in rows if "train/data_wait" in r]
    assert not any("train/mfu" in r for r in rows)  # no peak known for a CPU (tests/test_gpu.py: on CUDA)
    assert len(shares) == 3 and min(shares) > 0.2, shares
    err = capsys.readouterr().err
    assert err.count("the training loop waited for data") == 1, err
    assert "over the last 50 steps" in err and "more data.num_workers (now 0)" in err


def test_training_flops_are_counted_on_a_meta_copy_and_equal_the_formula_and_a_real_count():
    """A Linear layer on the images: forward 2*in*out per sample, backward as much again (the weight
    gradient; the images need none).
    A WideResNet: the meta-device count equals the count on real tensors; nothing real is touched."""
    import torch.nn as nn
    from torch.utils.flop_counter import FlopCounterMode

    from launcher.config.recipe import ModelSection
    from launcher.models.factory import create_model
    from launcher.throughput import peak_tflops, training_flops_per_sample

    assert training_flops_per_sample(lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)), 4, 3) == \
        2 * 2 * (3 * 4 * 4) * 5
    section = ModelSection(name="wrn10_1", num_classes=10)
    state = torch.random.get_rng_state()
    meta = training_flops_per_sample(lambda: create_model(section), 16, 3)
    assert torch.equal(state, torch.random.get_rng_state())  # no draws consumed
    model, counter = create_model(section), FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.zeros(2, dtype=torch.long)).backward()
    assert meta == counter.get_total_flops() / 2 > 1e6
    assert peak_tflops(torch.device("cpu")) is None
