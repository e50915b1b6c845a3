"""Per-sample image transforms from the recipe, built from torchvision (v2, on uint8 tensors)
and timm (random erasing). Randomness comes from the global RNGs, which the data layer
seeds per sample, so draws do not depend on the rank or worker that loads a sample."""

from __future__ import annotations

import torch
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from launcher.errors import LauncherError


class ImageTransform:
    """uint8 (C, H, W) -> normalised float (in_chans, size, size).

    With normalize_on_device, samples stay uint8 (C, size, size) and `finish` scales and normalises
    the whole batch where it lands (a CUDA run: 4x fewer bytes per batch through shared memory,
    pinned memory and PCIe, and no per-sample float work in the loader workers). The arithmetic is
    torchvision's, on the same values, so the batch equals the per-sample one bit for bit.
    Random erasing draws its noise on normalised float samples, so it keeps normalisation here."""

    def __init__(self, data, in_chans: int, train: bool, image_size: int = 0, normalize_on_device: bool = False):
        if len(data.mean) != in_chans or len(data.std) != in_chans:
            raise LauncherError(
                f"data.mean and data.std need {in_chans} values (model.in_chans), got {len(data.mean)} and "
                f"{len(data.std)}."
            )
        self.size, self.in_chans = image_size or data.image_size, in_chans
        self._settings = (data, in_chans, train, normalize_on_device)
        aug = data.augment
        ops = []
        if train:
            if aug.crop_padding:
                ops.append(v2.RandomCrop(self.size, padding=aug.crop_padding, fill=0))
            if aug.hflip:
                ops.append(v2.RandomHorizontalFlip(aug.hflip))
            if aug.rotation:
                ops.append(v2.RandomRotation(aug.rotation))
            if aug.auto_augment in ("cifar10", "imagenet", "svhn"):
                ops.append(v2.AutoAugment(v2.AutoAugmentPolicy(aug.auto_augment)))
            elif aug.auto_augment == "randaugment":
                ops.append(v2.RandAugment())
            elif aug.auto_augment == "trivialaugment":
                ops.append(v2.TrivialAugmentWide())
        self.erase = None
        if train and aug.random_erasing:
            self.erase = RandomErasing(probability=aug.random_erasing, mode="pixel", device="cpu")
        self.mean, self.std = list(data.mean), list(data.std)
        self.on_device = normalize_on_device and self.erase is None
        if not self.on_device:
            ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.ops = v2.Compose(ops) if ops else (lambda image: image)

    def with_size(self, image_size: int) -> "ImageTransform":
        """The same transform at another image size (progressive resizing)."""
        data, in_chans, train, on_device = self._settings
        return ImageTransform(data, in_chans, train, image_size=image_size, normalize_on_device=on_device)

    def same_settings(self, other) -> bool:
        """True when `other` is this transform, possibly at another size (loader workers keep theirs)."""
        mine, theirs = self._settings, getattr(other, "_settings", None)
        return theirs is not None and mine[0] is theirs[0] and mine[1:] == theirs[1:]

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """The batch (N, C, H, W) as the model takes it: normalised here when the samples were not."""
        if not self.on_device:
            return images
        images = v2.functional.to_dtype(images, torch.float32, scale=True)
        return v2.functional.normalize(images, self.mean, self.std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        channels = image.shape[0]
        if channels != self.in_chans:
            if channels == 1:
                image = image.expand(self.in_chans, -1, -1)  # grayscale data, colour model
            elif self.in_chans == 1:
                image = v2.functional.rgb_to_grayscale(image[:3])
            else:
                raise LauncherError(f"images have {channels} channels but model.in_chans is {self.in_chans}.")
        if image.shape[-2:] != (self.size, self.size):
            image = v2.functional.resize(image, [self.size, self.size], antialias=True)
        image = self.ops(image)
        return self.erase(image) if self.erase is not None else image
