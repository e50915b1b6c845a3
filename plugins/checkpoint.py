"""checkpoint: crash-proof checkpoints and exact resume: when to write one (every_steps,
every_epochs, on a signal, at the end), which to keep (keep_last, keep_best), and resuming from
the newest intact one. The format, its checks and the recipe-change rules are the core's
(launcher/checkpoints.py).

Relaunching the same command continues from the newest complete checkpoint in
<run dir>/checkpoints (resume: auto), as if nothing had happened: same samples, same
augmentation draws, same weights bit for bit, same metrics.jsonl rows (apart from their
time and samples/s).

Signals: on SIGTERM or SIGUSR1 every rank finishes its current step, a checkpoint is
written, and the process exits with status 75 (EX_TEMPFAIL: relaunch to continue). Ctrl-C
(SIGINT) does the same and exits with 130 (the shell's code for Ctrl-C, so that a wrapper that
relaunches on 75 does not bring back a run its user stopped). status.json says "interrupted".
A signal that arrives after the last step (during the final evaluation) lets the run finish:
evaluation, final weights, then status "finished".

Changing the number of processes: a checkpoint taken on W processes resumes on W' when
the global batch (data.batch_size x processes) is the same and W' divides the saved
data.streams: the epoch then continues with exactly the samples not yet used. RNG states
are restored per rank when W' = W; otherwise ranks are re-seeded (a warning says so).

Hooks: after_prepare (resume), on_step_end (every_steps, signals), on_epoch_end
(every_epochs), on_train_end (a final checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from launcher.checkpoints import (FORMAT, list_checkpoints, meta_digest, recipe_differences,
                                  rng_state, set_rng_state, verify)
from launcher.errors import LauncherError
from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import atomic_write_text, checkpoints_dir, file_sha256, strict_json

np = lazy("numpy")
torch = lazy("torch")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run checkpointed on a signal; relaunch it to continue
EXIT_CTRL_C = 128 + signal.SIGINT  # 130, as a shell reports a program stopped by Ctrl-C


@register("checkpoint")
class Checkpoint(Plugin):
    """Atomic checkpoints and exact resume (also on SIGTERM/SIGUSR1)."""

    class Options(PluginOptions):
        every_steps: Optional[int] = Field(None, ge=1, description="save every N optimizer steps")
        every_epochs: Optional[int] = Field(1, ge=1, description="save every N epochs (after evaluation)")
        keep_last: int = Field(2, ge=1, description="keep the newest N checkpoints")
        keep_best: int = Field(0, ge=0, description="also keep the best N by `monitor`")
        monitor: str = Field("val/top1", description="metric that ranks checkpoints for keep_best")
        mode: Literal["max", "min"] = Field("max", description="whether a larger monitor value is better")
        resume: str = Field("auto", description="auto (newest complete checkpoint), none, or a checkpoint path")
        signals: bool = Field(True, description="on SIGTERM/SIGUSR1 (Ctrl-C): checkpoint and exit with status 75 (130)")

    resumes_runs = True
    notes_under = {"deepspeed": "DeepSpeed's checkpoint format inside each checkpoint, plus consolidated fp32 "
                                "model.safetensors; resumes on the same number of processes",
                   "fsdp": "each rank writes its shard (torch.distributed.checkpoint), plus gathered fp32 "
                           "model.safetensors; resumes on any number of processes"}

    @classmethod
    def check_run_dir(cls, recipe, options, run_dir) -> Optional[str]:
        """A run directory whose newest intact checkpoint another recipe wrote cannot be resumed."""
        if options.resume != "auto":
            return None
        for folder in list_checkpoints(Path(run_dir)):
            if verify(folder) is None:
                diffs = recipe_differences(json.loads((folder / "meta.json").read_text())["recipe"], recipe.to_dict())
                if diffs:
                    return (f"its checkpoint {folder.name} was written by a different recipe ("
                            + "; ".join(diffs) + "). Submit the original recipe, another run.dir, or "
                            "plugins.checkpoint.resume=none to start afresh (the old checkpoints are kept).")
                return None
        return None

    def __init__(self, options):
        super().__init__(options)
        self.scores: dict[str, float] = {}  # checkpoint name -> monitor value
        self.signalled = 0
        self.previous_handlers: dict = {}  # restored when the run ends (runs inside a notebook)
        self.last_saved_step = -1

    # ------------------------------------------------------------ hooks

    def after_prepare(self, ctx) -> None:
        if self.options.signals:
            for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                self.previous_handlers[signum] = signal.signal(signum, self._on_signal)
        folder = self._choose(ctx)
        if folder is not None:
            self._load(ctx, folder)

    def on_step_end(self, ctx) -> None:
        every = self.options.every_steps
        if every and ctx.step % every == 0:
            self.save(ctx)
        signum = self._signal_agreed(ctx) if self.options.signals else 0
        if signum:
            self.save(ctx)
            ctx.interrupted = True
            ctx.exit_code = EXIT_CTRL_C if signum == signal.SIGINT else EXIT_PREEMPTED
            ctx.stop_reason = f"signal {signal.Signals(signum).name}"
            if ctx.is_main:
                print(f"\n[checkpoint] {ctx.stop_reason}: saved step {ctx.step}, exiting with status "
                      f"{ctx.exit_code}; relaunch the same command to continue.", flush=True)
            self._restore_handlers(stopping=True)

    def on_epoch_end(self, ctx) -> None:
        every = self.options.every_epochs
        if every and ctx.epoch % every == 0:
            self.save(ctx)

    def on_train_end(self, ctx) -> None:
        self.save(ctx)
        self._restore_handlers(stopping=bool(self.signalled))

    def state_dict(self) -> dict:
        return {"scores": dict(self.scores)}

    def load_state_dict(self, state: dict) -> None:
        self.scores = dict(state["scores"])

    # ------------------------------------------------------------ signals

    def _restore_handlers(self, stopping: bool = False) -> None:
        """Give the process its own handlers back. When stopping on a signal, SIGTERM and SIGUSR1
        are ignored instead: the same stop request often arrives twice (from Slurm and from
        launcher.node), and a late copy must not kill the process between its checkpoint and
        its exit status (it would die with -15 and leave status.json at "running")."""
        for signum, handler in self.previous_handlers.items():
            if stopping and signum != signal.SIGINT:
                handler = signal.SIG_IGN
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signum  # acted on at the end of the current step

    def _signal_agreed(self, ctx) -> int:
        """The same signal number on every rank, 0 if no rank was signalled (one tiny all-reduce
        per step). The largest wins: SIGTERM/SIGUSR1 (a scheduler's) over SIGINT (Ctrl-C)."""
        if ctx.world_size == 1:
            return self.signalled
        flag = torch.tensor(self.signalled, device=ctx.accelerator.device)
        return int(ctx.accelerator.reduce(flag, "max").item())

    # ------------------------------------------------------------ saving

    def save(self, ctx) -> None:
        if ctx.step == self.last_saved_step:
            return  # e.g. a step checkpoint that is also the epoch's
        self.last_saved_step = ctx.step
        accelerator = ctx.accelerator
        root = checkpoints_dir(ctx.run_dir)
        name = f"step-{ctx.step:08d}"
        tmp = root / f".tmp-{name}"
        error = None
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            try:
                tmp.mkdir(parents=True)
            except OSError as err:
                error = err
        accelerator.wait_for_everyone()
        try:
            if error:
                raise error
            # Every rank: the strategy writes the weights (ZeRO gathers them) and, under DeepSpeed,
            # each rank's shard of the engine's own checkpoint.
            optimizer_state = ctx.strategy.save_checkpoint(ctx.model, ctx.optimizer, tmp)
            torch.save({"rng": rng_state(), **ctx.rank_progress_state()}, tmp / f"rank-{ctx.rank}.pt")
            if ctx.is_main:
                self._write_trainer(ctx, tmp, name, optimizer_state)
        except Exception as err:  # noqa: BLE001  a full disk is OSError, torch's RuntimeError, SafetensorError
            error = err
        self._stop_if_failed(ctx, tmp, error)
        if ctx.is_main:
            try:
                self._publish(ctx, tmp, root / name)
            except OSError as err:
                error = err
        self._stop_if_failed(ctx, tmp, error)
        if ctx.is_main:
            self._prune(ctx)
        ctx.accelerator.wait_for_everyone()

    @staticmethod
    def _stop_if_failed(ctx, tmp: Path, error: Optional[BaseException]) -> None:
        """On every rank: if any rank failed to write, remove the half-written folder and stop with
        a message naming the newest intact checkpoint (the earlier ones are untouched)."""
        ok = torch.tensor(0.0 if error else 1.0, device=ctx.accelerator.device)
        if ctx.world_size > 1:
            ok = ctx.accelerator.reduce(ok, "sum") / ctx.world_size
        if ok.item() == 1.0:
            return
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = [f for f in list_checkpoints(ctx.run_dir) if verify(f) is None] if ctx.is_main else []
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if error else "failed on another rank"
        if error and _disk_nearly_full(tmp.parent, kept[0] if kept else None):
            # torch.save reports a full disk as "unexpected pos 26560 vs 26448": say what it means.
            reason = f"the disk is full: {shutil.disk_usage(tmp.parent).free // 2**20} MiB free; {reason}"
        raise LauncherError(
            f"Could not write the checkpoint at step {ctx.step} ({reason}). Nothing was lost: the newest "
            f"intact checkpoint is {kept[0] if kept else 'none yet' if ctx.is_main else 'named by rank 0'}. "
            "Free disk space (or fix the error named) and relaunch the same command; it resumes from there."
        ) from None

    def _publish(self, ctx, tmp: Path, final: Path) -> None:
        """Main process: meta.json last, then the rename that makes the checkpoint visible."""
        # Hashed from the disk, after writing: the checksums vouch for the bytes that were stored.
        meta_files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                      for f in sorted(tmp.rglob("*")) if f.is_file()}
        meta = json.loads(strict_json(self._meta(ctx, meta_files)))  # the digest is of what is stored
        meta["meta_sha256"] = meta_digest(meta)
        atomic_write_text(tmp / "meta.json", strict_json(meta, indent=1))
        if final.exists():
            # A checkpoint of this step already (a relaunch that resumed from it and saves again):
            # an intact one is replaced, a damaged one (skipped at resume) is set aside for inspection.
            label = "old" if verify(final) is None else "corrupt"
            aside = final.with_name(f".{label}-{final.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(final, aside)
            os.replace(tmp, final)
            if label == "old":
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)  # the checkpoint becomes visible only when complete
        _fsync_dir(final.parent)

    def _write_trainer(self, ctx, folder: Path, name: str, optimizer_state: Optional[dict]) -> None:
        """trainer.pt; optimizer_state is None under DeepSpeed (the optimizer and loss scaler are in its files)."""
        if self.options.keep_best and ctx.last_eval_step == ctx.step and self.options.monitor in ctx.metrics:
            self.scores[name] = float(ctx.metrics[self.options.monitor])  # before the state is saved
        trainer = {
            "optimizer": optimizer_state,
            "scaler": ctx.accelerator.scaler.state_dict() if ctx.accelerator.scaler is not None else None,
            "plugins": ctx.plugins.state_dict(),
        }
        torch.save(trainer, folder / "trainer.pt")

    def _meta(self, ctx, files: dict) -> dict:
        return {
            "format": FORMAT, **ctx.progress_state(),  # step, epoch, position in the epoch, rows to keep...
            "world_size": ctx.world_size, "streams": ctx.plan.streams, "global_batch": ctx.plan.global_batch,
            "recipe_digest": ctx.recipe.digest(), "recipe": ctx.recipe.to_dict(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
        }

    def _prune(self, ctx) -> None:
        names = [p.name for p in list_checkpoints(ctx.run_dir)]
        keep = set(names[: self.options.keep_last])
        if self.options.keep_best:
            scored = [n for n in names if n in self.scores]
            best = sorted(scored, key=lambda n: self.scores[n], reverse=self.options.mode == "max")
            keep |= set(best[: self.options.keep_best])
        for name in names:
            if name not in keep:
                shutil.rmtree(checkpoints_dir(ctx.run_dir) / name, ignore_errors=True)

    # ------------------------------------------------------------ resuming

    def _choose(self, ctx) -> Optional[Path]:
        """The main process picks (and verifies) the checkpoint; the others receive its choice,
        so the files are hashed once, not once per rank, and every rank fails alike."""
        choice = [self._choose_on_main(ctx) if ctx.is_main else None]
        if ctx.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice)
        kind, value = choice[0]
        if kind == "error":
            raise LauncherError(value)
        return Path(value) if kind == "path" else None

    def _choose_on_main(self, ctx) -> tuple[str, Optional[str]]:
        # Half-written folders of a run killed while saving: no run writes them now (the run
        # directory is locked), and on a full disk they hold the space a new checkpoint needs.
        for leftover in checkpoints_dir(ctx.run_dir).glob(".tmp-step-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        resume = self.options.resume
        if resume == "none":
            old = checkpoints_dir(ctx.run_dir)
            if old.is_dir() and any(old.iterdir()):
                kept = old.with_name(f"checkpoints-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(old, kept)  # a fresh start never deletes what an earlier run saved
                warnings.warn(f"resume: none; the earlier checkpoints were moved to {kept}", stacklevel=2)
            return "none", None
        if resume != "auto":
            folder = Path(resume)
            problem = verify(folder) if folder.is_dir() else f"'{folder}' is not a folder"
            if problem:
                return "error", f"plugins.checkpoint.resume: cannot resume from '{folder}': {problem}."
            return "path", str(folder)
        for folder in list_checkpoints(ctx.run_dir):
            problem = verify(folder)
            if problem is None:
                return "path", str(folder)
            warnings.warn(f"skipping checkpoint {folder.name}: {problem}; trying an older one", stacklevel=2)
        return "none", None

    def _load(self, ctx, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        diffs = recipe_differences(meta["recipe"], ctx.recipe.to_dict())
        if diffs:
            raise LauncherError(
                f"The checkpoint {folder} was written by a different recipe; refusing to resume. Differences: "
                + "; ".join(diffs) + ". Resume with the original recipe, or start afresh with "
                "plugins.checkpoint.resume=none (the old checkpoints are kept) or another run.dir."
            )
        if meta["step_in_epoch"]:
            self._check_plan(ctx, meta)
        if meta["streams"] != ctx.plan.streams and meta["streams"] % ctx.world_size == 0:
            ctx.make_plan(streams=meta["streams"])  # continue the epoch with the saved lanes
        trainer = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
        ctx.strategy.load_checkpoint(ctx.model, ctx.optimizer, folder, trainer["optimizer"], meta["world_size"])
        # The LR schedule is not restored: it is a function of the recipe and the step (timm's
        # schedulers and ours hold nothing else), and its saved state would pin the old length. So a
        # resume with another train.epochs follows the schedule of the new recipe from this step on.
        self._note_replanned_schedule(ctx, meta)
        if ctx.accelerator.scaler is not None and trainer["scaler"] is not None:
            ctx.accelerator.scaler.load_state_dict(trainer["scaler"])
        ctx.plugins.load_state_dict(trainer["plugins"])
        ctx.load_progress_state(meta)
        self.last_saved_step = ctx.step
        rank_file = folder / f"rank-{ctx.rank}.pt"
        if meta["world_size"] == ctx.world_size and rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
            set_rng_state(rank_state["rng"])
            ctx.load_rank_progress_state(rank_state)
        elif ctx.is_main:
            warnings.warn(f"resuming {meta['world_size']}-process checkpoint on {ctx.world_size} processes: "
                          "random states are re-seeded and the current loss window restarts", stacklevel=2)
        if ctx.is_main:
            print(f"[checkpoint] resumed from {folder} (step {ctx.step}, epoch {ctx.epoch}, "
                  f"step {ctx.step_in_epoch} of the epoch)", flush=True)

    @staticmethod
    def _note_replanned_schedule(ctx, meta: dict) -> None:
        saved = meta["recipe"].get("train", {}).get("epochs")
        if saved == ctx.recipe.train.epochs or ctx.scheduler is None or not ctx.is_main:
            return
        before = [g["lr"] for g in ctx.optimizer.param_groups][0]
        ctx.scheduler.step_update(meta["step"])
        after = ctx.optimizer.param_groups[0]["lr"]
        print(f"[checkpoint] train.epochs changed from {saved} to {ctx.recipe.train.epochs}: the LR schedule is "
              f"planned over {ctx.recipe.train.epochs} epochs, as if the run had been launched with them; at step "
              f"{meta['step']} the learning rate goes from {before:.6g} to {after:.6g}.", flush=True)

    def _check_plan(self, ctx, meta: dict) -> None:
        """Mid-epoch, the new run must be able to follow the saved epoch plan."""
        if meta["global_batch"] != ctx.plan.global_batch:
            raise LauncherError(
                f"The checkpoint stopped mid-epoch with a global batch of {meta['global_batch']} samples; this run "
                f"has {ctx.plan.global_batch} (data.batch_size x {ctx.world_size} processes). Set data.batch_size="
                f"{meta['global_batch'] // ctx.world_size} to continue the epoch exactly.")
        if meta["streams"] % ctx.world_size:
            raise LauncherError(
                f"The checkpoint stopped mid-epoch with data.streams={meta['streams']}, which {ctx.world_size} "
                f"processes cannot share evenly; resume on a number of processes that divides {meta['streams']}.")


def _disk_nearly_full(root: Path, previous: Optional[Path]) -> bool:
    """Less room left than one more checkpoint takes (the previous one's size, else 1 MiB)."""
    try:
        needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 2**20
        return shutil.disk_usage(root).free < needed
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
