"""Reading weight files a user points at, with one-paragraph errors instead of tracebacks.

Every command and plugin that takes a weights path (model.pretrained_file, plugins.pretrained,
plugins.distill, evaluate/predict/export/report --weights) reads it here, so a truncated file,
a file that is not weights at all, a pickle, or weights of another model all get an error that
names the file and what is wrong with it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Iterable

from launcher.errors import LauncherError
from launcher.lazy import lazy

torch = lazy("torch")

TORCH_SUFFIXES = (".bin", ".pth", ".pt")


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file, or from a PyTorch file (.bin/.pth/.pt, e.g.
    pytorch_model.bin) read with torch.load(weights_only=True): never unpickles code. `what`
    names the setting the path came from, for the error."""
    path = Path(path)
    if not path.is_file():
        raise LauncherError(f"{what}: '{path}' does not exist (or is not a file).")
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch_file(path, what)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        with open(path, "rb") as f:
            head = f.read(2)
        hint = (" It looks like a pickled PyTorch file (zip or pickle): give it a .bin/.pth suffix to have it "
                "read with torch.load(weights_only=True)." if head in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05")
                else "")
        raise LauncherError(f"{what}: '{path}' is not a readable .safetensors file ({_first_line(err)}): it is "
                            f"truncated, damaged or another kind of file.{hint}") from None


def _read_torch_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()), "")
        if not found:  # not a refused object: a damaged or foreign file
            raise LauncherError(f"{what}: '{path}' cannot be read as PyTorch weights ({_first_line(err)[:200]}): it "
                                "is truncated, damaged or not a torch.save file.") from None
        raise LauncherError(f"{what}: '{path}' was refused by torch.load(weights_only=True): it holds more than "
                            f"tensors (pickled objects or code: {found[:200]}), and the launcher "
                            "never unpickles code. Save just the state_dict (or a .safetensors file).") from None
    except Exception as err:  # noqa: BLE001  (a damaged pickle fails in the unpickler in many ways)
        raise LauncherError(f"{what}: '{path}' cannot be read as PyTorch weights ({_first_line(err)[:200]}): it is "
                            "truncated, damaged or not a torch.save file.") from None
    for key in ("state_dict", "model", "module"):  # common wrappers of a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LauncherError(f"{what}: '{path}' holds no state dict of tensors.")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def mismatches(own: dict, state: dict, ignore: Callable[[str], bool] = lambda name: False,
               shape_may_differ: Iterable[str] = ()) -> list[str]:
    """What keeps weights `state` from a model whose state dict is `own`: names missing from
    the file, names the model lacks, shapes that differ; `ignore`d names and the shapes of
    `shape_may_differ` (a classifier about to be replaced) do not count."""
    shape_may_differ = set(shape_may_differ)
    problems = [f"missing '{n}'" for n in own if n not in state and not ignore(n)]
    problems += [f"unexpected '{n}'" for n in state if n not in own and not ignore(n)]
    problems += [f"'{n}' has shape {tuple(state[n].shape)}, the model {tuple(t.shape)}"
                 for n, t in own.items() if n in state and state[n].shape != t.shape and not ignore(n)
                 and n not in shape_may_differ]
    return problems


def listed(problems: list[str], limit: int = 5) -> str:
    """The first `limit` problems, then how many more: an error stays one readable paragraph."""
    return "; ".join(problems[:limit]) + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def load_into(model: torch.nn.Module, path: Path, what: str, fix: str) -> None:
    """Load a whole state dict into `model`; a file that does not fit the model (another
    architecture, another number of classes) is an error listing what differs, then `fix`."""
    state = read_state_dict(path, what)
    problems = mismatches(model.state_dict(), state)
    if problems:
        raise LauncherError(f"{what}: '{path}' does not fit the model: {listed(problems)}. {fix}")
    model.load_state_dict(state)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
