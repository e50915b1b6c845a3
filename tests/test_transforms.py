"""ImageNet-style inputs: RandomResizedCrop, timm's evaluation resize + center crop (crop_pct),
color jitter and timm's augmentation strings, checked against timm's / torchvision's own
transforms on real photos (scikit-learn's two sample images), with the per-sample seeding that
makes a sample's augmentation independent of the process that loads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from launcher.data import seed_for_sample
from launcher.errors import LauncherError
from launcher.config.recipe import DataSection
from launcher.config.load import validate_recipe
from launcher.data.transforms import ImageTransform, timm_augmentation
from tests.conftest import REPO

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.ascontiguousarray(image) for image in load_sample_images().images]  # 427 x 640 RGB


def tensor(photo: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(photo.copy()).permute(2, 0, 1).contiguous()


def data(**keys) -> DataSection:
    return DataSection(train="x.tar", batch_size=4, **{**IMAGENET, **keys})


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_evaluation_crop_pct_is_timms_eval_transform(photos, interpolation):
    """Resize the shorter side to floor(224 / 0.875) = 256, center-crop 224: timm's transform (PIL)
    and ours (torchvision on tensors) agree to within one grey level."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    section = data(image_size=224, crop_pct=0.875, interpolation=interpolation)
    reference = transforms_imagenet_eval(img_size=224, crop_pct=0.875, interpolation=interpolation, **IMAGENET)
    for photo in photos:
        ours = ImageTransform(section, 3, train=False)(tensor(photo))
        theirs = reference(Image.fromarray(photo))
        levels = (ours - theirs).abs() * torch.tensor(IMAGENET["std"]).view(3, 1, 1) * 255
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert levels.max() <= 1.5 and levels.mean() < 0.05
    # Without crop_pct the whole image is squashed to the square, as before.
    squashed = ImageTransform(data(image_size=224), 3, train=False)(tensor(photos[0]))
    assert not torch.allclose(squashed, ImageTransform(section, 3, train=False)(tensor(photos[0])))


