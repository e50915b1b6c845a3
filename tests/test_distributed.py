"""Multi-node, DeepSpeed and FSDP (launcher/strategies/select.py, deepspeed_zero.py,
fsdp.py, watchdog.py).

Equivalence on the CPU (gloo), with the tolerances and why:
- 1 process (batch 64) vs 2 processes (2 x 32) vs 2 "nodes" (two `accelerate launch`
  invocations on loopback, one rank each): the model uses GroupNorm, since BatchNorm's
  statistics are per-rank by design (32 vs 64 samples) and would make the runs differ for a
  reason that is not a bug. One process computes the mean gradient over 64 samples in one
  reduction, two ranks as two partial means averaged by the all-reduce: the float rounding
  differs (~1e-7 relative per step), so weights agree to atol 1e-5 / rtol 1e-4 and losses
  to rtol 1e-5 after the 23 steps. 2 processes and 2 nodes run the same arithmetic
  (same ranks, same gloo all-reduce) and must agree bit for bit.
- DeepSpeed ZeRO 1/2/3 vs DDP, 2 ranks, BatchNorm model, with EMA, label smoothing and a
  stop + resume in the middle: ZeRO reduce-scatters into fp32 partitions where DDP
  all-reduces buckets, so sums may be formed in another order; weights and EMA must agree to
  atol 1e-5 / rtol 1e-4, losses to rtol 1e-5 (with 2 ranks a sum of two terms is exact, and
  they agree bit for bit here).
- Gradient accumulation under ZeRO-2 (DeepSpeed's gradient_accumulation_steps = the
  plugin's k) vs DDP, GroupNorm model: same tolerance. GroupNorm because ZeRO-2/3 reduce
  each micro-batch (another summation order, ~4e-7), which a BatchNorm model with
  micro-batches of 16 amplifies to 1e-1 in 23 steps; DDP reducing every micro-batch moves
  as far (measured, README 'Multi-node, DeepSpeed and FSDP').
- FSDP2 vs DDP, 2 ranks: the same sums of two terms, so they agree bit for bit without SAM or
  clipping (checked to the DDP tolerance); SAM's and clipping's norms over sharded gradients
  are formed in another order (1.5e-8 after 4 steps).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from launcher.errors import LauncherError
from launcher.config.load import validate_recipe
from tests.conftest import ACCELERATE_LAUNCH, REPO, accelerate_cmd, free_port, run_cli, small_recipe

# One process and two (or DDP and ZeRO) add the same per-sample gradients in another order; the
# float32 rounding differences depend on the CPU's kernels. On an AMD EPYC machine, 23 steps
# left 1.2e-5 of the loss and up to 8e-5 on 6 of 18,432 conv weights (the same on the commits
# before, so the machine, not a change); a wrong normalisation of the loss or a sample used
# twice moves the loss by 1e-3 and more. The weight tolerance is the GPU tests' (test_gpu.py).
WEIGHT_TOL = dict(atol=1e-4, rtol=1e-3)
LOSS_RTOL = 5e-5


def write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def weights(run_dir: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / name))


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def assert_close_weights(a: dict, b: dict, tol: dict = WEIGHT_TOL) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == (torch.float32 if a[key].is_floating_point() else a[key].dtype), key
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m: f"{key}: {m}")


def assert_close_losses(a, b, tol: dict | None = None) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, **(tol or {"rel": LOSS_RTOL})), f"step {step}: {x} vs {y}"


def node_commands(recipe: Path, port: int, overrides=(), processes: int = 2) -> list[list[str]]:
    """Two 'machines' on loopback: one `accelerate launch` per machine rank (FACTS.md)."""
    return [[*ACCELERATE_LAUNCH, "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
             "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_processes", str(processes),
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "launcher", str(recipe), *overrides]
            for rank in (0, 1)]


def run_nodes(commands, env=None, timeout=600) -> list[tuple[int, str, float]]:
    """Start both machines at once; (exit status, output, time it ended) per machine."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                              cwd=REPO, start_new_session=True) for c in commands]
    results = [None, None]

    def wait(i):
        try:
            out, _ = procs[i].communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # end the machine's ranks too, or they slow every later test
            os.killpg(procs[i].pid, signal.SIGKILL)
            out = procs[i].communicate()[0] + f"\n[test] killed after {timeout} s"
        results[i] = (procs[i].returncode, out, time.time())

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ------------------------------------------------------------------ recipes and config (fast)


def test_deepspeed_keys_need_the_deepspeed_strategy(digits, tmp_path):
    for key, value in (("zero_stage", 2), ("offload", "optimizer"), ("deepspeed_config", "ds.json")):
        raw = small_recipe(digits, tmp_path, distributed={key: value})
        with pytest.raises(LauncherError, match=f"distributed.{key} applies to strategy deepspeed only"):
            validate_recipe(raw)
    raw = small_recipe(digits, tmp_path, distributed={"strategy": "deepspeed", "zero_stage": 2,
                                                      "offload": "optimizer_and_params"})
    with pytest.raises(LauncherError, match="needs zero_stage 3"):
        validate_recipe(raw)
    raw = small_recipe(digits, tmp_path, distributed={"strategy": "horovod"})
    with pytest.raises(LauncherError, match="distributed.strategy"):
        validate_recipe(raw)
    recipe = validate_recipe(small_recipe(digits, tmp_path, distributed={"strategy": "deepspeed"}))
    assert recipe.distributed.stage == 2  # the default stage


