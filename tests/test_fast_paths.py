"""The CUDA fast paths, checked on the CPU where their arithmetic can be: uint8 batches normalised
where they land equal the per-sample normalised ones bit for bit; the fused optimizer kernels
are chosen where torch has them and give the foreach result; channels_last is the default only
for CUDA with amp. tests/test_gpu.py checks them on a GPU."""

from __future__ import annotations

import pytest
import torch

from launcher.data import EpochPlan, TrainStream, batches, index_shards, on_device
from launcher.models.factory import memory_format
from launcher.optim import create_optimizer, fused_kwargs
from launcher.config.recipe import ModelSection, OptimizerSection
from launcher.config.load import validate_recipe
from launcher.data.transforms import ImageTransform
from tests.conftest import small_recipe


def epoch_batches(digits, tmp_path, normalize_on_device: bool, augment: dict, fmt=torch.contiguous_format):
    recipe = validate_recipe(small_recipe(digits, tmp_path, data={"augment": augment, "mean": [0.3, 0.4, 0.5],
                                                                  "std": [0.2, 0.3, 0.25]}))
    index = index_shards(recipe.data.train, "data.train")
    plan = EpochPlan(tuple(int(n) for n in index.shard_sizes), 32, streams=2, world_size=1, seed=0)
    transform = ImageTransform(recipe.data, 3, train=True, normalize_on_device=normalize_on_device)
    stream = TrainStream(index, plan, transform, epoch=1, rank=0)
    got = list(on_device(batches(stream, num_workers=1), torch.device("cpu"), fmt, transform.finish))
    return got, transform


def test_uint8_batches_normalised_on_the_device_equal_the_per_sample_path(digits, tmp_path):
    augment = {"crop_padding": 2, "hflip": 0.5, "auto_augment": "trivialaugment"}
    reference, _ = epoch_batches(digits, tmp_path, False, augment)
    deferred, transform = epoch_batches(digits, tmp_path, True, augment, torch.channels_last)
    assert transform.on_device
    assert len(reference) == len(deferred) == 45
    for a, b in zip(reference, deferred):
        assert b.images.dtype == torch.float32 and b.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_random_erasing_keeps_normalising_in_the_loader(digits, tmp_path):
    """timm's RandomErasing draws its noise on normalised samples: that order is kept."""
    _, transform = epoch_batches(digits, tmp_path, True, {"random_erasing": 0.5})
    assert not transform.on_device


def test_fused_kernels_where_torch_has_them_and_the_same_update(digits):
    assert fused_kwargs("momentum") == fused_kwargs("adamw") == {"fused": True}
    assert fused_kwargs("lamb") == fused_kwargs("rmsprop") == {}  # timm's / torch's foreach forms
    for name, tolerance in (("momentum", 1e-6), ("adamw", 1e-6)):  # fused rounds differently (fma): ~1 ulp
        finals = []
        for fused in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Linear(6, 3)
            optimizer = create_optimizer(OptimizerSection(name=name, lr=0.1, weight_decay=1e-2),
                                         [{"params": list(model.parameters())}], fused=fused)
            assert optimizer.defaults.get("fused") == (True if fused else None)
            for step in range(4):
                torch.manual_seed(step)
                torch.nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
                optimizer.step()
                optimizer.zero_grad()
            finals.append(model.weight.detach().clone())
        assert (finals[0] - finals[1]).abs().max().item() <= tolerance, name
    # optimizer.kwargs wins over the default
    model = torch.nn.Linear(2, 2)
    section = OptimizerSection(name="adamw", kwargs={"fused": False})
    assert create_optimizer(section, [{"params": list(model.parameters())}], fused=True).defaults["fused"] is False


@pytest.mark.parametrize("channels_last,device,precision,expected", [
    (None, "cuda", "bf16", torch.channels_last), (None, "cuda", "fp16", torch.channels_last),
    (None, "cuda", "no", torch.contiguous_format), (None, "cpu", "bf16", torch.contiguous_format),
    (False, "cuda", "bf16", torch.contiguous_format), (True, "cpu", "no", torch.channels_last)])
def test_channels_last_is_the_default_for_cuda_with_amp(channels_last, device, precision, expected):
    section = ModelSection(name="resnet18", num_classes=10, channels_last=channels_last)
    assert memory_format(section, torch.device(device), precision) == expected


def test_persistent_workers_load_the_per_epoch_workers_batches_and_resume_exactly(digits, tmp_path):
    """Workers forked once for the run (data.persistent_workers, the CUDA default) train exactly what
    workers forked per epoch train: across epochs, an image-size change (progressive resizing) and
    evaluations; and a run stopped mid-epoch resumes with them to the same weights."""
    from safetensors.torch import load_file

    from launcher.loop import train
    from tests.conftest import metric_rows

    def run(name, persistent, max_steps=None, **plugins):
        raw = small_recipe(digits, tmp_path / name, train={"epochs": 3, "max_steps": max_steps},
                           data={"num_workers": 2, "persistent_workers": persistent},
                           plugins={"progressive_resize": {"sizes": [12, 16], "epochs": [0, 2]}, **plugins})
        return train(validate_recipe(raw))

    per_epoch = run("per_epoch", False)
    kept = run("kept", True)
    assert per_epoch.train_workers is None
    assert kept.train_workers.forks == 1 and kept.eval_workers.forks == 1  # 3 epochs, 3 evaluations, one fork each
    final = {name: load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("per_epoch", "kept")}
    assert all(torch.equal(final["per_epoch"][k], v) for k, v in final["kept"].items())
    assert metric_rows(tmp_path / "per_epoch") == metric_rows(tmp_path / "kept")

    checkpoint = {"checkpoint": {"every_steps": 20, "every_epochs": None}}
    run("resumed", True, max_steps=100, **checkpoint)  # stops in epoch 2 (45 steps per epoch)
    resumed = run("resumed", True, **checkpoint)
    assert resumed.step == kept.step
    again = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(final["kept"][k], v) for k, v in again.items())
