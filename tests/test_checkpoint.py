"""checkpoint: exact resume (bit-identical weights, identical metrics.jsonl), corrupt and
failed checkpoints, recipe changes, retention, and every plugin's state across a resume."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

from launcher import registry
from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.checkpoints import list_checkpoints, recipe_differences, verify
from tests.conftest import metric_rows, small_recipe

AUGMENT = {"crop_padding": 2, "rotation": 10, "random_erasing": 0.3}


def recipe(digits, run_dir, max_steps, plugins=None, **sections):
    raw = small_recipe(digits, run_dir, train={"epochs": 2, "max_steps": max_steps},
                       data={"num_workers": 2, "augment": AUGMENT},
                       plugins={"checkpoint": {"every_steps": 10}, **(plugins or {})}, **sections)
    return validate_recipe(raw)


def same_run(a, b):
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metric_rows(a) == metric_rows(b)


def test_stopping_and_resuming_gives_the_same_model_and_metrics(digits, tmp_path):
    """45 steps per epoch: stop at 30 (mid-epoch) and at 60, resume, finish at 70."""
    train(recipe(digits, tmp_path / "straight", 70))
    for stop in (30, 60, 70):
        train(recipe(digits, tmp_path / "pieces", stop))
    same_run(tmp_path / "straight", tmp_path / "pieces")
    names = [p.name for p in list_checkpoints(tmp_path / "pieces")]
    assert names == ["step-00000070", "step-00000060"]  # keep_last: 2


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(digits, tmp_path):
    train(recipe(digits, tmp_path / "straight", 40))
    train(recipe(digits, tmp_path / "run", 30))
    newest = list_checkpoints(tmp_path / "run")[0]
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match=r"skipping checkpoint step-00000030: '.*model.safetensors' is missing or truncated"):
        train(recipe(digits, tmp_path / "run", 40))
    same_run(tmp_path / "straight", tmp_path / "run")


def test_bit_flips_are_caught_by_the_checksum(digits, tmp_path):
    train(recipe(digits, tmp_path / "run", 10))
    folder = list_checkpoints(tmp_path / "run")[0]
    data = bytearray((folder / "trainer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "trainer.pt").write_bytes(bytes(data))
    assert "trainer.pt' is corrupt" in verify(folder)


def test_a_failed_write_fails_loudly_and_keeps_the_previous_checkpoint(digits, tmp_path, monkeypatch):
    train(recipe(digits, tmp_path / "run", 10))
    import launcher.plugins.checkpoint as ck

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(LauncherError, match=r"Could not write the checkpoint at step 20 .*No space left.*step-00000010"):
        train(recipe(digits, tmp_path / "run", 20))
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["step-00000010"] and verify(tmp_path / "run" / "checkpoints" / "step-00000010") is None


def test_resuming_with_a_changed_recipe_is_refused_with_the_differences(digits, tmp_path):
    train(recipe(digits, tmp_path / "run", 10))
    changed = recipe(digits, tmp_path / "run", 20, optimizer={"lr": 0.2, "name": "momentum"})
    with pytest.raises(LauncherError, match=r"different recipe.*optimizer.lr: 0.05 -> 0.2"):
        train(changed)
    # status.json tells the truth: the relaunch failed (it said "finished", from the run before).
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "optimizer.lr: 0.05 -> 0.2" in status["error"], status
    # train.max_steps and train.epochs are safe to change
    assert recipe_differences({"train": {"epochs": 1, "max_steps": 5}}, {"train": {"epochs": 3, "max_steps": 9}}) == []


def test_a_checkpoint_from_before_a_new_recipe_key_resumes_while_the_key_keeps_its_default(digits, tmp_path):
    """An upgrade mid-run: the saved recipe lacks keys added since (here a whole section and
    a plain key); they count as their defaults, so only a recipe that moves one is refused."""
    current = recipe(digits, tmp_path / "run", 10).to_dict()
    saved = json.loads(json.dumps(current))
    del saved["distributed"], saved["optimizer"]["decay_bias_and_norm"]
    assert recipe_differences(saved, current) == []
    moved = json.loads(json.dumps(current))
    moved["optimizer"]["decay_bias_and_norm"] = True
    moved["distributed"]["failure_timeout"] = 5.0  # safe to change
    moved["train"]["tf32"], moved["train"]["deterministic"] = False, True  # kernels, not the run: safe too
    moved["distributed"]["strategy"] = "deepspeed"
    assert recipe_differences(saved, moved) == ["distributed.strategy: 'ddp' -> 'deepspeed'",
                                                "optimizer.decay_bias_and_norm: False -> True"]
    # Keys without a schema default (plugin options) are not filled in: a plugin added since is a difference.
    with_ema = json.loads(json.dumps(current))
    with_ema["plugins"]["ema"] = {"decay": 0.99}
    assert recipe_differences(saved, with_ema) == ["plugins.ema.decay: '(absent)' -> 0.99"]
    # Recipes now resolve plugin options with their defaults; a checkpoint saved as `mixup: {}` resumes.
    filled = recipe(digits, tmp_path / "run", 10, plugins={"mixup": {}}).to_dict()
    assert filled["plugins"]["mixup"]["mixup_alpha"] == 0.8 and filled["plugins"]["mixup"]["mode"] == "batch"
    old_style = json.loads(json.dumps(filled))
    old_style["plugins"]["mixup"] = {}
    assert recipe_differences(old_style, filled) == []
    filled["plugins"]["mixup"]["mixup_alpha"] = 0.2
    assert recipe_differences(old_style, filled) == ["plugins.mixup.mixup_alpha: 0.8 -> 0.2"]


def test_resume_none_starts_afresh_and_keeps_the_old_checkpoints(digits, tmp_path):
    recorder = {"recorder": {"trace": False}}
    train(recipe(digits, tmp_path / "run", 10, plugins=recorder))
    fresh = recipe(digits, tmp_path / "run", 10,
                   plugins={"checkpoint": {"every_steps": 10, "resume": "none"}, **recorder})
    with pytest.warns(UserWarning, match="moved to"):
        train(fresh)
    # All 10 steps were trained again (a resume from step 10 would have trained none).
    trained = json.loads((tmp_path / "run" / "recorder-rank0.json").read_text())["steps"]
    assert [s["step"] for s in trained] == list(range(10))
    moved = list(tmp_path.joinpath("run").glob("checkpoints-*"))
    assert len(moved) == 1 and verify(moved[0] / "step-00000010") is None


def test_keep_best_keeps_the_best_by_the_monitored_metric(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 4}, data={"batch_size": 256},
                       plugins={"checkpoint": {"every_epochs": 1, "keep_last": 1, "keep_best": 1,
                                               "monitor": "val/loss", "mode": "min"}})
    train(validate_recipe(raw))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    best_step = min(evals, key=evals.get)
    kept = {p.name for p in list_checkpoints(tmp_path / "run")}
    assert kept == {f"step-{max(evals):08d}", f"step-{best_step:08d}"}


# Options that make each plugin runnable in a short CPU run; every registered plugin must
# appear here, so a new plugin cannot skip the resume test.
PLUGIN_OPTIONS = {
    "amp": {"dtype": "bf16"},
    "ema": {"decay": 0.9},
    "grad_accum": {"micro_batches": 2},
    "label_smoothing": {"smoothing": 0.1},
    "sam": {"rho": 0.05},
    "tta": {},
    "wandb": {"mode": "disabled"},
    "tensorboard": {},
    "csv_log": {},
    "distill": "teacher",
    "mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0},
    "early_stopping": {"monitor": "val/loss", "mode": "min", "patience": 3},
    "grad_clip": {"max_norm": 1.0},
    "nan_guard": {"action": "skip"},
    "focal_loss": {"gamma": 2.0, "class_weights": "balanced"},
    "layer_lr": {"lrs": [0.01, 0.05], "freeze_epochs": 1},
    "pretrained": "teacher",
    "progressive_resize": {"sizes": [8, 16], "epochs": [0, 1]},
    "balanced_sampling": {"power": 0.5},
    "weight_init": {"scheme": "orthogonal"},
    "overfit_batch": {"threshold": 0.0},
    "report": {},
    "lr_finder": None,  # declares itself incompatible with checkpoint (a throw-away sweep)
    "checkpoint": None,  # the mechanism under test
    "recorder": {"trace": False},
    "optuna_pruning": "study",  # an Optuna trial to report to (the search's, made here)
    "bce": {"pos_weight": 2.0, "sum_classes": True},
    "profiler": {"start_step": 5, "steps": 10},  # a window the resume cuts in two
    "swa": {"start": 0, "every_steps": 3, "swa_lr": 0.02, "anneal_epochs": 4},  # averaging and annealing across it
}


def test_every_registered_plugin_is_covered():
    builtin = {n for n, c in registry.discover().items() if c.__module__.startswith(("launcher.plugins.", "tests."))
               and not n.startswith(("test_", "bench_"))}
    assert builtin <= set(PLUGIN_OPTIONS), builtin - set(PLUGIN_OPTIONS)
    # Only a plugin that refuses to run with checkpoints may skip the resume test.
    skipped = {n for n, o in PLUGIN_OPTIONS.items() if o is None} - {"checkpoint"}
    assert all("checkpoint" in registry.discover()[n].incompatible for n in skipped), skipped


@pytest.mark.parametrize("name", [n for n, o in PLUGIN_OPTIONS.items() if o is not None])
def test_every_plugin_survives_save_and_resume(name, digits, tmp_path):
    """2N steps straight equals N steps, a checkpoint, a resume and N more."""
    options = PLUGIN_OPTIONS[name]
    if options == "teacher":  # a finished run whose weights the plugin reads
        train(validate_recipe(small_recipe(digits, tmp_path / "teacher", train={"epochs": 1, "max_steps": 5})))
        options = {"distill": {"checkpoint": str(tmp_path / "teacher")},
                   "pretrained": {"weights": str(tmp_path / "teacher")}}[name]
    if options == "study":  # a search's study with a running trial; the pruner never prunes
        optuna = pytest.importorskip("optuna")
        storage = f"sqlite:///{tmp_path / 'search.db'}"
        optuna.create_study(study_name="s", storage=storage).ask()
        options = {"storage": storage, "study": "s", "trial": 0, "pruner": "none"}
    for run, stops in (("straight", (20,)), ("resumed", (10, 20))):
        for stop in stops:
            train(recipe(digits, tmp_path / run, stop, plugins={name: options}))
    same_run(tmp_path / "straight", tmp_path / "resumed")


def test_extending_a_finished_run_replans_the_schedule_over_the_new_length(digits, tmp_path, capsys):
    """Run 1 epoch to the end, relaunch with train.epochs=2: the new steps follow the 2-epoch
    cosine schedule (as if launched with 2 epochs), not the finished 1-epoch one (LR 0)."""
    from launcher.optim import create_schedule

    def extended(epochs):
        return validate_recipe(small_recipe(digits, tmp_path / "run", train={"epochs": epochs}, data={"val": None},
                                            plugins={"checkpoint": {}}))

    first = train(extended(1))
    steps = first.steps_per_epoch
    second = train(extended(2))
    assert second.step == 2 * steps
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    new_rows = [row for row in rows if row["step"] > steps]
    assert len(new_rows) >= steps // 5
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    schedule = create_schedule(extended(2).schedule, probe, 2, steps)
    for row in new_rows:
        schedule.step_update(row["step"])
        assert row["train/lr"] > 0 and row["train/lr"] == pytest.approx(probe.param_groups[0]["lr"], rel=1e-9)
    assert "train.epochs changed from 1 to 2" in capsys.readouterr().out


class _Evil:
    """A pickle that runs a shell command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def resign(folder):
    """What a tamperer who knows the format does: rewrite meta.json's checksums and digest."""
    from launcher.runlog import file_sha256
    from launcher.checkpoints import meta_digest

    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                     for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "meta.json"}
    meta["meta_sha256"] = meta_digest(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_damaged_checkpoints_are_skipped_whatever_the_damage(digits, tmp_path):
    """meta.json emptied, its file list emptied with files gone, its step edited (with and
    without a new digest), a pickle that weights_only refuses (even with checksums re-signed):
    each is a reason from verify, never an exception; a resume skips it with a warning, and the
    pickle's code never runs."""
    import shutil

    train(recipe(digits, tmp_path / "run", 20))
    newest = tmp_path / "run" / "checkpoints" / "step-00000020"
    marker = tmp_path / "pwned"

    def empty(f):
        (f / "meta.json").write_text("{}")

    def no_files(f):
        meta = json.loads((f / "meta.json").read_text())
        from launcher.checkpoints import meta_digest

        meta["files"] = {}
        meta["meta_sha256"] = meta_digest(meta)  # a consistent meta.json, listing nothing
        (f / "meta.json").write_text(json.dumps(meta))
        (f / "trainer.pt").unlink()

    def step_edited(f):
        meta = json.loads((f / "meta.json").read_text())
        meta["step"] = 3
        (f / "meta.json").write_text(json.dumps(meta))

    def step_edited_and_resigned(f):
        step_edited(f)
        resign(f)

    def evil_pickle(f):
        torch.save({"optimizer": _Evil(marker)}, f / "trainer.pt")
        resign(f)

    damages = {"empty meta": (empty, "no file list"), "files gone": (no_files, "does not list model.safetensors"),
               "step edited": (step_edited, "modified after the checkpoint was written"),
               "step edited, re-signed": (step_edited_and_resigned, "says step 3, but the folder is step-00000020"),
               "evil pickle": (evil_pickle, "cannot be loaded safely")}
    for name, (damage, reason) in damages.items():
        copy = tmp_path / name.replace(" ", "_").replace(",", "") / newest.name
        shutil.copytree(newest, copy)
        damage(copy)
        assert reason in (verify(copy) or ""), (name, verify(copy))

    evil_pickle(newest)
    with pytest.warns(UserWarning, match=r"skipping checkpoint step-00000020: .*trainer.pt' cannot be loaded safely"):
        ctx = train(recipe(digits, tmp_path / "run", 25))
    assert ctx.step == 25 and not marker.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs; needs root, else the test is skipped) that a test can grow."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")

    def grow(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, grow
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_run_keeping_the_last_checkpoint_and_the_relaunch_resumes_exactly(
        digits, tmp_path, small_disk):
    """A checkpoint is ~650 kB: step 10's fits on 1 MiB, step 20's does not. The run stops with
    the newest intact checkpoint named and no half-written folder; after freeing space the same
    command resumes from step 10 and ends as an uninterrupted run."""
    disk, grow = small_disk
    train(recipe(digits, tmp_path / "straight", 20))
    with pytest.raises(LauncherError, match=r"Could not write the checkpoint at step 20 \(the disk is full: \d+ MiB free; "
                                            r".*the newest intact checkpoint is .*step-00000010\. Free disk space"):
        train(recipe(digits, disk / "run", 20))
    assert [p.name for p in (disk / "run" / "checkpoints").iterdir()] == ["step-00000010"]
    assert verify(disk / "run" / "checkpoints" / "step-00000010") is None
    assert json.loads((disk / "run" / "status.json").read_text())["state"] == "failed"
    grow("4m")
    train(recipe(digits, disk / "run", 20))
    same_run(tmp_path / "straight", disk / "run")


def test_resaving_a_step_that_has_an_intact_checkpoint_replaces_it(digits, tmp_path):
    """Resuming from an older checkpoint (resume: PATH) trains over a step saved before: the intact
    checkpoint of that step is replaced, not set aside as .corrupt (that is for damaged ones)."""
    train(recipe(digits, tmp_path / "run", 20))
    older = tmp_path / "run" / "checkpoints" / "step-00000010"
    train(recipe(digits, tmp_path / "run", 20, plugins={"checkpoint": {"every_steps": 10, "resume": str(older)}}))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    assert verify(tmp_path / "run" / "checkpoints" / "step-00000020") is None


def test_the_run_directory_lock_sees_a_rank_of_another_launch_and_dies_with_it(tmp_path):
    """An orphaned rank 1 of a killed launch still holds its byte of .lock: a new launch is refused
    until that process is gone (the kernel drops its lock; nothing stale to clean up)."""
    import subprocess
    import sys

    from launcher.runlog import RunDirLock

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX, 1, 1); print('locked', flush=True); time.sleep(120)",
                               str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        problem = RunDirLock(tmp_path).acquire_main()
        assert problem and "is in use by another run" in problem and "give this run another run.dir" in problem
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(tmp_path)
    assert lock.acquire_main() is None
    assert f"pid {__import__('os').getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()