def test_a_deepspeed_json_file_is_checked_against_the_recipe(digits, tmp_path):
    from launcher.strategies.deepspeed import deepspeed_config

    def recipe_with(config, **distributed):
        path = tmp_path / "ds.json"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        return validate_recipe(small_recipe(digits, tmp_path, distributed={
            "strategy": "deepspeed", "deepspeed_config": str(path), **distributed}))

    missing = small_recipe(digits, tmp_path, distributed={"strategy": "deepspeed", "deepspeed_config": "nope.json"})
    with pytest.raises(LauncherError, match="'nope.json' does not exist"):
        validate_recipe(missing)
    with pytest.raises(LauncherError, match="is not valid JSON"):
        recipe_with("{not json")
    with pytest.raises(LauncherError, match="sets 'optimizer', which the recipe's 'optimizer:' section owns"):
        recipe_with({"optimizer": {"type": "Adam"}})
    # The file's stage is used when the recipe sets none; a contradiction is refused.
    recipe = recipe_with({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}})
    assert recipe.distributed.stage == 3
    config = deepspeed_config(recipe, "no")
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000,
                                           "stage3_gather_16bit_weights_on_model_save": True}
    with pytest.raises(LauncherError, match="zero_stage=1 but .* sets zero_optimization.stage=3"):
        recipe_with({"zero_optimization": {"stage": 3}}, zero_stage=1)  # refused when the recipe loads
    # Precision: the recipe's maps to DeepSpeed's sections; a file that says otherwise is refused.
    config = deepspeed_config(recipe, "bf16")
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["train_micro_batch_size_per_gpu"] == 32 and config["gradient_clipping"] == 0.0
    with pytest.raises(LauncherError, match="bf16.enabled=True, but the recipe's precision \\(fp32\\)"):
        recipe_with({"bf16": {"enabled": True}})  # refused when the recipe loads
    # Accumulation and clipping: what the plugins declare must agree with the file; the strategy
    # builds the config from the declarations (no plugin edits the JSON).
    with pytest.raises(LauncherError, match="sets gradient_clipping=0.5, but plugins.grad_clip.max_norm gives 1.0"):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"gradient_clipping": 0.5}))
        validate_recipe(small_recipe(digits, tmp_path, plugins={"grad_clip": {"max_norm": 1.0}},
                                     distributed={"strategy": "deepspeed", "deepspeed_config": str(path)}))
    declared = validate_recipe(small_recipe(digits, tmp_path, plugins={"grad_accum": {"micro_batches": 4},
                                                                       "grad_clip": {"max_norm": 2.0}},
                                            distributed={"strategy": "deepspeed"}))
    config = deepspeed_config(declared, "no")
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"],
            config["train_micro_batch_size_per_gpu"]) == (4, 2.0, 8)
    with pytest.raises(LauncherError, match="sets gradient_accumulation_steps=4, but plugins.grad_accum.micro_batches"):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"gradient_accumulation_steps": 4}))
        validate_recipe(small_recipe(digits, tmp_path, plugins={"grad_accum": {"micro_batches": 2}},
                                     distributed={"strategy": "deepspeed", "deepspeed_config": str(path)}))


@pytest.mark.parametrize("plugins, message", [
    ({"sam": {}}, "Plugin 'sam' cannot run under DeepSpeed ZeRO-2 with fp32: SAM needs the gradient before"),
    ({"nan_guard": {}}, "Plugin 'nan_guard' cannot run under DeepSpeed ZeRO-2 with fp32: it checks the gradients"),
    ({"grad_clip": {"value": 0.1}}, "only 2-norm clipping"),
    ({"grad_accum": {"mode": "auto"}}, "mode auto probes k"),
    ({"layer_lr": {"freeze_epochs": 1}}, "freeze_epochs switches requires_grad"),
])
def test_plugins_that_cannot_run_under_deepspeed_are_refused_with_the_reason(digits, tmp_path, plugins, message):
    raw = small_recipe(digits, tmp_path, train={"epochs": 2}, plugins=plugins, distributed={"strategy": "deepspeed"})
    with pytest.raises(LauncherError, match=message):
        validate_recipe(raw)
    validate_recipe({**raw, "distributed": {"strategy": "ddp"}})  # the same plugins run under DDP


def test_the_readme_table_is_generated_from_the_plugins_declarations():
    from launcher.registry import support_table

    readme = (REPO / "docs" / "distributed.md").read_text()
    start, end = "<!-- support-table:start -->\n", "<!-- support-table:end -->"
    table = support_table()
    if os.environ.get("UPDATE_SNAPSHOTS"):
        head, rest = readme.split(start)
        (REPO / "docs" / "distributed.md").write_text(head + start + table + "\n" + end + rest.split(end, 1)[1])
        readme = (REPO / "docs" / "distributed.md").read_text()
    assert readme.split(start)[1].split(end)[0] == table + "\n", (
        "docs/distributed.md's support table is out of date: UPDATE_SNAPSHOTS=1 pytest tests/test_distributed.py -k readme")
    # The refusals the recipe loader enforces are the ones the table shows.
    assert "| `sam` | fp32 bf16 fp16 | no [" in table and "| `ema` | fp32 bf16 fp16 |" in table


# ------------------------------------------------------------------ the watchdog (fast, in-process)


class Ranks:
    """Two RankWatchdogs on one in-process TCPStore; exits are recorded, not performed."""

    def __init__(self, timeout=2.0):
        from launcher.cluster.watchdog import RankWatchdog

        port = free_port()
        self.server = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
        self.exits: dict[int, float] = {}
        self.dogs = []
        for rank in (0, 1):
            client = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                                timeout=timedelta(seconds=5))
            dog = RankWatchdog(rank, 2, timeout, client, namespace=f"test{port}",
                               exit=lambda code, rank=rank: self.exits.setdefault(rank, time.monotonic()))
            dog.start()
            self.dogs.append(dog)

    def wait_for_exit(self, rank, limit):
        deadline = time.monotonic() + limit
        while rank not in self.exits and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.exits.get(rank)


def test_watchdog_stops_the_others_and_names_the_rank_that_raised(capsys):
    ranks = Ranks(timeout=2.0)
    start = time.monotonic()
    ranks.dogs[1].report_failure(ValueError("bad shard"))
    ended = ranks.wait_for_exit(0, limit=2.0)
    assert ended is not None and ended - start < 2.0
    assert ranks.dogs[0].verdict == "rank 1 failed first: ValueError: bad shard"
    assert 1 not in ranks.exits  # the failing rank ends through its own exception
    assert "error on rank 0: rank 1 failed first: ValueError: bad shard" in capsys.readouterr().err


def test_watchdog_names_a_silent_rank_after_half_the_timeout():
    ranks = Ranks(timeout=2.0)
    start = time.monotonic()
    ranks.dogs[1].stopped.set()  # rank 1's heartbeat stops, as when it is SIGKILLed
    ended = ranks.wait_for_exit(0, limit=3.0)
    assert ended is not None and 1.0 <= ended - start <= 2.0
    assert ranks.dogs[0].verdict.startswith("rank 1 failed first: no heartbeat for 1 s")


