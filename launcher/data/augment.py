"""Augmentation of whole batches where they land (data.augment_on: device).

For 32-pixel images the per-sample transforms in the loader workers cost as much as a small
model's step, and batched tensor ops cost a small fraction of that (benchmarks/augment_speed.py
measures both). So for the ops below the loader only decodes, and the batch, still uint8, is
augmented and normalised on the training device in a few tensor operations:

    random_resized_crop  torchvision's RandomResizedCrop (bilinear): one grid_sample for the crops
                         that upscale; a crop larger than the output keeps torchvision's antialiased
                         resize, per sample (photos: their images differ in size, so data.augment_on:
                         auto keeps them on the loader)
    crop_padding     zero padding, then a crop at each sample's own offsets (torchvision's RandomCrop)
    hflip            each sample flipped with probability p (RandomHorizontalFlip)
    rotation         RandomRotation (nearest, fill 0): torchvision's affine grid, one per sample
    color_jitter     ColorJitter's brightness, contrast and saturation, in each sample's own order
                     and with its own factors
    auto_augment     torchvision's AutoAugment (cifar10, imagenet, svhn), RandAugment and
                     TrivialAugmentWide: the samples that drew the same op and magnitude go
                     through torchvision's own op together (launcher/data/augment_policy.py)
    random_erasing   timm's RandomErasing (mode pixel: per-pixel normal noise, area 2%-1/3,
                     aspect 0.3-3.3, 10 attempts), on the normalised image

Same guarantees as the per-sample path: every random parameter of a sample comes from that
sample's own key, a hash of (seed, epoch, sample id), never from a shared RNG stream, so a
batch does not depend on the rank count, the worker count, or where a resumed run starts.
The parameters are drawn in the loader (numpy, a few microseconds a batch) and travel with the
batch; the erasing noise is read on the device from a fixed table of normals, at an offset hashed
from the sample's key.
Given the same parameters, the output equals torchvision's and timm's per-sample ops bit for bit,
except the resized crop: within one grey level (torchvision resizes uint8 images in fixed point,
here they are sampled in float) (tests/test_augment.py). The draws themselves differ from the
per-sample path's (which uses torch's and Python's RNGs seeded per sample), so a run cannot switch
paths mid-run and give the same batches.

Written by hand: Kornia and torchvision v2 apply crops, flips, affine maps, colour and erasing to
batches, but draw their parameters from one global generator per batch, which ties each sample's
augmentation to the batch it lands in (and so to the number of processes), and torchvision's
kernels take one angle or factor for the whole batch; the ops themselves are index arithmetic,
torchvision's affine grid with a per-sample matrix, and its blends with per-sample factors.
"""

from __future__ import annotations

import math

import numpy as np

from launcher.lazy import lazy

torch = lazy("torch")  # --check asks augment_path without paying for torch

# The ops with a batched form; any other data.augment op keeps the per-sample path.
BATCHED_OPS = ("random_resized_crop", "crop_padding", "hflip", "rotation", "color_jitter", "auto_augment",
               "random_erasing")
# Batched, but data.augment_on: auto keeps them on the loader: a photo data set's images differ in
# size, and a batch of them exists only after the per-sample crop.
LOADER_BY_DEFAULT = ("random_resized_crop",)

