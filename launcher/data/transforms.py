"""Per-sample image transforms from the recipe, built from torchvision (v2, on uint8 tensors)
and timm (random erasing). Randomness comes from the global RNGs, which the data layer
seeds per sample, so draws do not depend on the rank or worker that loads a sample."""

from __future__ import annotations

import math

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from launcher.errors import LauncherError


INTERPOLATION = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                 "nearest": v2.InterpolationMode.NEAREST}


def timm_augmentation(config: str, image_size: int, mean, interpolation: str, in_chans: int = 3):
    """timm's augmentation from its config string, with the hyper-parameters timm's own
    transforms_imagenet_train gives it (translation relative to the image size, fill = the mean).
    Grey images (in_chans 1, PIL mode 'L') take a single fill value: timm's RGB triple made PIL
    refuse every shear, translation and rotation of a one-channel image."""
    from timm.data import auto_augment
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize
    fill = tuple(min(255, round(255 * m)) for m in (list(mean) * 3)[:3])
    hparams = {"translate_const": int(image_size * 0.45),
               "img_mean": fill[0] if in_chans == 1 else fill,
               "interpolation": str_to_pil_interp(interpolation)}
    if config.startswith("rand"):
        return rand_augment_transform(config, hparams)
    if config.startswith("augmix"):
        hparams["translate_pct"] = 0.3
        return augment_and_mix_transform(config, hparams)
    return auto_augment_transform(config, hparams)


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, for 0 bits too. RandAugment's PosterizeIncreasing keeps 0 bits at magnitude
    10 (timm's mstd noise reaches it); older Pillow made that a black image, Pillow 13 raises
    "bits must be between or equal to 1 and 8" and would stop the run. Written here because timm
    (1.0.31) still passes 0; the image is what Pillow used to return."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class OnPIL:
    """timm's augmentations work on PIL images: uint8 tensor -> PIL -> op -> uint8 tensor."""

    def __init__(self, op):
        self.op = op

    def __call__(self, image):
        from PIL import Image

        if isinstance(image, Image.Image):
            return self.op(image)
        # A contiguous HWC copy first: PIL's own copy of a transposed array is slower.
        pixels = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).contiguous().numpy()
        out = np.array(self.op(Image.fromarray(pixels)))  # writable: torch shares it
        return torch.from_numpy(out[:, :, None] if out.ndim == 2 else out).permute(2, 0, 1)

    def __repr__(self) -> str:
        return f"OnPIL({self.op!r})"