def test_watchdog_leaves_finished_ranks_alone_and_a_collective_error_does_not_claim_first_failure():
    ranks = Ranks(timeout=1.0)
    ranks.dogs[1].finished()
    time.sleep(1.5)  # three times the staleness limit
    assert ranks.exits == {}
    ranks.dogs[0].finished()

    ranks = Ranks(timeout=2.0)
    ranks.dogs[1].stopped.set()  # rank 1 dies silently; rank 0 then sees its collective fail
    start = time.monotonic()
    ranks.dogs[0].report_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert ranks.exits.get(0) is not None and ranks.exits[0] - start <= 2.0
    assert ranks.dogs[0].verdict.startswith("rank 1 failed first")


# ------------------------------------------------------------------ multi-process runs (slow)


@pytest.mark.slow
def test_one_process_two_processes_and_two_nodes_agree(digits, tmp_path):
    model = {"name": "wrn10_1", "num_classes": 10, "kwargs": {"norm_layer": "groupnorm"}}
    runs = {}
    for name, batch in (("one", 64), ("two", 32), ("nodes", 32)):
        raw = small_recipe(digits, tmp_path / name, model=model, data={"batch_size": batch})
        # lr from the global batch (64 in every run: 0.2 x 64 / 256 = 0.05, small_recipe's lr)
        raw["optimizer"] = {**{k: v for k, v in raw["optimizer"].items() if k != "lr"}, "lr_base": 0.2}
        runs[name] = write(tmp_path, name, raw)
    result = run_cli([sys.executable, "-m", "launcher", str(runs["one"])])
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli([*accelerate_cmd(2), "launcher", str(runs["two"])])
    assert result.returncode == 0, result.stderr[-3000:]
    # DeepSpeed (imported at the first evaluation by Accelerate) is told it runs on the CPU, not left to warn.
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr
    nodes = run_nodes(node_commands(runs["nodes"], free_port()))
    assert [code for code, _, _ in nodes] == [0, 0], nodes[0][1][-3000:] + nodes[1][1][-3000:]
    assert json.loads((tmp_path / "nodes" / "manifest.json").read_text())["world_size"] == 2

    one, two, two_nodes = (tmp_path / n for n in ("one", "two", "nodes"))
    for run in (one, two, two_nodes):
        recorded = yaml.safe_load((run / "recipe.yaml").read_text())["optimizer"]
        assert (recorded["lr"], recorded["lr_base_global_batch"]) == (pytest.approx(0.05), 64), recorded
    assert len(train_losses(one)) == 5  # 23 steps, a row every 5
    assert train_losses(two) == train_losses(two_nodes)  # bit for bit
    assert (two / "final" / "model.safetensors").read_bytes() == (two_nodes / "final" / "model.safetensors").read_bytes()
    assert_close_losses(train_losses(one), train_losses(two))
    assert_close_weights(weights(one), weights(two))


