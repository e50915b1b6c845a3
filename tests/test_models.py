"""Models: timm by name, and the CIFAR WideResNets registered into timm's own registry."""

from __future__ import annotations

import pytest
import timm
import torch

import launcher  # noqa: F401  (registers the WRNs)
from launcher.errors import LauncherError
from launcher.models.factory import create_model
from launcher.config.recipe import ModelSection


@pytest.mark.parametrize("name, classes, millions", [
    # Parameter counts from Zagoruyko & Komodakis 2016, Table 1 and text.
    ("wrn16_4", 100, 2.7), ("wrn40_4", 10, 8.9), ("wrn28_10", 100, 36.5), ("wrn40_10", 100, 55.8),
])
def test_wrn_sizes_match_the_paper(name, classes, millions):
    model = timm.create_model(name, num_classes=classes)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.15


def test_wrn_is_a_timm_model_with_the_timm_interface():
    assert "wrn28_10" in timm.list_models("wrn*")
    model = timm.create_model("wrn16_2", num_classes=7, drop_rate=0.3)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 128, 8, 8)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert model.stages[0][0].drop_rate == 0.3


def test_wrn_dropout_is_active_only_in_training():
    model = timm.create_model("wrn10_2", num_classes=5, drop_rate=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_wrn_uses_kaiming_fan_out_init():
    torch.manual_seed(0)
    model = timm.create_model("wrn28_10", num_classes=100)
    conv = model.stages[2][1].conv1  # 640 -> 640, 3x3
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    assert torch.all(model.norm.weight == 1) and torch.all(model.fc.bias == 0)


def test_wrn_depth_must_be_6n_plus_4():
    from launcher.models.factory import WideResNet

    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=27)


def test_any_timm_model_by_name():
    model = create_model(ModelSection(name="resnet18", num_classes=10, in_chans=1))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_model_suggests_the_nearest_name():
    with pytest.raises(LauncherError, match="Unknown model 'resnet181'.*Did you mean 'resnet18"):
        create_model(ModelSection(name="resnet181", num_classes=10))