class ImageTransform:
    """uint8 (C, H, W) -> normalised float (in_chans, size, size).

    With normalize_on_device, samples stay uint8 (C, size, size) and `finish` scales and normalises
    the whole batch where it lands (a CUDA run: 4x fewer bytes per batch through shared memory,
    pinned memory and PCIe, and no per-sample float work in the loader workers). The arithmetic is
    torchvision's, on the same values, so the batch equals the per-sample one bit for bit.
    Random erasing draws its noise on normalised float samples, so it keeps normalisation here."""

    def __init__(self, data, in_chans: int, train: bool, image_size: int = 0, normalize_on_device: bool = False,
                 batched: bool = False):
        if len(data.mean) != in_chans or len(data.std) != in_chans:
            raise LauncherError(
                f"data.mean and data.std need {in_chans} values (model.in_chans), got {len(data.mean)} and "
                f"{len(data.std)}."
            )
        self.size, self.in_chans = image_size or data.image_size, in_chans
        self._settings = (data, in_chans, train, normalize_on_device, batched)
        # data.augment_on: device: the loader only decodes; the augmentation and normalisation run
        # on the whole batch where it lands (launcher/data/augment.py), with parameters drawn here.
        self.batch_augment = None
        if train and batched:
            from launcher.data.augment import BatchAugment

            self.batch_augment = BatchAugment(data.augment, self.size, data.mean, data.std)
        aug = data.augment
        self.interpolation = INTERPOLATION[data.interpolation]
        # The geometry first: what the model's input is cut from. Other images are squashed to size.
        ops, self.squash = [], True
        if train and aug.random_resized_crop:
            if self.batch_augment is None:
                ops.append(v2.RandomResizedCrop(self.size, scale=aug.scale, ratio=aug.ratio,
                                                interpolation=self.interpolation, antialias=True))
            self.squash = False  # batched: cropped from the decoded image where the batch lands
        elif not train and data.crop_pct is not None:
            # timm's eval transform: the shorter side to floor(size / crop_pct), then the center.
            ops += [v2.Resize(math.floor(self.size / data.crop_pct), interpolation=self.interpolation, antialias=True),
                    v2.CenterCrop(self.size)]
            self.squash = False
        if train and self.batch_augment is None:
            if aug.crop_padding:
                ops.append(v2.RandomCrop(self.size, padding=aug.crop_padding, fill=0))
            if aug.hflip:
                ops.append(v2.RandomHorizontalFlip(aug.hflip))
            if aug.rotation:
                ops.append(v2.RandomRotation(aug.rotation))
            if aug.color_jitter:
                ops.append(v2.ColorJitter(brightness=aug.color_jitter, contrast=aug.color_jitter,
                                          saturation=aug.color_jitter))
            if aug.auto_augment in ("cifar10", "imagenet", "svhn"):
                ops.append(v2.AutoAugment(v2.AutoAugmentPolicy(aug.auto_augment)))
            elif aug.auto_augment == "randaugment":
                ops.append(v2.RandAugment())
            elif aug.auto_augment == "trivialaugment":
                ops.append(v2.TrivialAugmentWide())
            elif aug.auto_augment:
                ops.append(OnPIL(timm_augmentation(aug.auto_augment, self.size, data.mean, data.interpolation,
                                                       in_chans)))
        # timm's augmentations work on PIL images: then encoded images stay PIL from the decoder
        # through every op (torchvision's accept PIL too) and become a tensor once, here, as in timm.
        self.takes_pil = any(isinstance(op, OnPIL) for op in ops)
        if self.takes_pil:
            ops.append(v2.PILToTensor())
        self.erase = None
        if train and aug.random_erasing and self.batch_augment is None:
            self.erase = RandomErasing(probability=aug.random_erasing, mode="pixel", device="cpu")
        self.mean, self.std = list(data.mean), list(data.std)
        self.on_device = (normalize_on_device and self.erase is None) or self.batch_augment is not None
        if not self.on_device:
            ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.ops = v2.Compose(ops) if ops else (lambda image: image)

    def with_size(self, image_size: int) -> "ImageTransform":
        """The same transform at another image size (progressive resizing)."""
        data, in_chans, train, on_device, batched = self._settings
        return ImageTransform(data, in_chans, train, image_size=image_size, normalize_on_device=on_device,
                              batched=batched)

    def same_settings(self, other) -> bool:
        """True when `other` is this transform, possibly at another size (loader workers keep theirs)."""
        mine, theirs = self._settings, getattr(other, "_settings", None)
        return theirs is not None and mine[0] is theirs[0] and mine[1:] == theirs[1:]

    def batch_params(self, keys, height: int, width: int):
        """The batched augmentation's per-sample parameters (None without one)."""
        return None if self.batch_augment is None else self.batch_augment.params(keys, height, width)

    def finish(self, images: torch.Tensor, params=None) -> torch.Tensor:
        """The batch (N, C, H, W) as the model takes it: augmented (with the parameters drawn by the
        loader) and normalised here when the samples were not."""
        if self.batch_augment is not None and params is not None:
            return self.batch_augment.apply(images, params)
        if not self.on_device:
            return images
        images = v2.functional.to_dtype(images, torch.float32, scale=True)
        return v2.functional.normalize(images, self.mean, self.std)

    def __call__(self, image) -> torch.Tensor:
        """A uint8 (C, H, W) tensor, or a PIL image (decode_image(as_pil=True), for takes_pil)."""
        from PIL import Image

        if isinstance(image, Image.Image):
            if self.in_chans == 3 and image.mode != "RGB":
                image = image.convert("RGB")
            elif self.in_chans == 1 and image.mode != "L":
                image = image.convert("L")
            if self.squash and image.size != (self.size, self.size):
                image = v2.functional.resize(image, [self.size, self.size], interpolation=self.interpolation,
                                             antialias=True)
            image = self.ops(image)
            return self.erase(image) if self.erase is not None else image
        channels = image.shape[0]
        if channels != self.in_chans:
            if channels == 1:
                image = image.expand(self.in_chans, -1, -1)  # grayscale data, colour model
            elif self.in_chans == 1:
                image = v2.functional.rgb_to_grayscale(image[:3])
            else:
                raise LauncherError(f"images have {channels} channels but model.in_chans is {self.in_chans}.")
        if self.squash and image.shape[-2:] != (self.size, self.size):
            image = v2.functional.resize(image, [self.size, self.size], interpolation=self.interpolation,
                                         antialias=True)
        image = self.ops(image)
        return self.erase(image) if self.erase is not None else image