@pytest.fixture(scope="module")
def ddp_reference(digits, tmp_path_factory):
    """2 DDP ranks with EMA, label smoothing and checkpoints, uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("ddp_reference")
    raw = zero_recipe(digits, tmp_path / "run", strategy="ddp")
    result = run_cli([*accelerate_cmd(2), "launcher", str(write(tmp_path, "ddp", raw))])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run"


def zero_recipe(digits, run_dir: Path, strategy: str, stage=None) -> dict:
    distributed = {"strategy": strategy} if stage is None else {"strategy": strategy, "zero_stage": stage}
    return small_recipe(digits, run_dir, distributed=distributed,
                        plugins={"ema": {"decay": 0.9}, "label_smoothing": {"smoothing": 0.1},
                                 "checkpoint": {"every_epochs": 1}})


def stopped_resumed_and_compared(recipe: Path, run: Path, reference: Path, check_checkpoint) -> Path:
    """2 ranks: half the run (stopping on a logged step, so the loss rows line up), the step-10
    checkpoint checked by check_checkpoint(folder, meta) -> bool, then the same command again,
    which resumes from it; the losses, weights and EMA must match the uninterrupted reference."""
    first = run_cli([*accelerate_cmd(2), "launcher", str(recipe), "train.max_steps=10"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    checkpoint = run / "checkpoints" / "step-00000010"
    assert check_checkpoint(checkpoint, json.loads((checkpoint / "meta.json").read_text()))
    second = run_cli([*accelerate_cmd(2), "launcher", str(recipe)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "(step 10, epoch 0" in second.stdout
    assert_close_losses(train_losses(run), train_losses(reference))
    assert_close_weights(weights(run), weights(reference))
    assert_close_weights(weights(run, "ema.safetensors"), weights(reference, "ema.safetensors"))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-1 is compared with DDP in the accumulation test below
def test_deepspeed_zero_matches_ddp_with_ema_label_smoothing_and_resume(digits, tmp_path, ddp_reference, stage):
    recipe = write(tmp_path, f"zero{stage}", zero_recipe(digits, tmp_path / "run", "deepspeed", stage))

    def deepspeeds_own(checkpoint: Path, meta: dict) -> bool:
        # DeepSpeed's own format (each rank's ZeRO shard), checksummed like every other file.
        assert_deepspeed_pickles_are_loaded_safely(checkpoint, tmp_path)
        return {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(meta["files"])

    run = stopped_resumed_and_compared(recipe, tmp_path / "run", ddp_reference, check_checkpoint=deepspeeds_own)
    # The consolidated weights in the last checkpoint are the final ones.
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    from safetensors.torch import load_file

    assert_close_weights(load_file(str(last / "model.safetensors")), weights(run))


@pytest.mark.slow
def test_deepspeed_accumulation_steps_follow_the_plugin_and_match_ddp(digits, tmp_path):
    """ZeRO-1 (DDP's order of sums) and ZeRO-2 (reduces every micro-batch) with 2 micro-batches."""
    model = {"name": "wrn10_1", "num_classes": 10, "kwargs": {"norm_layer": "groupnorm"}}
    runs = {}
    for name, distributed in (("ddp", {"strategy": "ddp"}), ("zero1", {"strategy": "deepspeed", "zero_stage": 1}),
                              ("zero2", {"strategy": "deepspeed", "zero_stage": 2})):
        raw = small_recipe(digits, tmp_path / name, model=model, train={"epochs": 1, "max_steps": 10},
                           data={"val": None}, plugins={"grad_accum": {"micro_batches": 2}, "recorder": {}},
                           distributed=distributed)
        result = run_cli([*accelerate_cmd(2), "launcher", str(write(tmp_path, name, raw))])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tmp_path / name
    for stage in ("zero1", "zero2"):
        recorded = json.loads((runs[stage] / "recorder-rank0.json").read_text())
        assert recorded["engine_config"]["zero_stage"] == int(stage[-1])
        assert recorded["engine_config"]["gradient_accumulation_steps"] == 2
        assert recorded["engine_config"]["train_micro_batch_size_per_gpu"] == 16
        assert_close_losses(train_losses(runs[stage]), train_losses(runs["ddp"]))
        assert_close_weights(weights(runs[stage]), weights(runs["ddp"]))


@pytest.mark.slow
def test_fsdp_matches_ddp_with_ema_label_smoothing_and_a_sharded_checkpoint_resume(digits, tmp_path, ddp_reference):
    """FSDP2 on 2 ranks, BatchNorm model, stopped at step 10 and resumed from its sharded (DCP)
    checkpoint, against the uninterrupted DDP run: the same sums of two terms, so the weights and
    the EMA agree (bit for bit here; checked to the DDP tolerance)."""
    def sharded(checkpoint: Path, meta: dict) -> bool:
        # Each rank wrote its own shard (torch.distributed.checkpoint), checksummed like every other
        # file, and each holds about half: replicated tensors would all be written by rank 0 alone.
        files = meta["files"]
        sizes = [files[f"fsdp/__{r}_0.distcp"]["size"] for r in (0, 1)]
        return {"fsdp/.metadata", "model.safetensors"} <= set(files) and all(0.3 < s / sum(sizes) < 0.7 for s in sizes)

    recipe = write(tmp_path, "fsdp", zero_recipe(digits, tmp_path / "run", "fsdp"))
    stopped_resumed_and_compared(recipe, tmp_path / "run", ddp_reference, check_checkpoint=sharded)


# The FSDP options against 2 DDP ranks (same plugins, same precision): fp32 with SAM and clipping
# on the GroupNorm WRN; bf16 on the BatchNorm one (FSDP's bf16 policy leaves BatchNorm in fp32).
# hybrid: 2 machines x 2 processes (a 2 x 2 mesh: shards within a machine, replicas across).
FSDP_OPTION_LEGS = {
    "fp32": ("fp32", {}),
    "fp32-no_shard-size_wrap-checkpointing-offload": (
        "fp32", {"fsdp_sharding": "no_shard", "fsdp_wrap": "size", "fsdp_min_params": 2000,
                 "fsdp_activation_checkpointing": True, "fsdp_cpu_offload": True}),
    "fp32-hybrid-2x2": ("fp32", {"fsdp_sharding": "hybrid"}),
    "bf16-autocast": ("bf16", {"fsdp_mixed_precision": "autocast"}),
    "bf16-policy-checkpointing": ("bf16", {"fsdp_activation_checkpointing": True}),
}


@pytest.fixture(scope="module")
def ddp_runs_by_precision(digits, tmp_path_factory, ddp_reference):
    """The DDP side of the FSDP comparisons, one run per precision, made when first asked for."""
    runs = {}

    def get(precision: str) -> tuple[Path, dict]:
        if precision not in runs:
            tmp_path = tmp_path_factory.mktemp(f"ddp_{precision}")
            raw = fsdp_comparison_recipe(digits, tmp_path / "run", precision, ddp_reference, {"strategy": "ddp"})
            result = run_cli([*accelerate_cmd(2), "launcher", str(write(tmp_path, "ddp", raw))])
            assert result.returncode == 0, result.stderr[-3000:]
            runs[precision] = tmp_path / "run"
        return runs[precision]

    return get


def fsdp_comparison_recipe(digits, run_dir: Path, precision: str, teacher: Path, distributed: dict) -> dict:
    plugins = {"grad_accum": {"micro_batches": 2}, "layer_lr": {"lrs": [0.01, 0.05]},
               "distill": {"checkpoint": str(teacher), "alpha": 0.5}}
    model = {"name": "wrn10_1", "num_classes": 10}
    if precision == "fp32":
        plugins.update({"sam": {"rho": 0.05}, "grad_clip": {"max_norm": 1.0}, "nan_guard": {}})
        model["kwargs"] = {"norm_layer": "groupnorm"}
    else:
        plugins = {"amp": {"dtype": "bf16"}, **plugins}
    return small_recipe(digits, run_dir, model=model, train={"epochs": 1, "max_steps": 4},
                        run={"dir": str(run_dir), "log_every": 1, "progress": False},
                        data={"val": None, "streams": 4}, plugins=plugins, distributed=distributed)


@pytest.mark.slow
@pytest.mark.parametrize("leg", FSDP_OPTION_LEGS)
def test_fsdp_with_sam_clipping_accumulation_layer_lrs_and_distillation_matches_ddp(digits, tmp_path, ddp_reference,
                                                                                   ddp_runs_by_precision, leg):
    """The plugins that touch gradients, weights or logits, together, 4 steps, FSDP vs DDP, with
    the FSDP options. fp32 with SAM and clipping, whose gradient norms are taken over sharded
    gradients (DTensors) and so formed in another order: after 4 steps the weights agree to 1e-5
    (measured 1.5e-8 with 2 streams, 2.6e-6 on 5 of 9,216 weights of a layer with the 4 streams
    used here; a norm over one rank's shard only is off by about 40% at the first step;
    over a whole epoch SAM amplifies the rounding to 1e-3, so the comparison stops early); the
    same with no_shard (FSDP2's replicate-only mesh), size-based units, activation checkpointing
    and CPU offload at once, and with hybrid sharding on 2 machines x 2 processes (measured 3e-8
    without SAM and clipping, against 2 DDP ranks: 4 streams give 1, 2 and 4 ranks the same
    batches). bf16 without the norms: equal, with autocast over fp32 shards and
    with FSDP2's bf16 MixedPrecisionPolicy (+ activation checkpointing): its convolutions get bf16
    weights, which autocast would give them too (measured bit for bit; before the model's outputs
    were returned in fp32 as Accelerate does for DDP, distillation's logits / T was rounded to bf16
    and the loss moved by 6e-5 at the second step)."""
    precision, options = FSDP_OPTION_LEGS[leg]
    raw = fsdp_comparison_recipe(digits, tmp_path / "fsdp", precision, ddp_reference, {"strategy": "fsdp", **options})
    raw["plugins"]["recorder"] = {"trace": False}  # the mesh and units the options made
    recipe = write(tmp_path, "fsdp", raw)
    if options.get("fsdp_sharding") == "hybrid":  # 4 ranks of batch 16: the same global batches
        for status, output, _ in run_nodes(node_commands(recipe, free_port(), ["data.batch_size=16"], processes=4)):
            assert status == 0, output[-3000:]
    else:
        result = run_cli([*accelerate_cmd(2), "launcher", str(recipe)])
        assert result.returncode == 0, result.stderr[-3000:]
    # The options took effect: equal results alone would also come from options silently ignored.
    from launcher.strategies.fsdp import size_based_units

    sharding = options.get("fsdp_sharding", "full")
    fsdp = json.loads((tmp_path / "fsdp" / "recorder-rank0.json").read_text())["fsdp"]
    assert fsdp["mesh"] == {"full": [2], "no_shard": [2, 1], "hybrid": [2, 2]}[sharding]
    if options.get("fsdp_wrap") == "size":  # GroupNorm model: no BatchNorm units
        assert fsdp["units"] == 1 + len(size_based_units(_wrn(norm_layer="groupnorm"), options["fsdp_min_params"]))
    else:  # 3 stages + the root, + each BatchNorm under the bf16 policy (WRN-10-1 has 7)
        policy = precision == "bf16" and options.get("fsdp_mixed_precision") != "autocast"
        assert fsdp["units"] == 4 + (7 if policy else 0)
    ddp = ddp_runs_by_precision(precision)
    assert_close_losses(train_losses(tmp_path / "fsdp"), train_losses(ddp), {"rel": 1e-6})
    assert_close_weights(weights(tmp_path / "fsdp"), weights(ddp), dict(atol=1e-5, rtol=1e-4))


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_on_another_number_of_processes(digits, tmp_path):
    """Written by 2 FSDP ranks (batch 32 each) at step 10, resumed by 1 process (batch 64: the
    same global batch): torch.distributed.checkpoint reshards on load, and the run ends where
    one uninterrupted process (DDP's path) ends, to the 1-vs-2-process tolerance (GroupNorm:
    the same arithmetic up to the order of sums). Evaluation on 237 images in batches of 118
    gives the ranks 1 and 2 batches: the rank with fewer repeats a forward pass (uncounted),
    since FSDP's forward passes are collectives."""
    model = {"name": "wrn10_1", "num_classes": 10, "kwargs": {"norm_layer": "groupnorm"}}
    data = {"val": digits["train"].replace("{000000..000003}", "{000003..000003}"), "eval_batch_size": 118}
    plugins = {"checkpoint": {"every_epochs": 1}, "tta": {"flip": False, "shift": 1}}
    sharded = write(tmp_path, "fsdp", small_recipe(digits, tmp_path / "fsdp", model=model, data=data, plugins=plugins,
                                                  distributed={"strategy": "fsdp"}))
    first = run_cli([*accelerate_cmd(2), "launcher", str(sharded), "train.max_steps=10"])
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_tta/samples"] for r in rows if "val_tta/samples" in r] == [237]
    second = run_cli([sys.executable, "-m", "launcher", str(sharded), "data.batch_size=64"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "(step 10, epoch 0" in second.stdout
    plain = write(tmp_path, "one", small_recipe(digits, tmp_path / "one", model=model, data={**data, "batch_size": 64},
                                                plugins=plugins))
    reference = run_cli([sys.executable, "-m", "launcher", str(plain)])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_close_losses(train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "one"))
    assert_close_weights(weights(tmp_path / "fsdp"), weights(tmp_path / "one"))


@pytest.mark.slow
def test_the_plugins_that_are_not_refused_run_together_under_fsdp(digits, tmp_path):
    """Every plugin the table marks as running under FSDP that the comparisons above do not
    cover, at once (fp32: bf16 is compared with DDP above), with evaluation on unequal rank
    shares and progressive resizing changing the input size mid-run; with fsdp_sharding grad_op
    (the other tests shard fully)."""
    from launcher.registry import discover, refusal

    plugins = {
        "weight_init": {}, "progressive_resize": {"sizes": [12, 16], "epochs": [0, 1]},
        "balanced_sampling": {"power": 0.5}, "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 0.0},
        "focal_loss": {"gamma": 2.0}, "ema": {"decay": 0.9}, "tta": {"flip": False, "shift": 1},
        "early_stopping": {"patience": 3}, "checkpoint": {"every_epochs": 1}, "report": {}, "csv_log": {},
        "tensorboard": {},
    }
    assert all(refusal(discover()[name], "fsdp", "fp32") is None for name in plugins)
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 2},
                       data={"val": digits["train"].replace("{000000..000003}", "{000003..000003}"),
                             "eval_batch_size": 118}, plugins=plugins,
                       distributed={"strategy": "fsdp", "fsdp_sharding": "grad_op"})
    result = run_cli([*accelerate_cmd(2), "launcher", str(write(tmp_path, "all", raw))], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val/top1" in r][-1]
    assert last["step"] == 46 and last["val/samples"] == last["val_ema_tta/samples"] == 237
    assert last["val/top1"] > 0.5  # it learned (chance is 0.1)
    assert (run / "final" / "ema.safetensors").is_file() and (run / "report" / "report.json").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


@pytest.mark.parametrize("changes, message", [
    ({"plugins": {"amp": {"dtype": "fp16"}}}, "Plugin 'amp' cannot run under FSDP with fp16"),
    ({"plugins": {"layer_lr": {"freeze_epochs": 1}}}, "freeze_epochs switches requires_grad"),
    ({"train": {"epochs": 2, "compile": {}}}, "train.compile runs with distributed.strategy=ddp only; FSDP"),
    ({"distributed": {"strategy": "ddp", "fsdp_sharding": "grad_op"}}, "fsdp_sharding applies to strategy fsdp"),
    ({"distributed": {"strategy": "ddp", "fsdp_activation_checkpointing": True}},
     "fsdp_activation_checkpointing applies to strategy fsdp"),
    ({"distributed": {"fsdp_min_params": 1000}}, "fsdp_min_params applies to fsdp_wrap=size"),
    ({"distributed": {"fsdp_mixed_precision": "autocast"}},
     "fsdp_mixed_precision=autocast chooses how FSDP runs bf16, and this recipe trains in fp32"),
])
def test_what_fsdp_does_not_run_is_refused_with_the_reason(digits, tmp_path, changes, message):
    raw = small_recipe(digits, tmp_path, train={"epochs": 2}, distributed={"strategy": "fsdp"})
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(LauncherError, match=message):
        validate_recipe(raw)


@pytest.mark.slow
def test_deepspeed_bf16_keeps_bf16_weights_casts_inputs_and_saves_fp32(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": 10}, data={"val": None},
                       plugins={"amp": {"dtype": "bf16"}, "recorder": {"trace": False}},
                       distributed={"strategy": "deepspeed", "zero_stage": 2})
    result = run_cli([*accelerate_cmd(2), "launcher", str(write(tmp_path, "bf16", raw))])
    assert result.returncode == 0, result.stderr[-3000:]
    # DeepSpeed prints this once it has compiled (or loaded) its shared-memory allreduce: off on the CPU
    assert "shm_comm_op built" not in result.stdout + result.stderr
    recorded = json.loads((tmp_path / "run" / "recorder-rank0.json").read_text())
    assert recorded["compute_dtype"] == "torch.bfloat16"  # DeepSpeed's bf16 section: the model runs in bf16
    final = weights(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in final.values() if t.is_floating_point())  # fp32 master weights
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_the_plugins_that_are_not_refused_run_together_under_zero3_bf16(digits, tmp_path):
    """ZeRO-3 is the hardest case (sharded parameters: forward passes are collectives, weights
    must be gathered): every plugin the table marks as running under it, at once, with bf16."""
    from launcher.registry import discover, refusal

    plugins = {
        "weight_init": {}, "amp": {"dtype": "bf16"}, "progressive_resize": {"sizes": [12, 16], "epochs": [0, 1]},
        "balanced_sampling": {"power": 0.5}, "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 0.0},
        "label_smoothing": {"smoothing": 0.1}, "layer_lr": {"lrs": [0.01, 0.05]}, "grad_clip": {"max_norm": 1.0},
        "grad_accum": {"micro_batches": 2}, "ema": {"decay": 0.9}, "tta": {"flip": False, "shift": 1},
        "early_stopping": {"patience": 3}, "checkpoint": {"every_epochs": 1}, "report": {},
    }
    assert all(refusal(discover()[name], "zero3", "bf16") is None for name in plugins)
    # Evaluated on the 237 images of the last training shard with batches of 118: rank 0 has 118
    # images (1 batch), rank 1 has 119 (2 batches), so rank 0 must repeat a forward pass
    # (uncounted) or ZeRO-3 hangs.
    # By default DeepSpeed keeps parameters under 1e5 elements unsharded (all of this small model's)
    # and keeps gathered ones alive for reuse: these settings make every forward pass gather, so
    # unequal forward counts would hang (checked: with the repeats removed this test times out).
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0}}))
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 2},
                       data={"val": digits["train"].replace("{000000..000003}", "{000003..000003}"), "eval_batch_size": 118}, plugins=plugins,
                       distributed={"strategy": "deepspeed", "zero_stage": 3, "deepspeed_config": str(ds_json)})
    result = run_cli([*accelerate_cmd(2), "launcher", str(write(tmp_path, "all", raw))], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val/top1" in r][-1]
    assert last["step"] == 46 and last["val/samples"] == last["val_ema_tta/samples"] == 237
    assert last["val/top1"] > 0.5  # it learned (chance is 0.1)
    assert "train/grad_norm" in rows[0]  # DeepSpeed's clipping reports its norm
    assert (run / "final" / "ema.safetensors").is_file() and (run / "report" / "report.json").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_a_rank_that_raises_on_another_node_is_named_by_the_first(digits, tmp_path):
    """Two machines, so nothing but the watchdog stops machine 0 (torch elastic only stops the
    workers of its own launcher)."""
    raw = small_recipe(digits, tmp_path / "run", data={"val": None}, plugins={"test_fault": {}},
                       distributed={"failure_timeout": 10})
    nodes = run_nodes(node_commands(write(tmp_path, "raise", raw), free_port()),
                      env={"LAUNCHER_TEST_FAULT": "1:5:raise"})
    fault = json.loads((tmp_path / "run" / "fault.json").read_text())
    assert all(code != 0 for code, _, _ in nodes), [code for code, _, _ in nodes]
    assert max(ended for _, _, ended in nodes) - fault["time"] < 10 + 5, "the job outlived the failure timeout"
    assert "error on rank 1: rank 1 failed: RuntimeError: injected fault on rank 1 at step 5" in nodes[1][1]
    assert "error on rank 0: rank 1 failed first: RuntimeError: injected fault on rank 1 at step 5" in nodes[0][1], \
        nodes[0][1][-3000:]


@pytest.mark.slow
def test_a_killed_rank_on_another_node_stops_the_job_within_the_timeout_and_relaunch_resumes(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", data={"val": None}, plugins={"test_fault": {},
                       "checkpoint": {"every_steps": 3}}, distributed={"failure_timeout": 10})
    recipe = write(tmp_path, "kill", raw)
    nodes = run_nodes(node_commands(recipe, free_port()), env={"LAUNCHER_TEST_FAULT": "1:5:kill"})
    fault = json.loads((tmp_path / "run" / "fault.json").read_text())
    assert fault["rank"] == 1 and fault["step"] == 5
    assert all(code != 0 for code, _, _ in nodes), [code for code, _, _ in nodes]
    # Machine 0's rank noticed that rank 1 was gone and stopped within the bound.
    assert max(ended for _, _, ended in nodes) - fault["time"] < 10 + 5
    assert "error on rank 0: rank 1 failed first" in nodes[0][1], nodes[0][1][-3000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("rank 1 failed first"), status["error"]
    relaunched = run_nodes(node_commands(recipe, free_port()))
    assert [code for code, _, _ in relaunched] == [0, 0], relaunched[0][1][-3000:]
    assert "resumed from" in relaunched[0][1] and "(step 3, epoch 0" in relaunched[0][1]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_use_deepspeed_with_a_ddp_recipe_is_refused(digits, tmp_path):
    recipe = write(tmp_path, "ddp", small_recipe(digits, tmp_path / "run"))
    result = run_cli([sys.executable, "-m", "launcher", str(recipe)], env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert result.returncode == 2
    assert "--use_deepspeed" in result.stderr and "distributed.strategy=deepspeed" in result.stderr


def assert_deepspeed_pickles_are_loaded_safely(checkpoint: Path, tmp_path: Path) -> None:
    """DeepSpeed's real files load through weights_only (checked by verify and by the engine's
    loader inside safe_deepspeed_loading); a file that pickles code, even re-signed in meta.json,
    is refused by both and its code never runs."""
    import shutil
    from types import SimpleNamespace

    from launcher.strategies.deepspeed import safe_deepspeed_loading
    from launcher.errors import LauncherError
    from launcher.checkpoints import verify
    from tests.test_checkpoint import _Evil, resign

    assert verify(checkpoint) is None
    evil = tmp_path / "evil" / checkpoint.name
    shutil.copytree(checkpoint, evil)
    marker = tmp_path / "pwned"
    states = next((evil / "deepspeed").rglob("*model_states.pt"))
    torch.save({"module": _Evil(marker)}, states)
    resign(evil)
    assert "cannot be loaded safely" in verify(evil)

    class TorchCheckpointEngine:  # DeepSpeed's: torch.load(weights_only=False)
        def load(self, path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    with safe_deepspeed_loading(engine):
        real = engine.checkpoint_engine.load(next((checkpoint / "deepspeed").rglob("*optim_states.pt")))
        assert "optimizer_state_dict" in real
        with pytest.raises(LauncherError, match="Refusing to load .*could run code"):
            engine.checkpoint_engine.load(states)
    assert "load" not in vars(engine.checkpoint_engine) and not marker.exists()


def test_a_damaged_newest_fsdp_checkpoint_is_skipped_for_an_older_one_like_a_ddp_one(digits, tmp_path):
    """Its .metadata replaced by a pickle that runs code, the checksums in meta.json re-signed: the
    resume stopped with torch's tracebacks and status.json still said "finished". Now verify
    refuses it (as it refuses a DDP checkpoint's unsafe .pt), the run resumes from the one before,
    and the code never runs; so does a pickled entry inside the shards that names code."""
    import pickle

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from launcher.strategies.fsdp import sharded_checkpoint_problem
    from launcher.loop import train
    from launcher.checkpoints import verify
    from tests.test_checkpoint import _Evil, resign

    def run(steps):
        try:
            return train(validate_recipe(small_recipe(digits, tmp_path / "run", train={"epochs": 1, "max_steps": steps},
                                                      distributed={"strategy": "fsdp"},
                                                      plugins={"checkpoint": {"every_steps": 5}})))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    run(10)
    newest, marker = tmp_path / "run" / "checkpoints" / "step-00000010", tmp_path / "pwned"
    assert verify(newest) is None
    with (newest / "fsdp" / ".metadata").open("wb") as f:
        pickle.dump(_Evil(marker), f)
    resign(newest)
    assert "fsdp' cannot be loaded safely (posix.system is not allowed)" in verify(newest)
    with pytest.warns(UserWarning, match=r"skipping checkpoint step-00000010: .*cannot be loaded safely"):
        ctx = run(15)
    assert ctx.step == 15 and not marker.exists()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    # A non-tensor entry of the shards that pickles code is caught the same way.
    dcp.save({"model": {"w": torch.arange(6.0)}, "extra": _Evil(marker)}, checkpoint_id=str(tmp_path / "bytes"))
    assert "cannot be loaded safely" in sharded_checkpoint_problem(tmp_path / "bytes") and not marker.exists()


def test_a_tampered_fsdp_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    """torch.distributed.checkpoint reads .metadata with pickle.load and non-tensor entries with
    torch.load(weights_only=False); launcher.fsdp.load_sharded reads real checkpoints and
    refuses code in either place."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from launcher.strategies.fsdp import load_sharded
    from tests.test_checkpoint import _Evil

    state = {"model": {"w": torch.arange(6.0)}, "optimizer": {"param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    dcp.save(state, checkpoint_id=str(tmp_path / "good"))
    target = {"model": {"w": torch.zeros(6)}, "optimizer": {"param_groups": [{"lr": 0.0, "params": []}]}}
    load_sharded(target, tmp_path / "good")
    assert torch.equal(target["model"]["w"], torch.arange(6.0)) and target["optimizer"]["param_groups"][0]["lr"] == 0.1

    marker = tmp_path / "pwned"
    dcp.save({"model": {"w": torch.arange(6.0)}, "extra": _Evil(marker)}, checkpoint_id=str(tmp_path / "bytes"))
    assert not marker.exists()
    with pytest.raises(LauncherError, match="Refusing to load .*could run code"):
        load_sharded({"model": {"w": torch.zeros(6)}, "extra": None}, tmp_path / "bytes")
    with (tmp_path / "good" / ".metadata").open("wb") as f:
        pickle.dump(_Evil(marker), f)
    with pytest.raises(LauncherError, match="Refusing to load .*metadata.*could run code"):
        load_sharded(target, tmp_path / "good")
    assert not marker.exists()


# ------------------------------------------------------------------ FSDP options in one process

@pytest.fixture
def one_rank_fsdp(digits):
    """FullyShardedDataParallel on a one-rank process group (the strategy makes it in a process
    that has none), built from a recipe's distributed section; the group is removed afterwards."""
    import types

    import torch.distributed as dist

    from launcher.strategies.fsdp import FullyShardedDataParallel

    def make(mixed_precision="no", **options):
        plugins = {"amp": {"dtype": mixed_precision}} if mixed_precision != "no" else {}
        recipe = validate_recipe(small_recipe(digits, Path("unused"), distributed={"strategy": "fsdp", **options},
                                              plugins=plugins))
        accelerator = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True,
                                            mixed_precision=mixed_precision, prepare=lambda optimizer: optimizer)
        return FullyShardedDataParallel(accelerator, recipe)

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the FSDP modules' cycles hold the groups: free them here, where their threads run


def _trained_against_a_plain_copy(strategy, model, steps=3, bf16=False):
    """The model prepared by `strategy` and a plain copy, trained side by side on the same batches
    (SGD with momentum); returns (the strategy's full state dict, the copy's, activation bytes kept
    for the backward per step by the prepared model, by the copy)."""
    import copy

    plain = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, plain)]
    prepared, optimizers[0] = strategy.prepare(model, optimizers[0])
    generator = torch.Generator().manual_seed(0)
    kept = [0, 0]
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        for i, (m, optimizer) in enumerate(zip((prepared, plain), optimizers)):
            def pack(t, i=i):
                kept[i] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return strategy.full_state_dict(prepared), plain.state_dict(), kept[0] / steps, kept[1] / steps


