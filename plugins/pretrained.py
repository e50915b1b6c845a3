"""pretrained: start from local weights (fine-tuning) instead of a random initialisation.

`weights` is a .safetensors file, a PyTorch weights file (.bin/.pth/.pt such as
pytorch_model.bin, read with torch.load(weights_only=True)), a launcher run directory (its
final/model.safetensors), or a checkpoint folder (checkpoints/step-N, its model.safetensors). Every tensor must
match the model by name and shape, except the classifier: when its shape differs (another
number of classes) it keeps its fresh initialisation (`head: auto`), as fine-tuning on a new
label set needs. Anything else missing or mismatched is an error that lists the names, so
a checkpoint from another architecture is never half-loaded.

Combine with layer_lr (discriminative LRs, frozen backbone) for the usual fine-tuning recipe.
Hooks: setup (before the model is wrapped; a resume loads its checkpoint over it later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from launcher.errors import LauncherError
from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import final_weights
from launcher.models.weights import listed, mismatches, read_state_dict


def resolve_weights(path: str) -> Path:
    p = Path(path).expanduser()
    for candidate in (p, final_weights(p), p / "model.safetensors"):  # a file, a run, a checkpoint
        if candidate.is_file():
            return candidate
    raise LauncherError(f"plugins.pretrained.weights: '{path}' is not a .safetensors file, a finished run "
                        "directory (with final/model.safetensors) or a checkpoint folder.")


def load_pretrained(model, weights: Path, head: str) -> list[str]:
    """Load `weights` into `model`; returns the classifier tensors left at their initialisation."""
    state = read_state_dict(weights, "plugins.pretrained.weights")
    own = model.state_dict()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_names = set()
    if classifier is not None:
        ids = {id(t) for t in list(classifier.parameters()) + list(classifier.buffers())}
        head_names = {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if id(t) in ids}
    # A classifier of another shape keeps its initialisation (head: auto), unless head: load.
    skipped = [n for n in head_names & set(own) if n in state and state[n].shape != own[n].shape and head != "load"]
    if head == "reset":
        skipped = sorted(set(skipped) | (head_names & set(own)))
    problems = mismatches(own, state, shape_may_differ=skipped)
    if problems:
        raise LauncherError(f"plugins.pretrained: '{weights}' does not fit model: {listed(problems, 6)}. Check "
                            "model.name and model.kwargs against the run that wrote these weights.")
    model.load_state_dict({n: t for n, t in state.items() if n not in skipped}, strict=False)
    return sorted(skipped)


@register("pretrained")
class Pretrained(Plugin):
    """Initialise the model from local weights; a classifier of another shape keeps its fresh init."""

    class Options(PluginOptions):
        weights: str = Field(description="a .safetensors or .bin/.pth file, a run directory, or a checkpoint folder")
        head: Literal["auto", "reset", "load"] = Field(
            "auto", description="auto: load the classifier if its shape fits; reset: never load it; load: always")

    @classmethod
    def check_recipe(cls, recipe, options):
        try:
            resolve_weights(options.weights)
        except LauncherError as err:
            return str(err)
        return None

    def setup(self, ctx) -> None:
        weights = resolve_weights(self.options.weights)
        self.reset = load_pretrained(ctx.model, weights, self.options.head)
        if ctx.is_main:
            kept = f"; classifier left at its initialisation: {', '.join(self.reset)}" if self.reset else ""
            print(f"[pretrained] loaded {weights}{kept}", flush=True)
