"""Shared fixtures: real shards written once per session, and small recipes for fast runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# One intra-op thread per process, set before torch is imported (subprocesses and Slurm jobs inherit
# it): `make test` runs 2 xdist workers, and their ranks, on 2 cores, and torch's default of one
# thread per core oversubscribes them, OpenMP's spin-waiting burning the core the other process
# needs. Measured: the same 5 resume tests in 2 parallel pytest processes took 209 s each with
# the default, 36 s with OMP_NUM_THREADS=1. A value set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Subprocess runs must find the test-only plugins (tests/recorder_plugin.py).
os.environ.setdefault("LAUNCHER_PLUGINS", "tests.recorder_plugin")
os.environ.setdefault("WANDB_SILENT", "true")
# Shard indexes and downloads are cached per test session, not in ~/.cache (a stale entry of an
# earlier session's temporary path must not stand in for a test's freshly written shard).
_OWN_CACHE = "LAUNCHER_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    import tempfile

    os.environ["LAUNCHER_CACHE_DIR"] = tempfile.mkdtemp(prefix="launcher-test-cache-")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["LAUNCHER_CACHE_DIR"], ignore_errors=True)


# The longest test files first: `make test` hands whole files to 2 xdist workers in collection
# order, so a long file started last would run alone at the end while the other worker idles.
LONGEST_FILES_FIRST = ("test_slurm.py", "test_readme_commands.py", "test_distributed.py", "test_kill_resume.py",
                       "test_streaming.py", "test_checkpoint.py", "test_fast_paths.py", "test_multiprocess.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Where the suite's CPU goes: on 2 busy cores a test's wall time (--durations) says as much about
# what ran beside it as about the test. LAUNCHER_TEST_CPU_LOG=FILE appends a JSON line per test: the
# CPU seconds of the test process and of the subprocesses it waited for (module fixtures count
# for the first test using them; Slurm jobs run under slurmd and are not counted).
_CPU_LOG = os.environ.get("LAUNCHER_TEST_CPU_LOG")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _CPU_LOG:
        yield
        return
    import resource
    import time

    def cpu() -> tuple[float, float]:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime

    (own, children), start = cpu(), time.perf_counter()
    yield
    (own_after, children_after), wall = cpu(), time.perf_counter() - start
    with open(_CPU_LOG, "a") as log:
        log.write(json.dumps({"test": item.nodeid, "own_cpu": round(own_after - own, 1),
                              "children_cpu": round(children_after - children, 1), "wall": round(wall, 1)}) + "\n")


def write_shards(out: Path, *args: str) -> dict:
    from launcher.data.writer import main

    assert main([*args, "--out", str(out)]) == 0
    return json.loads((out / "info.json").read_text())


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """The real digits set as raw-uint8 shards (4 train shards, 1 val shard)."""
    return write_shards(tmp_path_factory.mktemp("digits"), "digits")


@pytest.fixture(scope="session")
def digits_png(tmp_path_factory) -> dict:
    return write_shards(tmp_path_factory.mktemp("digits_png"), "digits", "--format", "png")


# Row fields that differ between two runs of the same training (wall clock, measured speed).
TIMING_FIELDS = ("time", "train/samples_per_s", "train/data_wait", "train/peak_memory_gb", "train/mfu")


def written_lines(path: Path) -> list[str]:
    """The lines a running writer has finished: a line being appended can be read half-written (a
    reader sees each page of a write() as it is copied; seen once, cut after 108 characters)."""
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].splitlines()


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields: what two runs of the same training share exactly."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def small_recipe(info: dict, run_dir: Path, **sections) -> dict:
    """A raw recipe mapping for a fast CPU run on the shards of `info` (an info.json dict)."""
    recipe = {
        "seed": 0,
        "run": {"dir": str(run_dir), "log_every": 5, "progress": False},
        "model": {"name": "wrn10_1", "num_classes": info["num_classes"]},
        "data": {"train": info["train"], "val": info["val"], "batch_size": 32, "num_workers": 0,
                 "image_size": 16, "streams": 2},
        "train": {"epochs": 1},
        "optimizer": {"name": "momentum", "lr": 0.05, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600, cwd: Path = REPO):
    """Run a command with the repo's Python (or accelerate) and return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    # Its own process group, so a timeout ends the ranks too (subprocess.run kills only the
    # launcher, and orphaned ranks would slow every later test).
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


from launcher.strategies.select import free_port  # noqa: E402,F401  (tests import it from here)


# `accelerate launch` without the `accelerate` CLI's own start-up: the same launch_command, but
# the CLI imports every subcommand first (`accelerate estimate-memory` imports timm and
# transformers: 8.7 s of CPU here before a rank starts, 2.8 s this way). The README's literal
# `accelerate launch` commands are run as written by test_readme_commands.py.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def accelerate_cmd(num_processes: int) -> list[str]:
    """The command prefix that runs `-m launcher ...` on N CPU processes (see FACTS.md)."""
    if num_processes == 1:
        return [sys.executable, "-m"]
    return [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m"]


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback, for the whole session (tests/object_store.py)."""
    from tests.object_store import ObjectStore

    store = ObjectStore(tmp_path_factory.mktemp("seaweedfs") / "data")
    store.start()
    # Credentials for the launcher's boto3 (in-process runs and subprocesses); the endpoint is given
    # by each test (data.s3_endpoint or AWS_ENDPOINT_URL), so both ways are used.
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({k: store.env[k] for k in saved})
    yield store
    store.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def digits20(tmp_path_factory) -> dict:
    """The digits set in 20 training shards (72 samples each) and 5 validation shards: enough
    shards for a bounded cache to matter."""
    return write_shards(tmp_path_factory.mktemp("digits20"), "digits", "--shard-size", "72")


@pytest.fixture(scope="session")
def remote_digits20(object_store, digits20) -> dict:
    """digits20 uploaded with its index files (prefix d20) and without them (prefix d20-bare);
    patterns for s3:// and for http:// (the same objects through the store's HTTP filer)."""
    folder = Path(digits20["train"]).parent
    object_store.upload_folder(folder, "d20")
    object_store.upload_folder(folder, "d20-bare", index_files=False)
    return {**digits20,
            "s3_train": object_store.s3_url("d20", digits20["train"]),
            "s3_val": object_store.s3_url("d20", digits20["val"]),
            "http_train": object_store.http_url("d20", digits20["train"]),
            "http_val": object_store.http_url("d20", digits20["val"]),
            "bare_train": object_store.s3_url("d20-bare", digits20["train"])}


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody may write into, root included: a read-only tmpfs mounted there (root, as in
    CI), else a chmod 500 folder (others); skips when neither holds."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(path)],
                             capture_output=True, text=True).returncode == 0
    if not mounted:
        path.chmod(0o500)
    try:
        if os.access(path, os.W_OK):
            pytest.skip(f"cannot make {path} read-only here (no mount, and this user writes anyway)")
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
        else:
            path.chmod(0o700)