def _wrn(**kwargs):
    import timm

    import launcher.models.factory  # noqa: F401  (registers the WideResNets with timm)

    torch.manual_seed(0)
    return timm.create_model("wrn10_1", num_classes=10, **kwargs)


def test_fsdp_activation_checkpointing_keeps_a_fifth_of_the_activations_and_trains_the_same(one_rank_fsdp):
    """fsdp_activation_checkpointing recomputes each block's forward in the backward: the
    activations kept per step drop (measured 2.3 MB -> 0.43 MB) and the training is the same bit
    for bit, BatchNorm's running statistics included (torch's checkpoint alone updates them twice
    per step: the recomputed forward is a second training-mode forward)."""
    from torch.distributed.fsdp import FSDPModule

    ours, plain, kept, plain_kept = _trained_against_a_plain_copy(
        one_rank_fsdp(fsdp_activation_checkpointing=True), _wrn())
    assert kept < 0.3 * plain_kept
    assert ours.keys() == plain.keys() and any("running_mean" in k for k in ours)
    for key in ours:
        assert torch.equal(ours[key], plain[key]), key
    # Without it, FSDP alone keeps what the plain model keeps.
    strategy = one_rank_fsdp()
    model = _wrn()
    *_, kept, plain_kept = _trained_against_a_plain_copy(strategy, model, steps=1)
    assert kept == plain_kept and sum(isinstance(m, FSDPModule) for m in model.modules()) == 4  # 3 stages + root