def test_a_checkpoint_written_by_an_earlier_version_resumes(digits, tmp_path):
    """tests/fixtures/checkpoint_format2 was written by an earlier launcher (see its script): steps 10
    and 20 of one run. Today's code resumes from step 10 and reaches the state it had at step 20:
    weights, optimizer momentum, the EMA plugin's weights, progress and logged rows.

    Not bit for bit: the fixture comes from another CPU, whose kernels round apart by ~1e-7, and ten
    steps of training amplify that (measured on a Xeon against the fixture's CPU: up to 1.1e-4 in the
    stem, 0.3% of what those ten steps changed; resumed from a step 10 written on the same CPU, the
    result is bit-identical; momentum buffers, being gradients, moved furthest: 2.3%). So each tensor
    must land within 5% of its own change over the ten steps: a state read wrongly misses by far more
    (checked on the fixture: momentum zeroed at step 10, the worst tensor misses by 143%; the EMA
    restarted from the weights, 42%). Accuracies may differ by a sample or two of the 360 (a logit
    near a tie: seen, 0.6000 vs 0.6028)."""
    import shutil

    import yaml

    from tests.fixtures.write_old_checkpoint import OUT, recipe as old_recipe

    run = tmp_path / "run"
    shutil.copytree(OUT / "step-00000010", run / "checkpoints" / "step-00000010")
    old_meta = json.loads((OUT / "step-00000010" / "meta.json").read_text())
    rows = (OUT / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[: old_meta["metrics_rows"]]) + "\n")
    raw = old_recipe(digits["train"], digits["val"], run)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    ctx = train(validate_recipe(raw))
    assert ctx.step == 20

    new, old = run / "checkpoints" / "step-00000020", OUT / "step-00000020"
    assert verify(new) is None
    new_meta, old_meta = (json.loads((f / "meta.json").read_text()) for f in (new, old))
    for key in ("step", "epoch", "step_in_epoch", "last_eval_step", "metrics_rows", "streams", "global_batch"):
        assert new_meta[key] == old_meta[key], key

    start = OUT / "step-00000010"

    def close(resumed, reference, at_start, what):
        """resumed within 5% of how far the old run moved this tensor in the ten steps (floor 1e-6)."""
        resumed, reference, at_start = resumed.float(), reference.float(), at_start.float()
        moved = (reference - at_start).abs().max().item()
        missed = (resumed - reference).abs().max().item()
        assert missed <= max(0.05 * moved, 1e-6), f"{what}: missed by {missed:.2e}, the ten steps moved it {moved:.2e}"

    new_w, old_w, start_w = (load_file(f / "model.safetensors") for f in (new, old, start))
    assert new_w.keys() == old_w.keys()
    for key in new_w:
        close(new_w[key], old_w[key], start_w[key], key)
    new_t, old_t, start_t = (torch.load(f / "trainer.pt", weights_only=True) for f in (new, old, start))

    def momentum(trainer):
        return [s["momentum_buffer"] for s in trainer["optimizer"]["state"].values()]

    assert momentum(new_t) and len(momentum(new_t)) == len(momentum(old_t)) == len(momentum(start_t))
    for i, tensors in enumerate(zip(momentum(new_t), momentum(old_t), momentum(start_t))):
        close(*tensors, f"momentum {i}")
    assert new_t["plugins"].keys() == old_t["plugins"].keys()
    ema_new, ema_old, ema_start = (t["plugins"]["ema"] for t in (new_t, old_t, start_t))
    compared = 0
    for key, value in ema_old.items():
        if isinstance(value, dict):
            for k, v in value.items():
                if v.dtype.is_floating_point:
                    close(ema_new[key][k], v, ema_start[key][k], f"ema {k}")
                    compared += 1
    assert compared
    logged = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(r) for r in rows]
    assert [r["step"] for r in logged[: len(expected)]] == [r["step"] for r in expected]
    for a, b in zip(logged, expected):
        for key, value in b.items():
            if key.endswith(("/top1", "/top5")):  # a fraction of the eval samples: two may flip
                tolerance = 2 / b[key.rsplit("/", 1)[0] + "/samples"]
                assert a[key] == pytest.approx(value, abs=tolerance), (a["step"], key)
            else:
                assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
