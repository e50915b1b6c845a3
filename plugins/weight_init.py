"""weight_init: re-initialise a model trained from scratch with a chosen scheme.

Convolution and linear weights get torch.nn.init's kaiming_normal / kaiming_uniform
(He et al. 2015, for ReLU nets), xavier_normal / xavier_uniform (Glorot & Bengio 2010), or
orthogonal (Saxe et al. 2014); their biases are set to zero. Norm layers get weight 1 and
bias 0, and `zero_init_last_bn` sets the weight of each residual block's last norm layer to
0 where the model says which it is (timm's `zero_init_last()`; Goyal et al. 2017), so each
block starts as the identity.

Runs in setup, on every rank from the same seeded RNG state, so all ranks start equal.
A resume loads its checkpoint over it. Hooks: setup. No state.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from launcher.lazy import lazy
from launcher.registry import Plugin, PluginOptions, register

torch = lazy("torch")
nn = lazy("torch.nn")

SCHEMES = ("kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal")


def init_weights(model: nn.Module, scheme: str, mode: str = "fan_out", nonlinearity: str = "relu",
                 zero_init_last_bn: bool = False) -> None:
    with torch.no_grad():  # not a decorator: that would import torch with the plugin
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                if scheme.startswith("kaiming"):
                    init = nn.init.kaiming_normal_ if scheme == "kaiming_normal" else nn.init.kaiming_uniform_
                    init(module.weight, mode=mode, nonlinearity=nonlinearity)
                elif scheme.startswith("xavier"):
                    init = nn.init.xavier_normal_ if scheme == "xavier_normal" else nn.init.xavier_uniform_
                    init(module.weight, gain=nn.init.calculate_gain(nonlinearity))
                else:
                    nn.init.orthogonal_(module.weight, gain=nn.init.calculate_gain(nonlinearity))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        if zero_init_last_bn:
            for module in model.modules():
                if hasattr(module, "zero_init_last") and module is not model:
                    module.zero_init_last()


@register("weight_init")
class WeightInit(Plugin):
    """Kaiming / Xavier / orthogonal initialisation of conv and linear weights (biases zero)."""

    class Options(PluginOptions):
        scheme: Literal[SCHEMES] = Field("kaiming_normal", description=" | ".join(SCHEMES))
        mode: Literal["fan_in", "fan_out"] = Field("fan_out", description="kaiming: preserve the forward "
                                                   "(fan_in) or backward (fan_out) variance")
        nonlinearity: Literal["relu", "leaky_relu", "tanh", "linear", "sigmoid"] = Field(
            "relu", description="sets the gain")
        zero_init_last_bn: bool = Field(False, description="residual blocks start as the identity (timm models)")

    def setup(self, ctx) -> None:
        o = self.options
        init_weights(ctx.model, o.scheme, o.mode, o.nonlinearity, o.zero_init_last_bn)