def test_fsdp_size_based_wrap_picks_what_torchs_fsdp1_policy_wraps(one_rank_fsdp):
    """fsdp_wrap=size: the units are the modules FSDP1's auto-wrap walk (torch's _recursive_wrap,
    the reference: FSDP1 itself needs an accelerator) wraps with torch's size_based_auto_wrap_policy
    and the same min_num_params, and training is unchanged."""
    import functools

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp.wrap import _recursive_wrap, size_based_auto_wrap_policy

    strategy = one_rank_fsdp(fsdp_wrap="size", fsdp_min_params=2000)
    model = _wrn()
    ours, plain, *_ = _trained_against_a_plain_copy(strategy, model, steps=2)
    for key in ours:
        assert torch.equal(ours[key], plain[key]), key
    units = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule) and name)
    reference, wrapped = _wrn(), []
    _recursive_wrap(reference, functools.partial(size_based_auto_wrap_policy, min_num_params=2000),
                    wrapper_cls=lambda module: wrapped.append(module) or module, ignored_modules=set(),
                    ignored_params=set(), only_wrap_children=True)
    names = {id(m): name for name, m in reference.named_modules()}
    assert len(units) >= 4 and units == sorted(names[id(m)] for m in wrapped)


def test_an_fsdp_wrap_that_makes_no_unit_is_refused_with_activation_checkpointing_and_warned_without(
        one_rank_fsdp, capsys):
    """fsdp_wrap=size under the 100M default on wrn10_1 (78k parameters) made no unit: activation
    checkpointing then recomputed nothing and nothing below the root was sharded, silently."""
    from torch.distributed.fsdp import FSDPModule

    def prepare(strategy):
        model = _wrn()
        strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        return model

    with pytest.raises(LauncherError, match=r"fsdp_activation_checkpointing recomputes the FSDP units below the root, "
                                            r"and fsdp_wrap=size made none: no module of WideResNet reaches "
                                            r"distributed.fsdp_min_params=100,000,000 parameters"):
        prepare(one_rank_fsdp(fsdp_wrap="size", fsdp_activation_checkpointing=True))
    model = prepare(one_rank_fsdp(fsdp_wrap="size"))
    assert "warning: distributed.fsdp_wrap=size made no FSDP unit below the root" in capsys.readouterr().err
    assert [name for name, m in model.named_modules() if isinstance(m, FSDPModule)] == [""]  # the root alone
    prepare(one_rank_fsdp(fsdp_wrap="size", fsdp_min_params=2000, fsdp_activation_checkpointing=True))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("mode, gathered", [("policy", torch.bfloat16), ("autocast", torch.float32)])
