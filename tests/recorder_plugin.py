"""A test-only plugin that records what each rank trained on and the order of hook calls.

Loaded in subprocess runs through LAUNCHER_PLUGINS=tests.recorder_plugin (see conftest).
"""

from __future__ import annotations

import json
import os
import time

import torch

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register


@register("recorder")
class Recorder(Plugin):
    """Test helper: writes trained sample ids and the hook trace per rank."""

    class Options(PluginOptions):
        trace: bool = Field(True, description="also record every hook call")
        stream: bool = Field(False, description="append each step's sample ids to ids-rank<R>.jsonl at once")
        count_allreduce: bool = Field(False, description="count DDP gradient all-reduces per optimizer step")

    def __init__(self, options):
        super().__init__(options)
        self.steps, self.evals, self.hooks = [], [], []

    def _trace(self, name):
        if self.options.trace:
            self.hooks.append(name)

    def accelerator_options(self, ctx, options):
        self._trace("accelerator_options")
        return options

    def param_groups(self, ctx, groups):
        self._trace("param_groups")
        return groups

    def setup(self, ctx):
        self._trace("setup")
        # The dtype the convolutions compute in (Accelerate casts the model's outputs back to fp32).
        conv = next(m for m in ctx.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, args, out: setattr(self, "compute_dtype", str(out.dtype)))

    def criterion(self, ctx, criterion):
        self._trace("criterion")
        return criterion

    def after_prepare(self, ctx):
        self._trace("after_prepare")
        # Under FSDP: the device mesh the parameters are sharded over and the number of FSDP units.
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        first = next(ctx.model.parameters())
        self.fsdp = isinstance(first, DTensor) and {
            "mesh": list(first.device_mesh.shape), "units": sum(isinstance(m, FSDPModule) for m in ctx.model.modules())}
        self.allreduce_calls, self.allreduce_per_step = 0, []
        if self.options.count_allreduce and isinstance(ctx.model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(process_group, bucket):
                self.allreduce_calls += 1
                return allreduce_hook(process_group, bucket)

            ctx.model.register_comm_hook(None, counting)

    def on_epoch_start(self, ctx):
        self._trace("on_epoch_start")

    def transform_batch(self, ctx, batch):
        self._trace("transform_batch")
        entry = {"epoch": ctx.epoch, "step": ctx.step, "ids": batch.ids.tolist(), "global_count": batch.global_count,
                 "lr": ctx.optimizer.param_groups[0]["lr"]}
        self.steps.append(entry)
        if self.options.stream:  # survives a kill -9: one flushed line per step
            with open(ctx.run_dir / f"ids-rank{ctx.rank}.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        return batch

    def micro_batches(self, ctx, count):
        self._trace("micro_batches")
        return count

    def transform_loss(self, ctx, loss, batch, logits):
        self._trace("transform_loss")
        return loss

    def before_optimizer_step(self, ctx):
        self._trace("before_optimizer_step")

    def after_optimizer_step(self, ctx):
        self._trace("after_optimizer_step")
        self.allreduce_per_step.append(self.allreduce_calls)
        self.allreduce_calls = 0

    def eval_models(self, ctx, models):
        self._trace("eval_models")
        return models

    def eval_logits(self, ctx, outputs, images, model, prefix):
        self._trace("eval_logits")
        return outputs

    def on_evaluate(self, ctx, metrics):
        self._trace("on_evaluate")
        self.evals.append(metrics)

    def log_row(self, ctx, row):
        self._trace("log_row")
        return row

    def on_log(self, ctx, row):
        self._trace("on_log")

    def on_step_end(self, ctx):
        self._trace("on_step_end")

    def on_epoch_end(self, ctx):
        self._trace("on_epoch_end")

    def on_train_end(self, ctx):
        self._trace("on_train_end")
        path = ctx.run_dir / f"recorder-rank{ctx.rank}.json"
        path.write_text(json.dumps({"rank": ctx.rank, "world_size": ctx.world_size, "steps": self.steps,
                                    "recipe_lr": ctx.recipe.optimizer.lr,
                                    "evals": self.evals, "hooks": self.hooks,
                                    "compute_dtype": getattr(self, "compute_dtype", None),
                                    "engine_config": getattr(ctx.model, "_config", None) and {
                                        "zero_stage": ctx.model.zero_optimization_stage(),
                                        "gradient_accumulation_steps": ctx.model.gradient_accumulation_steps(),
                                        "train_micro_batch_size_per_gpu":
                                            ctx.model.train_micro_batch_size_per_gpu()},
                                    "allreduce_per_step": self.allreduce_per_step,
                                    "fsdp": getattr(self, "fsdp", None),
                                    "shards_read": sorted({str(p) for p in self._shards(ctx)}),
                                    "weights": self._weights(ctx)}))

    def state_dict(self) -> dict:
        # LAUNCHER_TEST_STATE_PAUSE=SECONDS: the checkpoint plugin asks every plugin for its state
        # while it writes a checkpoint (after the weights, before trainer.pt and meta.json): a pause
        # here keeps the half-written folder there for a test to kill the run in.
        if os.environ.get("LAUNCHER_TEST_STATE_PAUSE"):
            time.sleep(float(os.environ["LAUNCHER_TEST_STATE_PAUSE"]))
        return {}

    @staticmethod
    def _weights(ctx) -> dict:
        """Per parameter: a float64 sum and a sum of squares (ranks must agree bit for bit)."""
        model = ctx.accelerator.unwrap_model(ctx.model)
        return {n: [p.detach().double().sum().item(), p.detach().double().square().sum().item()]
                for n, p in model.named_parameters()}

    def _shards(self, ctx):
        index = ctx.train_index
        for step in self.steps:
            for i in step["ids"]:
                yield index.paths[int(index.shard_of[i])]


@register("test_fault")
class Fault(Plugin):
    """Test helper: LAUNCHER_TEST_FAULT="RANK:STEP:raise|kill" makes that rank raise, or kill itself
    with SIGKILL (no Python cleanup at all), at the end of that step, after writing the time to
    <run dir>/fault.json. From the environment, so a relaunch runs the same recipe without it."""

    def eval_models(self, ctx, models):
        """LAUNCHER_TEST_EVAL_PAUSE=SECONDS: pause in the final evaluation (after the last step),
        after creating <run dir>/final-eval, so that a test can signal the run just then."""
        import os
        import time

        if os.environ.get("LAUNCHER_TEST_EVAL_PAUSE") and ctx.step >= ctx.total_steps:
            (ctx.run_dir / "final-eval").touch()
            time.sleep(float(os.environ["LAUNCHER_TEST_EVAL_PAUSE"]))
        return models

    def on_step_end(self, ctx):
        import os
        import time

        # LAUNCHER_TEST_STEP_PAUSE=SECONDS: a slower first run (not a requeued one), so that a
        # short run stays interruptible for long enough without costing CPU time.
        if os.environ.get("LAUNCHER_TEST_STEP_PAUSE") and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            time.sleep(float(os.environ["LAUNCHER_TEST_STEP_PAUSE"]))
        spec = os.environ.get("LAUNCHER_TEST_FAULT")
        if not spec:
            return
        rank, step, mode = spec.split(":")
        if ctx.rank != int(rank) or ctx.step != int(step):
            return
        import signal

        (ctx.run_dir / "fault.json").write_text(json.dumps({"time": time.time(), "pid": os.getpid(),
                                                            "rank": ctx.rank, "step": ctx.step}))
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault on rank {ctx.rank} at step {ctx.step}")
