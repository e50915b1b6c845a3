"""model.grad_checkpointing: the same gradients (and, for the WideResNets, the same BatchNorm
statistics) as without it, far fewer activations kept for the backward pass; a model without
support is refused by name, and so is checkpointing twice with FSDP's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launcher.config.load import validate_recipe
from launcher.config.recipe import ModelSection
from launcher.errors import LauncherError
from launcher.models.factory import create_model
from tests.conftest import small_recipe


def one_step(name: str, checkpointing: bool, **kwargs):
    """Gradients, buffers and the bytes saved for backward of one training forward/backward."""
    torch.manual_seed(0)
    model = create_model(ModelSection(name=name, num_classes=10, grad_checkpointing=checkpointing, **kwargs)).train()
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, {n: b.clone() for n, b in model.named_buffers()}, sum(saved)


@pytest.mark.parametrize("name, kwargs", [("wrn16_2", {"drop_rate": 0.3}), ("resnet10t", {})])
def test_same_gradients_with_far_fewer_saved_activations(name, kwargs):
    plain_grads, plain_buffers, plain_bytes = one_step(name, False, **kwargs)
    grads, buffers, saved_bytes = one_step(name, True, **kwargs)
    assert grads.keys() == plain_grads.keys()
    for key in grads:  # dropout inside the WRN blocks draws the same masks when recomputed
        assert torch.allclose(grads[key], plain_grads[key], rtol=1e-4, atol=1e-6), key
    assert saved_bytes < 0.5 * plain_bytes, (saved_bytes, plain_bytes)
    if name.startswith("wrn"):  # the recompute does not update the running statistics a second time
        for key in buffers:
            assert torch.equal(buffers[key], plain_buffers[key]), key


def test_a_model_without_support_and_checkpointing_twice_are_refused(digits, tmp_path):
    with pytest.raises(LauncherError, match="'legacy_seresnet18' does not support gradient checkpointing"):
        create_model(ModelSection(name="legacy_seresnet18", num_classes=10, grad_checkpointing=True))
    raw = small_recipe(digits, tmp_path / "run", model={"name": "wrn10_1", "num_classes": 10, "grad_checkpointing": True},
                       distributed={"strategy": "fsdp", "fsdp_activation_checkpointing": True})
    with pytest.raises(LauncherError, match="would checkpoint twice"):
        validate_recipe(raw)