def test_fsdp_mixed_precision_gathers_bf16_weights_under_its_policy(one_rank_fsdp, mode, gathered):
    """With amp bf16, fsdp_mixed_precision=policy (FSDP2's MixedPrecisionPolicy) hands the layers
    bf16 weights (half the all-gather), autocast the fp32 shards; BatchNorm keeps fp32 weights
    either way. On this model the arithmetic is autocast's in both (its convolutions and the head
    run in bf16 under autocast anyway), so the weights after 3 steps are those of a plain model
    under autocast, bit for bit."""
    model = _wrn()
    seen = {}

    def record(module, args, name):
        seen.setdefault((type(module).__name__, name), module.weight.dtype)

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            module.register_forward_pre_hook(lambda m, args, name=name: record(m, args, name))
    ours, plain, *_ = _trained_against_a_plain_copy(one_rank_fsdp(mixed_precision="bf16", fsdp_mixed_precision=mode),
                                                    model, bf16=True)
    convs = {n: d for (kind, n), d in seen.items() if kind == "Conv2d"}
    norms = {n: d for (kind, n), d in seen.items() if kind == "BatchNorm2d"}
    assert convs and set(convs.values()) == {gathered}
    assert norms and set(norms.values()) == {torch.float32}
    for key in ours:
        assert ours[key].dtype == plain[key].dtype and torch.equal(ours[key], plain[key]), key


def test_fsdp_sharding_options_make_their_meshes(one_rank_fsdp, monkeypatch):
    """full and grad_op shard over every rank; hybrid shards within a machine and replicates across
    machines; no_shard replicates (a shard dimension of 1)."""
    strategy = one_rank_fsdp(fsdp_sharding="hybrid")
    strategy.accelerator.num_processes = 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert strategy.mesh_shape() == (2, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(LauncherError, match="same number of processes on every machine"):
        strategy.mesh_shape()
    for sharding, shape in (("full", (8,)), ("grad_op", (8,)), ("no_shard", (8, 1))):
        strategy.options = strategy.options.model_copy(update={"fsdp_sharding": sharding})
        assert strategy.mesh_shape() == shape
