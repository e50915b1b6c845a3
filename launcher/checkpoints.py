"""The checkpoint format, read and checked by the core (resume, the commands that read a run's
checkpoints); plugins/checkpoint.py decides when to write one, what to keep, and resumes.

What a checkpoint holds (checkpoints/step-NNNNNNNN/):
  model.safetensors   the weights (full, fp32, whatever the strategy)
  trainer.pt          optimizer, loss scaler, every plugin's state by name (the LR schedule is
                      a function of the recipe and the step, so it is rebuilt, not restored)
  deepspeed/          under DeepSpeed only: the engine's own checkpoint (engine.save_checkpoint:
                      per-rank ZeRO optimizer shards, the module, DeepSpeed's loss scaler), which
                      resume loads instead of model.safetensors and the optimizer in trainer.pt;
                      it resumes on the same number of processes only (ZeRO's partitions)
  rank-R.pt           per rank: RNG states (torch, CUDA, python, numpy), the loss window
  meta.json           step, epoch, position in the epoch, the data plan, the recipe and its
                      hash, metrics.jsonl rows to keep, the size and SHA-256 of each file, and
                      the SHA-256 of its own content (meta_sha256: an edited meta.json is skipped)
The strategy writes and reads the weights and optimizer state (save_checkpoint /
load_checkpoint in launcher/strategies/), the run context its progress (RunContext.
progress_state); plugins/checkpoint.py decides when and where, and makes it atomic.
The data position needs no worker state: what a step reads, and every augmentation draw,
is a function of (seed, epoch, step) (see launcher/data/), so resuming seeks straight to
the next step, whatever the number of loader workers.

Atomic: every rank writes into checkpoints/.tmp-step-N, then the main process writes
meta.json last and renames the folder. A crash at any moment leaves the previous
checkpoint as the newest complete one; a checkpoint whose files do not match meta.json
(truncated, corrupted) is skipped with a warning naming the file. A failed write (a full
disk) stops the run loudly and keeps the previous checkpoints. Loading never unpickles
code (safetensors, JSON and torch.load(weights_only=True); DeepSpeed's files too, through
launcher.strategies.deepspeed.safe_deepspeed_loading).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Optional

from launcher.config.recipe import MISSING, flatten, schema_default
from launcher.lazy import lazy
from launcher.runlog import checkpoints_dir, file_sha256

np = lazy("numpy")
torch = lazy("torch")

FORMAT = 2  # 2: meta.json carries its own digest (meta_sha256)
# Recipe keys that may differ between a checkpoint and the run resuming it.
SAFE_TO_CHANGE = ("train.epochs", "train.max_steps", "train.eval_every", "run.", "data.num_workers",
                  "data.persistent_workers", "distributed.failure_timeout",
                  # kernels and memory layout, not the run:
                  "train.tf32", "train.deterministic", "train.compile", "model.channels_last",
                  "model.grad_checkpointing",
                  "data.cache_dir", "data.cache_limit", "data.prefetch_shards", "data.s3_endpoint", "data.fetch_",
                  "data.eval_batch_size", "data.batch_size", "data.train", "data.val",
                  "plugins.checkpoint.", "plugins.wandb.")


def _plugin_defaults_filled(recipe: dict) -> dict:
    """A saved recipe's plugin options with their defaults filled in, as recipes are resolved now
    (a launcher before that saved `mixup: {}`); options that no longer parse stay as saved."""
    from launcher.registry import parse_options

    if not recipe.get("plugins"):
        return recipe
    plugins = {}
    for name, options in (recipe.get("plugins") or {}).items():
        try:
            plugins[name] = parse_options(name, options).model_dump(mode="json")
        except Exception:  # noqa: BLE001  (an unknown plugin or an option since removed: compared as saved)
            plugins[name] = options
    return {**recipe, "plugins": plugins}


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ, except those declared safe to change. A key the saved recipe
    lacks (its launcher predates the key) counts as having its default: an upgrade mid-run
    resumes unless the recipe moves a new key off its default."""
    a, b = flatten(_plugin_defaults_filled(saved)), flatten(current)
    for key in b.keys() - a.keys():
        default = schema_default(key)
        if default is not MISSING:
            a[key] = default
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not any(key == s or key.startswith(s) for s in SAFE_TO_CHANGE):
            diffs.append(f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}")
    return diffs


REQUIRED_FILES = ("model.safetensors", "trainer.pt", "rank-0.pt")


def meta_digest(meta: dict) -> str:
    """SHA-256 of meta.json's content without its own digest: an edited meta.json (its step,
    its file list) no longer matches and the checkpoint is skipped."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(folder: Path) -> Optional[str]:
    """None if the checkpoint is complete and intact, else what is wrong with it. Any damage is a
    reason, never an exception: meta.json unreadable, edited or inconsistent, a file missing,
    truncated or corrupt, a pickle that torch.load(weights_only=True) refuses."""
    meta_file = folder / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        return f"'{meta_file}' is missing or unreadable ({err})"
    try:
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
            return f"'{meta_file}' is not a checkpoint's meta.json (no file list)"
        if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
            return f"'{meta_file}' was modified after the checkpoint was written (its digest does not match)"
        if "meta_sha256" not in meta and meta.get("format", 1) >= 2:
            return f"'{meta_file}' lacks its digest"
        if folder.name != f"step-{meta['step']:08d}":
            return f"'{meta_file}' says step {meta['step']}, but the folder is {folder.name}"
        for name in REQUIRED_FILES:
            if name not in meta["files"]:
                return f"'{meta_file}' does not list {name}"
        for name, expected in meta["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != expected["size"]:
                return f"'{path}' is missing or truncated"
            if file_sha256(path) != expected["sha256"]:
                return f"'{path}' is corrupt (its SHA-256 does not match meta.json)"
        for name in meta["files"]:
            if name.endswith(".pt"):
                problem = _unsafe_pickle(folder / name)
                if problem:
                    return problem
        if "fsdp/.metadata" in meta["files"]:
            from launcher.strategies.fsdp import sharded_checkpoint_problem

            problem = sharded_checkpoint_problem(folder / "fsdp")
            if problem:
                return problem
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return f"'{meta_file}' is malformed ({type(err).__name__}: {err})"
    return None


def _unsafe_pickle(path: Path) -> Optional[str]:
    """Why torch.load(weights_only=True) refuses the file (e.g. it pickles code), if it does.
    mmap: the tensors are mapped, not read, so this costs little beyond the hashing."""
    import pickle

    allowed = []
    if "deepspeed" in path.parts:
        from launcher.strategies.deepspeed import deepspeed_checkpoint_types

        allowed = deepspeed_checkpoint_types()
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as err:
        return f"'{path}' cannot be loaded safely ({str(err).splitlines()[0][:200]})"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (temporary folders are ignored)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
