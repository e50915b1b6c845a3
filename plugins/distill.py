"""distill: knowledge distillation from a frozen teacher (Hinton, Vinyals & Dean 2015).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss

The T^2 keeps the soft term's gradients on the scale of the hard term's. The teacher is any
timm model name plus a local checkpoint (a .safetensors file, or a run directory of this
launcher, whose recipe.yaml names the model and whose final/model.safetensors holds the
weights). It is frozen, in eval mode, not wrapped for DDP (it never trains, so there is
nothing to all-reduce), and runs under no_grad inside the student's autocast, on the same
(possibly mixed) images.

Under DeepSpeed the teacher stays outside the engine (not sharded, fp32): with bf16/fp16
the student's inputs arrive in the engine's dtype and are cast back for the teacher.

Hooks: setup (loads the teacher), transform_loss. No state: the teacher is fixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from launcher.errors import LauncherError
from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register
from launcher.runlog import final_weights, recipe_file
from launcher.models.weights import load_into
from launcher.config.yamlfile import load_yaml

torch = lazy("torch")
F = lazy("torch.nn.functional")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, task_loss: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """Hinton et al.'s loss for one micro-batch (the KL term averaged over its samples)."""
    kl = F.kl_div(F.log_softmax(student.float() / temperature, dim=-1),
                  F.log_softmax(teacher.float() / temperature, dim=-1), log_target=True, reduction="batchmean")
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * task_loss


def resolve_teacher(checkpoint: str, model: Optional[str]) -> tuple[str, Path, dict]:
    """(model name, weights file, extra create_model kwargs) from a file or a run directory."""
    path = Path(checkpoint)
    kwargs: dict[str, Any] = {}
    if path.is_dir():
        weights, teacher_recipe = final_weights(path), recipe_file(path)
        if not weights.is_file() or not teacher_recipe.is_file():
            raise LauncherError(f"plugins.distill.checkpoint: '{path}' is not a finished run directory (it needs "
                                "recipe.yaml and final/model.safetensors). Train the teacher first.")
        teacher_model = load_yaml(teacher_recipe.read_text(), f"The teacher's recipe '{teacher_recipe}'")["model"]
        model = model or teacher_model["name"]
        kwargs = {"in_chans": teacher_model["in_chans"], **teacher_model.get("kwargs", {})}
        return model, weights, kwargs
    if not path.is_file():
        raise LauncherError(f"plugins.distill.checkpoint: '{path}' does not exist. Give a .safetensors file or the "
                            "run directory of a finished teacher run.")
    if model is None:
        raise LauncherError("plugins.distill.model is required when the checkpoint is a weights file "
                            "(a run directory names its own model).")
    return model, path, kwargs


@register("distill")
class Distillation(Plugin):
    """Knowledge distillation from a frozen teacher (Hinton et al. 2015)."""

    class Options(PluginOptions):
        checkpoint: str = Field(description="teacher weights: a .safetensors file or a launcher run directory")
        model: Optional[str] = Field(None, description="teacher timm model name (default: from the run directory)")
        alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation term")
        temperature: float = Field(4.0, gt=0.0, description="softmax temperature T")

    notes_under = {"deepspeed": "the teacher is not wrapped by the engine: a full fp32 copy on every rank"}

    teacher = None

    def setup(self, ctx) -> None:
        import timm

        name, weights, kwargs = resolve_teacher(self.options.checkpoint, self.options.model)
        if not timm.is_model(name):
            raise LauncherError(f"plugins.distill.model: unknown model '{name}'.")
        teacher = timm.create_model(name, num_classes=ctx.recipe.model.num_classes, **kwargs)
        load_into(teacher, weights, "plugins.distill.checkpoint",
                  f"They must be weights of '{name}' with {ctx.recipe.model.num_classes} classes.")
        self.teacher = teacher.to(ctx.accelerator.device).eval().requires_grad_(False)
        self.dtype = next(self.teacher.parameters()).dtype

    def transform_loss(self, ctx, loss, batch, logits):
        with torch.no_grad():
            teacher_logits = self.teacher(batch.images.to(self.dtype))
        return distillation_loss(logits, teacher_logits, loss, self.options.alpha, self.options.temperature)
