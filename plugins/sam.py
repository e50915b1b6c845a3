"""sam: Sharpness-Aware Minimization (Foret et al. 2021), and its adaptive variant ASAM
(Kwon et al. 2021).

Each step: with the step's gradient g at weights w, move to the worst nearby point
w + e, with e = rho * g / ||g|| (ASAM: e = rho * T^2 g / ||T g||, with T = |w| + eta);
recompute the gradient there on the *same* micro-batches; move back to w; the optimizer
then steps with that gradient. The optimizer object is not replaced, so its state, the LR
schedule and resume work as usual.

Hook: before_optimizer_step, through ctx.train_step.recompute_gradients() (the loop re-runs the
step's micro-batches, with the same transformed targets). BatchNorm running statistics
from the second pass are discarded, so they are updated once per step, as in the paper's
reference code. Under DDP the perturbation uses the all-reduced gradient, so every rank
perturbs identically.
"""

from __future__ import annotations

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

torch = lazy("torch")


def sam_perturbation(params: list[torch.nn.Parameter], rho: float, adaptive: bool,
                     eta: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """e(w) for every parameter (zeros where there is no gradient), and the gradient norm."""
    with torch.no_grad():  # not a decorator: that would import torch with the plugin
        scales = [(p.abs() + eta) if adaptive else None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        scaled = [g * s if s is not None else g for g, s in zip(grads, scales)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled]))
        factor = rho / (norm + 1e-12)
        return [(g * s * factor) if s is not None else g * factor for g, s in zip(scaled, scales)], norm


def _batchnorm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


@register("sam")
class SharpnessAwareMinimization(Plugin):
    """SAM / ASAM: step with the gradient at the worst point within radius rho."""

    class Options(PluginOptions):
        rho: float = Field(0.05, gt=0.0, description="neighbourhood radius (paper: 0.05; ASAM: 0.5-2.0)")
        adaptive: bool = Field(False, description="ASAM: scale the neighbourhood by |w| + eta")
        eta: float = Field(0.01, ge=0.0, description="ASAM's offset keeping zero weights perturbable")

    refused_under = {"deepspeed": "SAM needs the gradient before the optimizer step and a second backward pass at "
                                  "the perturbed weights; DeepSpeed's engine steps inside its backward"}

    def before_optimizer_step(self, ctx) -> None:
        model = ctx.model
        params = [p for group in ctx.optimizer.param_groups for p in group["params"] if p.requires_grad]
        perturbation, norm = sam_perturbation(params, self.options.rho, self.options.adaptive, self.options.eta)
        if not torch.isfinite(norm):
            return  # an fp16 overflow: the loss scaler skips this step; do not perturb with inf/nan
        bn_state = [b.clone() for b in _batchnorm_buffers(model)]
        with torch.no_grad():
            original = [p.detach().clone() for p in params]  # restored exactly: (w + e) - e != w in floats
            torch._foreach_add_(params, perturbation)
        ctx.train_step.recompute_gradients()
        with torch.no_grad():
            for p, saved in zip(params, original):
                p.copy_(saved)
            for buffer, saved in zip(_batchnorm_buffers(model), bn_state):
                buffer.copy_(saved)
