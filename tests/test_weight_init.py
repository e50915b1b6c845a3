"""weight_init: the schemes give the variances their papers derive (He: 2/fan, Glorot:
2/(fan_in+fan_out), Saxe: orthogonal rows), zero biases, unit norm weights, and residual
blocks that start as the identity with zero_init_last_bn; every rank starts equal."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn

from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.registry import Plugin, register
from launcher.plugins.weight_init import init_weights
from tests.conftest import small_recipe


def net():
    return nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.ReLU(), nn.Flatten(), nn.Linear(512, 256))


@pytest.mark.parametrize("scheme,mode,expected_std", [
    ("kaiming_normal", "fan_in", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
    ("kaiming_uniform", "fan_out", lambda fan_in, fan_out: math.sqrt(2 / fan_out)),
    ("xavier_normal", "fan_in", lambda fan_in, fan_out: math.sqrt(2) * math.sqrt(2 / (fan_in + fan_out))),
    ("xavier_uniform", "fan_in", lambda fan_in, fan_out: math.sqrt(2) * math.sqrt(2 / (fan_in + fan_out))),
])
def test_variance_matches_the_paper(scheme, mode, expected_std):
    torch.manual_seed(0)
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    init_weights(model, scheme, mode=mode, nonlinearity="relu")
    conv, bn, linear = model[0], model[1], model[4]
    for layer, fan_in, fan_out in ((conv, 64 * 9, 128 * 9), (linear, 512, 256)):
        std = layer.weight.std().item()
        assert std == pytest.approx(expected_std(fan_in, fan_out), rel=0.03), (scheme, layer)
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_orthogonal_rows():
    torch.manual_seed(0)
    model = net()
    init_weights(model, "orthogonal", nonlinearity="linear")
    w = model[4].weight  # 256 x 512: orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(256), atol=1e-5)


def test_zero_init_last_bn_makes_blocks_identity():
    model = timm.create_model("resnet18", num_classes=10)
    init_weights(model, "kaiming_normal", zero_init_last_bn=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for layer in (model.layer1, model.layer4) for b in layer)
    block = model.layer1[0].eval()
    x = torch.randn(2, 64, 8, 8).relu()
    assert torch.allclose(block(x), x)  # relu(0 + shortcut) with a non-negative input


@register("test_initial_weights_probe")
class InitialWeightsProbe(Plugin):
    """Keeps a copy of the weights the run starts from (after every plugin's setup)."""

    def after_prepare(self, ctx):
        self.weights = {n: p.detach().clone() for n, p in ctx.accelerator.unwrap_model(ctx.model).named_parameters()}


def test_a_run_starts_from_the_chosen_init_and_trains(digits, tmp_path):
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 2},
                       plugins={"weight_init": {"scheme": "orthogonal", "nonlinearity": "linear"},
                                "test_initial_weights_probe": {}})
    ctx = train(validate_recipe(raw))
    start = next(p for p in ctx.plugins if p.name == "test_initial_weights_probe").weights
    fc = start["fc.weight"]  # 10 x 64: orthonormal rows, which the model's own init does not give
    assert torch.allclose(fc @ fc.T, torch.eye(10), atol=1e-5)
    assert torch.count_nonzero(start["fc.bias"]) == 0
    assert ctx.metrics["val/top1"] > 0.6, ctx.metrics