def test_random_resized_crop_is_torchvisions_with_the_recipes_scale_ratio_and_interpolation(photos):
    section = data(image_size=96, interpolation="bicubic", augment={
        "random_resized_crop": True, "scale": [0.25, 0.5], "ratio": [0.8, 1.25]})
    ours = ImageTransform(section, 3, train=True, normalize_on_device=True)
    reference = v2.RandomResizedCrop(96, scale=(0.25, 0.5), ratio=(0.8, 1.25),
                                     interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    image = tensor(photos[1])
    crops = []
    for sample in range(4):
        seed_for_sample(0, 0, sample)
        crops.append(ours(image))
        seed_for_sample(0, 0, sample)
        assert torch.equal(crops[-1], reference(image))
    assert crops[0].shape == (3, 96, 96) and not torch.equal(crops[0], crops[1])
    # scale (1, 1) at the photo's own aspect ratio: the whole photo, resized (no squash before the crop).
    whole = data(image_size=64, augment={"random_resized_crop": True, "scale": [1.0, 1.0], "ratio": [1.5, 1.5]})
    full = ImageTransform(whole, 3, train=True, normalize_on_device=True)(image)
    assert full.shape == (3, 64, 64)
    expected = v2.functional.resized_crop(image, 0, 0, 427, 640, [64, 64], antialias=True)
    assert (full.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_timm_augmentation_strings_are_timms_own_transforms(photos, config):
    """The same draw as timm's transform built from the same string and hyper-parameters,
    seeded the same way (python's and numpy's RNGs, which timm uses)."""
    section = data(image_size=128, augment={"auto_augment": config})
    ours = ImageTransform(section, 3, train=True, normalize_on_device=True)
    reference = timm_augmentation(config, 128, IMAGENET["mean"], "bilinear")
    image = v2.functional.resize(tensor(photos[0]), [128, 128], antialias=True)
    outputs = []
    for sample in range(6):
        seed_for_sample(3, 1, sample)
        outputs.append(ours(image))
        seed_for_sample(3, 1, sample)
        expected = v2.functional.pil_to_tensor(reference(v2.functional.to_pil_image(image)))
        assert torch.equal(outputs[-1], expected)
    assert len({o.sum().item() for o in outputs}) > 1  # the draws differ from sample to sample
    # and a sample's draw is its own: the same seed gives the same image
    seed_for_sample(3, 1, 2)
    assert torch.equal(ours(image), outputs[2])


def test_color_jitter_changes_colour_within_its_strength(photos):
    section = data(image_size=64, augment={"color_jitter": 0.4})
    jitter = ImageTransform(section, 3, train=True, normalize_on_device=True)
    plain = ImageTransform(data(image_size=64), 3, train=True, normalize_on_device=True)
    image = tensor(photos[0])
    base = plain(image).float()
    ratios = []
    for sample in range(8):
        seed_for_sample(0, 0, sample)
        ratios.append(jitter(image).float().mean().item() / base.mean().item())
    assert max(ratios) > 1.02 and min(ratios) < 0.98 and all(0.4 < r < 1.6 for r in ratios)


def test_bad_augmentation_settings_are_named():
    with pytest.raises(Exception, match="timm augmentation string such as rand-m9-mstd0.5-inc1"):
        data(augment={"auto_augment": "rand-q9"})
    with pytest.raises(Exception, match=r"the smaller first, e.g. \[0.08, 1.0\]"):
        data(augment={"scale": [1.0, 0.08]})
    with pytest.raises(Exception, match=r"the smaller first, e.g. \[0.75, 1.333\]"):  # its own example
        data(augment={"ratio": [4 / 3, 3 / 4]})
    with pytest.raises(LauncherError, match="data.crop_pct"):
        validate_recipe({"model": {"name": "resnet18", "num_classes": 2}, "train": {"epochs": 1},
                         "data": {"train": "x.tar", "batch_size": 2, "crop_pct": 1.5}})


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_timm_augmentation_strings_work_on_grey_images_filling_with_the_grey_mean(config):
    """A grey recipe (Fashion-MNIST: in_chans 1) with a timm string passed --check and died at step
    0: timm fills shears, translations and rotations with an RGB triple, which PIL refuses for a
    one-channel image. The fill is now the grey mean, one value."""
    from launcher.config.load import load_recipe

    recipe = load_recipe(REPO / "recipes" / "fashion_mnist.yaml",
                         [f"data.augment.auto_augment={config}", "data.augment_on=loader"])
    transform = ImageTransform(recipe.data, 1, train=True)
    torch.manual_seed(0)
    white = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    outs = torch.stack([transform(white) for _ in range(60)])
    assert outs.shape == (60, 1, 28, 28) and outs.std() > 0
    if config.startswith("rand"):  # a geometric op moved the white image over the fill: round(255 x 0.2860)
        fill = (73 / 255 - 0.2860) / 0.3530
        assert any(((out - fill).abs() < 1e-5).any() and (out > 1).any() for out in outs)


def test_randaugment_at_full_magnitude_posterizes_to_black_instead_of_failing(photos):
    """PosterizeIncreasing at magnitude 10 keeps 0 bits: Pillow 13 refuses that, older Pillow (and
    the TF reference) gave a black image; so does the launcher."""
    from timm.data.auto_augment import AugmentOp

    timm_augmentation("rand-m10-n1", 64, IMAGENET["mean"], "bilinear")  # installs the 0-bit form
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(Image.fromarray(photos[0][:64, :64]))
    assert np.asarray(out).max() == 0
    kept = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(Image.fromarray(photos[0][:64, :64]))
    assert set(np.unique(np.asarray(kept)) % 64) == {0}  # 4 - int(5 / 10 * 4) = 2 bits kept: multiples of 64


def test_with_a_timm_augmentation_photos_stay_pil_from_the_decoder_to_the_tensor(photos):
    """timm's augmentations are PIL-based: the decoded photo is cropped, flipped and augmented as a
    PIL image (one conversion at the end, as timm's own pipeline), with the same draws as that
    pipeline written out with torchvision's and timm's transforms."""
    import io

    from launcher.data import decode_image

    section = data(image_size=96, interpolation="bicubic", augment={
        "random_resized_crop": True, "hflip": 0.5, "auto_augment": "rand-m9-mstd0.5-inc1"})
    ours = ImageTransform(section, 3, train=True, normalize_on_device=True)
    assert ours.takes_pil
    buffer = io.BytesIO()
    Image.fromarray(photos[1]).save(buffer, format="JPEG", quality=90)
    decoded = decode_image(buffer.getvalue(), "jpg", as_pil=True)
    assert isinstance(decoded, Image.Image) and decoded.size == (640, 427)
    reference = v2.Compose([v2.RandomResizedCrop(96, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.RandomHorizontalFlip(0.5),
                            timm_augmentation("rand-m9-mstd0.5-inc1", 96, IMAGENET["mean"], "bicubic"),
                            v2.PILToTensor()])
    for sample in range(5):
        seed_for_sample(0, 2, sample)
        got = ours(decoded)
        seed_for_sample(0, 2, sample)
        assert got.dtype == torch.uint8 and got.shape == (3, 96, 96)
        assert torch.equal(got, reference(decoded))