# The data.augment keys that make the same experiment on both paths: their parameters are drawn
# from the same distributions (exactly: uniform offsets, flips and rectangles) and, given the same
# parameters, the batched ops equal the per-sample ones bit for bit (tests/test_augment.py); only the
# draws themselves differ. The resized crop's options do nothing without it. The resampling ops and
# the policies round or draw differently on the device (within a grey level, or in distribution).
SAME_ON_BOTH_PATHS = frozenset({"crop_padding", "hflip", "random_erasing", "scale", "ratio"})

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (numpy's unsigned arithmetic wraps, as it should)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def sample_keys(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Each sample's 64-bit key from (seed, epoch, id); ids of resampled copies (id + k x N) give
    the copies keys of their own."""
    with np.errstate(over="ignore"):
        base = _splitmix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
                         + np.uint64(epoch & 0xFFFFFFFF))
        return _splitmix(base ^ (np.asarray(ids, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


def uniforms(keys: np.ndarray, draws: int, start: int = 0) -> np.ndarray:
    """(N, draws) independent uniforms in [0, 1), float64: draws start.. start + draws - 1, the
    j-th a hash of (key, j)."""
    with np.errstate(over="ignore"):
        counters = np.arange(start + 1, start + draws + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        bits = _splitmix(keys[:, None] ^ counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


ERASE_ATTEMPTS = 10
RESIZED_CROP_ATTEMPTS = 10
# Where each op's draws sit among a sample's uniforms: fixed, so adding an op never moves another
# op's draws (a run that started before an op had a batched form keeps its crops and erasing).
DRAW_CROP, DRAW_FLIP, DRAW_ERASE = 0, 2, 3  # crop: 2 draws; erase: on + 4 a attempt
DRAW_RESIZED_CROP = 4 + 4 * ERASE_ATTEMPTS  # 4 an attempt
DRAW_ROTATION = DRAW_RESIZED_CROP + 4 * RESIZED_CROP_ATTEMPTS
DRAW_JITTER = DRAW_ROTATION + 1  # order, brightness, contrast, saturation
DRAW_POLICY = DRAW_JITTER + 4  # 4 a step, 2 steps
DRAWS = DRAW_POLICY + 8


class BatchAugment:
    """The recipe's batched ops: params() in the loader, apply() on the device."""

    def __init__(self, augment, image_size: int, mean: list[float], std: list[float],
                 erase_area: tuple[float, float] = (0.02, 1 / 3), erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)):
        from launcher.data.augment_policy import BatchPolicy

        self.resized_crop = augment.random_resized_crop
        self.scale, self.ratio = tuple(augment.scale), tuple(augment.ratio)
        self.padding = augment.crop_padding
        self.flip = augment.hflip
        self.rotation = augment.rotation
        self.jitter = augment.color_jitter
        self.policy = BatchPolicy(augment.auto_augment) if augment.auto_augment else None
        self.erase = augment.random_erasing
        self.size = image_size
        self.mean, self.std = list(mean), list(std)
        self.erase_area = erase_area
        self.log_aspect = (math.log(erase_aspect[0]), math.log(erase_aspect[1]))

    @staticmethod
    def unbatched_ops(data) -> list[str]:
        """The recipe's data.augment ops that have no batched form (they need the loader): a timm
        auto_augment string (its ops work on PIL images), a resized crop with another filter than
        bilinear (grid_sample's bicubic would reach past the crop's edges)."""
        from launcher.data.augment_policy import BatchPolicy

        augment = data.augment
        defaults = type(augment)()
        return [name for name in type(augment).model_fields
                if name not in ("scale", "ratio") and getattr(augment, name) != getattr(defaults, name)
                and (name not in BATCHED_OPS
                     or name == "auto_augment" and not BatchPolicy.batched(augment.auto_augment)
                     or name == "random_resized_crop" and data.interpolation != "bilinear")]

    @staticmethod
    def loader_by_default(data) -> list[str]:
        """The recipe's ops that data.augment_on: auto leaves on the loader although they are batched."""
        return [name for name in LOADER_BY_DEFAULT if getattr(data.augment, name)]

    # ------------------------------------------------------------ in the loader

    def params(self, keys: np.ndarray, height: int, width: int) -> dict[str, torch.Tensor]:
        """Each sample's parameters (small tensors) from its key; height x width: the decoded images."""
        n = len(keys)
        # The j-th draw does not depend on how many are drawn: only the ops in use are drawn.
        newer = self.resized_crop or self.rotation or self.jitter or self.policy
        u = uniforms(keys, DRAWS if newer else DRAW_ERASE + 5 if self.erase else 3)
        params = {}
        if self.resized_crop:
            params["resized_crop"] = torch.from_numpy(self._resized_crop_boxes(u, height, width))
            height = width = self.size
        span = 2 * self.padding + 1
        top, left = np.floor(u[:, DRAW_CROP] * span), np.floor(u[:, DRAW_CROP + 1] * span)
        params["crop"] = torch.from_numpy(np.stack([top, left], 1).astype(np.int64))
        params["flip"] = torch.from_numpy(u[:, DRAW_FLIP] < self.flip)
        if self.rotation:  # RandomRotation: uniform in [-degrees, degrees]
            params["angle"] = torch.from_numpy(-self.rotation + 2 * self.rotation * u[:, DRAW_ROTATION])
        if self.jitter:
            params["jitter"] = torch.from_numpy(self._jitter_draws(u[:, DRAW_JITTER:DRAW_JITTER + 4]))
        if self.policy is not None:
            params.update(self.policy.params(u[:, DRAW_POLICY:DRAW_POLICY + 8], height, width))
        erase = np.zeros((n, 5), dtype=np.int64)  # on, top, left, h, w
        if self.erase:
            on = u[:, DRAW_ERASE] < self.erase
            attempt, fits = self._erase_attempts(keys[on], u[on, DRAW_ERASE + 1:DRAW_ERASE + 5], height, width)
            area_fraction, aspect, c, d = attempt.T
            h, w = self._erase_size(area_fraction, aspect, height * width)
            rows = np.flatnonzero(on)[fits]
            h, w, c, d = h[fits], w[fits], c[fits], d[fits]
            erase[rows, 0] = 1
            erase[rows, 1], erase[rows, 2] = np.floor(c * (height - h + 1)), np.floor(d * (width - w + 1))
            erase[rows, 3], erase[rows, 4] = h, w
        params["erase"] = torch.from_numpy(erase)
        params["key"] = torch.from_numpy((keys >> np.uint64(33)).astype(np.int64))  # 31 bits: noise seed
        return params

    def _erase_attempts(self, keys: np.ndarray, first: np.ndarray, height: int, width: int):
        """timm's RandomErasing tries up to 10 rectangles and erases the first that fits: each
        sample's first fitting attempt (4 uniforms: area, aspect, top, left) and whether one fit.
        Later attempts are drawn only for the samples whose earlier ones did not fit (most fit at
        once); the j-th draw of a sample is the same however many are drawn."""
        attempt, fits = first.copy(), np.zeros(len(keys), dtype=bool)
        todo = np.arange(len(keys))
        for k in range(ERASE_ATTEMPTS):
            draws = first if k == 0 else uniforms(keys[todo], 4, start=DRAW_ERASE + 1 + 4 * k)
            h, w = self._erase_size(draws[:, 0], draws[:, 1], height * width)
            ok = (w < width) & (h < height)
            attempt[todo[ok]], fits[todo[ok]] = draws[ok], True
            todo = todo[~ok]
            if not len(todo):
                break
        return attempt, fits

    def _erase_size(self, area_draw: np.ndarray, aspect_draw: np.ndarray, area: int):
        target = (self.erase_area[0] + (self.erase_area[1] - self.erase_area[0]) * area_draw) * area
        aspect = np.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * aspect_draw)
        return np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))

    def _resized_crop_boxes(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        """(N, 4) top, left, h, w: torchvision's RandomResizedCrop.make_params, all attempts at once."""
        n = len(u)
        attempts = u[:, DRAW_RESIZED_CROP:DRAW_RESIZED_CROP + 4 * RESIZED_CROP_ATTEMPTS].reshape(
            n, RESIZED_CROP_ATTEMPTS, 4)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        target = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * attempts[..., 0])
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * attempts[..., 1])
        w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))  # round half to even, as round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first, rows = fits.argmax(1), np.arange(n)
        h, w = h[rows, first], w[rows, first]
        top = np.floor(attempts[rows, first, 2] * (height - h + 1))
        left = np.floor(attempts[rows, first, 3] * (width - w + 1))
        # torchvision's fallback when no attempt fits: the centre crop, its ratio clamped
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fw, fh = int(round(height * max(self.ratio))), height
        else:
            fw, fh = width, height
        none = ~fits.any(1)
        h, w = np.where(none, fh, h), np.where(none, fw, w)
        top, left = np.where(none, (height - fh) // 2, top), np.where(none, (width - fw) // 2, left)
        return np.stack([top, left, h, w], 1).astype(np.int64)

    def _jitter_draws(self, u: np.ndarray) -> np.ndarray:
        """(N, 6): the order of brightness, contrast, saturation (a permutation, 3 columns, as
        ColorJitter's randperm with hue unused) and their factors, uniform in [max(0, 1 - s), 1 + s]."""
        orders = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], dtype=np.float64)
        low, high = max(0.0, 1 - self.jitter), 1 + self.jitter
        return np.concatenate([orders[np.floor(u[:, 0] * 6).astype(np.int64)], low + (high - low) * u[:, 1:4]], 1)

    # ------------------------------------------------------------ on the device

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (N, C, H, W) on the device -> augmented, normalised float32 batch."""
        nhwc = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        if self.resized_crop:
            images = resized_crops(images, params["resized_crop"], self.size)
        if self.padding or self.flip:
            images = self._crop_and_flip(images, params)
        if self.rotation:
            images = rotations(images, params["angle"])
        if self.jitter:
            images = color_jitter(images, params["jitter"])
        if self.policy is not None:
            images = self.policy.apply(images, params)
        from torchvision.transforms.v2 import functional as F

        # torchvision's tensor kernels (no dispatch); inplace: the float copy is ours (the same arithmetic)
        out = F.normalize_image(F.to_dtype_image(images.contiguous(), torch.float32, scale=True), self.mean,
                                self.std, inplace=True)
        if self.erase:
            out = self._erase(out, params["erase"], params["key"])
        return out.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)

    def _crop_and_flip(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Crop and flip in one gather: each output pixel's position in the padded image."""
        n, c, h, w = images.shape
        device = images.device
        p = self.padding
        padded = torch.nn.functional.pad(images, (p,) * 4) if p else images.contiguous()
        xs = torch.arange(w, device=device).expand(n, w)
        if self.flip:
            xs = torch.where(params["flip"][:, None], w - 1 - xs, xs)
        rows = params["crop"][:, 0, None] + torch.arange(h, device=device) if p else \
            torch.arange(h, device=device).expand(n, h)
        cols = params["crop"][:, 1, None] + xs if p else xs
        where = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        return padded.reshape(n, c, -1).gather(2, where).view(n, c, h, w)

    def _erase(self, out: torch.Tensor, erase: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """timm's erasing, mode pixel: the rectangle's pixels become normal noise, each erased
        sample's from its own window of the noise table."""
        if not bool(erase[:, 0].any()):
            return out
        chosen = erase[:, 0].nonzero().squeeze(1)  # the erased samples only
        rectangles, keys = erase.index_select(0, chosen)[:, 1:], key.index_select(0, chosen)
        if out.device.type == "cpu":
            return erase_by_copies(out, chosen, rectangles, keys)
        return erase_by_mask(out, chosen, rectangles, keys)


def erase_by_mask(out: torch.Tensor, chosen: torch.Tensor, rectangles: torch.Tensor, keys: torch.Tensor):
    """Erasing on CUDA: the chosen samples' noise windows blended in under one mask, a dozen
    kernels whatever the batch (a copy a rectangle would be a launch a sample)."""
    _, c, h, w = out.shape
    device = out.device
    top, left, eh, ew = rectangles[:, :, None].unbind(1)
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    inside = ((ys >= top) & (ys < top + eh))[:, None, :, None] & ((xs >= left) & (xs < left + ew))[:, None, None, :]
    # each window copied whole from the table's sliding view (index_select: a copy a row), and
    # blended in with one where: cheaper than computing each erased pixel's table position
    noise = _noise_windows(keys, c * h * w).view(-1, c, h, w)
    erased = out.index_select(0, chosen)
    return out.index_copy_(0, chosen, torch.where(inside, noise, erased, out=erased))


def erase_by_copies(out: torch.Tensor, chosen: torch.Tensor, rectangles: torch.Tensor, keys: torch.Tensor):
    """Erasing on the CPU: each rectangle copied from the same place in its sample's noise window,
    a strided view of each (the same values as erase_by_mask). It touches only the erased pixels:
    3.2 against 6.8 us a sample for the mask (32 px, batch 128, p 0.5, one core)."""
    _, c, h, w = out.shape
    length = c * h * w
    table, offsets = _noise_offsets(keys, length)
    pixels, noise = out.view(-1), table.view(-1)  # out: contiguous (the normalised copy)
    # as_strided's offsets count from the start of the storage, which a view may not start at
    first_pixel, first_noise = pixels.storage_offset(), noise.storage_offset()
    for i, (top, left, eh, ew), start in zip(chosen.tolist(), rectangles.tolist(), offsets.tolist()):
        corner = top * w + left
        pixels.as_strided((c, eh, ew), (h * w, w, 1), first_pixel + i * length + corner).copy_(
            noise.as_strided((c, eh, ew), (h * w, w, 1), first_noise + start + corner))
    return out


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each sample's (top, left, h, w) box resized to size x size, bilinear, as torchvision's
    resized_crop. A box no larger than the output (always so when the images are the output's size)
    is sampled with one grid_sample at the coordinates interpolate uses (align_corners=False, clamped
    to the box); antialiasing changes nothing there. A larger box needs the antialiased filter:
    torchvision's, per sample."""
    from torchvision.transforms.v2 import functional as F

    n, c = images.shape[:2]
    device = images.device
    out = torch.empty((n, c, size, size), dtype=images.dtype, device=device)
    boxes = boxes.to(device)
    upscaled = (boxes[:, 2] <= size) & (boxes[:, 3] <= size)
    for i in (~upscaled).nonzero().flatten().tolist():
        top, left, h, w = (int(v) for v in boxes[i])
        out[i] = F.resized_crop(images[i], top, left, h, w, [size, size], antialias=True,
                                interpolation=F.InterpolationMode.BILINEAR)
    chosen = upscaled.nonzero().flatten()
    if len(chosen):
        box = boxes[chosen].to(torch.float32)
        top, left, h, w = (box[:, k, None] for k in range(4))
        steps = torch.arange(size, device=device, dtype=torch.float32) + 0.5
        # interpolate's source coordinate, inside the box (torch clamps it at 0 and at the last pixel)
        ys = top + ((steps * (h / size)) - 0.5).clamp(min=0).minimum(h - 1)
        xs = left + ((steps * (w / size)) - 0.5).clamp(min=0).minimum(w - 1)
        height, width = images.shape[-2:]
        grid = torch.stack([((xs + 0.5) / width * 2 - 1)[:, None, :].expand(-1, size, size),
                            ((ys + 0.5) / height * 2 - 1)[:, :, None].expand(-1, size, size)], -1)
        sampled = torch.nn.functional.grid_sample(images[chosen].to(torch.float32), grid, mode="bilinear",
                                                  padding_mode="border", align_corners=False)
        out[chosen] = sampled.round_().clamp_(0, 255).to(images.dtype)
    return out


def rotations(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RandomRotation (nearest, about the centre, fill 0) with each sample's angle, as rotate_image:
    angle % 360, and the inverse matrix of -angle (its rotate/affine sign convention)."""
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

    from launcher.data.augment_policy import affine_maps

    matrices = [_get_inverse_affine_matrix([0.0, 0.0], -(float(a) % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
                for a in angles.tolist()]
    # fill 0 without torchvision's mask channel: nearest sampling with zero padding gives 0 there already
    return affine_maps(images, matrices, fill=None)


def color_jitter(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """ColorJitter's brightness, contrast and saturation on uint8 images, each sample with its own
    order and factors (draws: (N, 6), see BatchAugment._jitter_draws): torchvision's kernels'
    arithmetic with a factor per sample, equal to them bit for bit."""
    draws = draws.to(images.device)
    factors = draws[:, 3:]  # float64, as the Python floats torchvision takes
    adjusts = (_brightness, _contrast, _saturation)
    orders = draws[:, :3].long()
    out = images.clone()
    # the samples with the same order together: one gather, three ops, one write-back a group
    for order in torch.unique(orders, dim=0).tolist():
        chosen = (orders == torch.tensor(order, device=images.device)).all(1).nonzero().flatten()
        group = images[chosen]
        for which in order:
            group = adjusts[which](group, factors[chosen, which].view(-1, 1, 1, 1))
        out[chosen] = group
    return out


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend (image * r + other * (1 - r), clamped, truncated to uint8) with r per
    sample: r and 1 - r rounded to float32 from double as its scalars are, and addcmul for its
    add_(alpha=), which rounds the same way."""
    ratio, alpha = factor.to(torch.float32), (1.0 - factor).to(torch.float32)
    # uint8 converted first: the same values, and a mixed-dtype product is several times slower
    return images.to(torch.float32).mul_(ratio).addcmul_(other, alpha).clamp_(0, 255).to(images.dtype)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32).mul_(factor.to(torch.float32)).clamp_(0, 255).to(images.dtype)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb_to_grayscale_image (floored, float) of 3-channel uint8 images."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    grey = _grey(images) if images.shape[1] == 3 else images.to(torch.float32)
    return _blend(images, grey.mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images if images.shape[1] == 1 else _blend(images, _grey(images), factor)  # grey: unchanged, as PIL


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors holding values below
    2**33; every product stays below 2**63, so CPU and CUDA compute the same bits."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


# The erasing noise: each sample reads a window of one fixed table of normals, starting at an offset
# hashed from its key (a copy), rather than hashing every erased pixel (3x the cost of the crop,
# flip and erasing together). Windows of two samples overlap with a chance of about 2 x 3072 / 2**20
# at 32 px; the values stay standard normal and independent of the batch.
_NOISE_SIZE = 1 << 20
_noise_tables: dict = {}


def _noise_table(device) -> torch.Tensor:
    """2**20 standard normals, the same bits on every machine (Box-Muller on hashed 24-bit
    uniforms of the table positions, computed on the CPU once), kept on each device used."""
    table = _noise_tables.get(str(device))
    if table is None:
        if "cpu" not in _noise_tables:
            _noise_tables["cpu"] = _normals(_hash32(torch.tensor(0x5EED5)), torch.arange(_NOISE_SIZE))
        table = _noise_tables[str(device)] = _noise_tables["cpu"].to(device)
    return table


def _noise_offsets(keys: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise table (repeated for an image larger than it) and where each key's window of
    length values starts in it, hashed from the key."""
    table = _noise_table(keys.device)
    if length > _NOISE_SIZE:
        table = table.repeat(-(-length // _NOISE_SIZE) + 1)
    return table, _hash32(keys & _M32) % (min(_NOISE_SIZE, len(table) - length) + 1)


def _noise_windows(keys: torch.Tensor, length: int) -> torch.Tensor:
    """(len(keys), length): each key's window of the table."""
    table, offsets = _noise_offsets(keys, length)
    return table.unfold(0, length, 1).index_select(0, offsets)


def _normals(hashed_keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    u1 = ((_hash32(hashed_keys ^ (2 * positions)) >> 8) + 1).float() * (1.0 / (1 << 24))  # (0, 1]
    u2 = (_hash32(hashed_keys ^ (2 * positions + 1)) >> 8).float() * (1.0 / (1 << 24))  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def pixel_normals(keys: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """(len(keys), c, h, w): each sample's erasing noise at every position, as _erase reads it."""
    return _noise_windows(keys, c * h * w).view(len(keys), c, h, w)


def augment_path(data) -> tuple[str, str]:
    """Where the recipe's training augmentation runs ("device" or "loader") and why, for the run
    and for --check. data.augment_on: device is refused at load when an op has no batched form."""
    ops = "augmentation and normalisation on the whole batch"
    if data._augment_reason:  # chosen by data.augment_on: auto
        where = ops if data.augment_on == "device" else "per sample in the loader workers"
        return data.augment_on, f"{where} (data.augment_on: auto, {data._augment_reason})"
    if data.augment_on == "device":
        return "device", f"data.augment_on: device ({ops})"
    return "loader", "per sample in the loader workers (data.augment_on: loader)"
