"""profiler: a torch.profiler trace of training steps start_step .. start_step + steps - 1 (the
optimizer steps, counted from 1 as in metrics.jsonl) on rank 0, written as
<run dir>/profiler/rank0.steps-N-M.pt.trace.json: the Chrome trace format that Perfetto
(ui.perfetto.dev) and chrome://tracing open, and TensorBoard's profiler plugin
(torch-tb-profiler: `tensorboard --logdir <run dir>/profiler`) reads. Each step is a
ProfilerStep#k range holding the loader wait, the forward, backward and optimizer kernels
(CUDA kernels too on a GPU).

Hooks: on_epoch_start and on_step_end (starts before step N, marks each step, stops after step
M), on_train_end (a run that ends inside the window writes what it recorded). A run resumed
past the window records nothing; one interrupted inside it neither (the trace is written at its end).
"""

from __future__ import annotations

from pydantic import Field

from launcher.registry import Plugin, PluginOptions, register


@register("profiler")
class Profiler(Plugin):
    """A torch.profiler trace of a few training steps on rank 0 (Perfetto, TensorBoard)."""

    class Options(PluginOptions):
        start_step: int = Field(10, ge=1, description="the first profiled step (after warm-up: compilation, cuDNN autotuning)")
        steps: int = Field(5, ge=1, description="how many steps to record (a trace grows with each)")
        record_shapes: bool = Field(False, description="record the input shapes of each operator")
        profile_memory: bool = Field(False, description="record tensor allocations and frees")
        with_stack: bool = Field(False, description="record Python stacks (large traces)")

    reports_only = True  # what it records does not change what the run trains
    profile = None
    step_range = None

    @property
    def last_step(self) -> int:
        return self.options.start_step + self.options.steps - 1

    def _begin_if_due(self, ctx) -> None:
        if not ctx.is_main or self.profile is not None or ctx.step != self.options.start_step - 1:
            return
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU]
        if ctx.accelerator.device.type == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        o = self.options
        self.profile = tp.profile(activities=activities, record_shapes=o.record_shapes,
                                  profile_memory=o.profile_memory, with_stack=o.with_stack)
        self.profile.start()
        self._open_step(ctx.step + 1)

    def _open_step(self, step: int) -> None:
        # The range that the profiler's own step() opens, named with the run's step number (its
        # counter would start at 0); TensorBoard's profiler splits the trace at these ranges.
        import torch.profiler as tp

        self.step_range = tp.record_function(f"ProfilerStep#{step}")
        self.step_range.__enter__()

    def on_epoch_start(self, ctx):
        self._begin_if_due(ctx)

    def on_step_end(self, ctx):
        if self.profile is None:
            self._begin_if_due(ctx)
            return
        self.step_range.__exit__(None, None, None)
        if ctx.step >= min(self.last_step, ctx.total_steps):
            self._write(ctx)
        else:
            self._open_step(ctx.step + 1)

    def on_train_end(self, ctx):
        if self.profile is not None:
            self.step_range.__exit__(None, None, None)
            self._write(ctx)

    def _write(self, ctx) -> None:
        profile, self.profile = self.profile, None
        profile.stop()
        folder = ctx.run_dir / "profiler"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank0.steps-{self.options.start_step}-{ctx.step}.pt.trace.json"
        profile.export_chrome_trace(str(path))
        print(f"[profiler] steps {self.options.start_step}-{ctx.step}: {path} (open it in ui.perfetto.dev, or "
              f"tensorboard --logdir {folder} with torch-tb-profiler)", flush=True)
