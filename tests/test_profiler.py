"""profiler: a Chrome-trace file (Perfetto, TensorBoard's profiler) of exactly the steps asked for."""

from __future__ import annotations

import json
import re

from launcher.config.load import validate_recipe
from launcher.loop import train
from tests.conftest import small_recipe


def test_the_trace_holds_the_steps_asked_for_and_their_operators(digits, tmp_path, capsys):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 8},
                       plugins={"profiler": {"start_step": 3, "steps": 3}})
    train(validate_recipe(raw))
    traces = list((tmp_path / "run" / "profiler").iterdir())
    assert [p.name for p in traces] == ["rank0.steps-3-5.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#3", "ProfilerStep#4",
                                                                         "ProfilerStep#5"]
    assert {"aten::convolution", "aten::convolution_backward"} <= names  # the forward and the backward
    assert any(re.match(r"Optimizer\.step#\w+\.step", n) for n in names), sorted(names)[:50]
    assert "[profiler] steps 3-5: " in capsys.readouterr().out


def test_a_run_that_ends_inside_the_window_writes_what_it_recorded(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 4},
                       plugins={"profiler": {"start_step": 3, "steps": 5}})
    train(validate_recipe(raw))
    traces = list((tmp_path / "run" / "profiler").iterdir())
    assert [p.name for p in traces] == ["rank0.steps-3-4.pt.trace.json"]
    names = {e.get("name", "") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#3", "ProfilerStep#4"]
