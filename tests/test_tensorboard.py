"""The tensorboard plugin: every metrics.jsonl row as scalars, one point per step after a resume."""

from __future__ import annotations

import json
import shutil

import pytest

from launcher.loop import train
from launcher.config.load import validate_recipe
from tests.conftest import small_recipe

pytest.importorskip("tensorboard")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard itself reads back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_curves_equal_metrics_jsonl(run) -> None:
    """One TensorBoard point per logged row, none lost or repeated, with the row's value."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curves = scalars(run)
    for key in ("train/loss", "train/lr", "val/loss", "val/top1"):
        expected = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in curves[key]] == [s for s, _ in expected], key  # one point per step
        assert [v for _, v in curves[key]] == pytest.approx([v for _, v in expected], rel=1e-6), key


def test_rows_become_scalars_and_a_resume_leaves_one_point_per_step(digits, tmp_path):
    run = tmp_path / "run"

    def recipe(max_steps):
        return validate_recipe(small_recipe(digits, run, train={"epochs": 2, "max_steps": max_steps},
                                            plugins={"checkpoint": {"every_steps": 10}, "tensorboard": {}}))

    train(recipe(25))
    # As if the run had been killed after step 25's row but before its checkpoint: the relaunch
    # resumes at step 20 and logs step 25 again.
    shutil.rmtree(run / "checkpoints" / "step-00000025")
    train(recipe(50))
    assert_curves_equal_metrics_jsonl(run)
    curves = scalars(run)
    assert [s for s, _ in curves["train/loss"]] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]


def test_dashboards_refuse_a_run_directory_they_cannot_write_before_training(digits, tmp_path, capsys):
    """A read-only run directory (a real read-only mount; skipped where mounting needs root) was a
    traceback; a file where tensorboard/ goes, or a folder where metrics.csv goes, too. Each is one
    paragraph before any step, and a good run directory is untouched by the refusal."""
    import subprocess

    from launcher.__main__ import main as launcher_main
    from launcher.errors import LauncherError

    def recipe(run):
        return validate_recipe(small_recipe(digits, run, train={"epochs": 1, "max_steps": 2},
                                            plugins={"tensorboard": {}, "csv_log": {}}))

    run = tmp_path / "in-the-way"
    (run / "tensorboard").parent.mkdir()
    (run / "tensorboard").write_text("someone's notes")
    with pytest.raises(LauncherError, match="plugins.tensorboard writes into .* which is a file"):
        train(recipe(run))
    (run / "tensorboard").unlink()
    (run / "metrics.csv").mkdir()
    with pytest.raises(LauncherError, match="plugins.csv_log writes .* which is a folder"):
        train(recipe(run))
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]  # nothing trained, nothing written
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        import yaml

        path = tmp_path / "ro.yaml"
        path.write_text(yaml.safe_dump(small_recipe(digits, mount_point / "run", train={"epochs": 1, "max_steps": 2},
                                                    plugins={"tensorboard": {}, "csv_log": {}})))
        assert launcher_main([str(path)]) == 2
        err = capsys.readouterr().err
        assert f"run.dir '{mount_point / 'run'}' cannot be written" in err and "read-only" in err
        assert "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
