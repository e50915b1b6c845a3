"""Augmentation of whole batches where they land (data.augment_on: device).

For 32-pixel images the per-sample transforms in the loader workers cost more than the model
(Fashion-MNIST, wrn10_2, one CPU process: 379 us a sample for crop + flip, against 10 us as
batched tensor ops). So for the ops below the loader only decodes, and the batch, still uint8,
is augmented and normalised on the training device in a few tensor operations:

    crop_padding     zero padding, then a crop at each sample's own offsets (torchvision's RandomCrop)
    hflip            each sample flipped with probability p (RandomHorizontalFlip)
    random_erasing   timm's RandomErasing (mode pixel: per-pixel normal noise, area 2%-1/3,
                     aspect 0.3-3.3, 10 attempts), on the normalised image

Same guarantees as the per-sample path: every random parameter of a sample comes from that
sample's own key, a hash of (seed, epoch, sample id), never from a shared RNG stream, so a
batch does not depend on the rank count, the worker count, or where a resumed run starts.
The parameters are drawn in the loader (numpy, a few microseconds a batch) and travel with the
batch; the erasing noise is drawn on the device from the sample's key and each pixel's position.
Given the same parameters, the output equals torchvision's and timm's per-sample ops bit for bit
(tests/test_augment.py). The draws themselves differ from the per-sample path's (which uses
torch's and Python's RNGs seeded per sample), so a run cannot switch paths mid-run and give the
same batches.

Written by hand: Kornia and torchvision v2 apply crops, flips and erasing to batches, but draw
their parameters from one global generator per batch, which ties each sample's augmentation to
the batch it lands in (and so to the number of processes); the ops themselves are index
arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from launcher.lazy import lazy

torch = lazy("torch")  # --check asks augment_path without paying for torch

# The ops with a batched form; any other data.augment op keeps the per-sample path.
BATCHED_OPS = ("crop_padding", "hflip", "random_erasing")

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


def uniforms(keys: np.ndarray, draws: int) -> np.ndarray:
    """(N, draws) independent uniforms in [0, 1), float64, the j-th a hash of (key, j)."""
    with np.errstate(over="ignore"):
        counters = np.arange(1, draws + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        bits = _splitmix(keys[:, None] ^ counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


ERASE_ATTEMPTS = 10


class BatchAugment:
    """The recipe's batched ops: params() in the loader, apply() on the device."""

    def __init__(self, augment, image_size: int, mean: list[float], std: list[float],
                 erase_area: tuple[float, float] = (0.02, 1 / 3), erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)):
        self.padding = augment.crop_padding
        self.flip = augment.hflip
        self.erase = augment.random_erasing
        self.size = image_size
        self.mean, self.std = list(mean), list(std)
        self.erase_area = erase_area
        self.log_aspect = (math.log(erase_aspect[0]), math.log(erase_aspect[1]))

    @staticmethod
    def unbatched_ops(augment) -> list[str]:
        """The recipe's data.augment ops that have no batched form (they need the loader)."""
        defaults = type(augment)()
        return [name for name in type(augment).model_fields
                if name not in BATCHED_OPS and name not in ("scale", "ratio")
                and getattr(augment, name) != getattr(defaults, name)]

    # ------------------------------------------------------------ in the loader

    def params(self, keys: np.ndarray, height: int, width: int) -> dict[str, torch.Tensor]:
        """Each sample's parameters (small int64 tensors) from its key."""
        n = len(keys)
        # The j-th draw does not depend on how many are drawn: without erasing, only the first three.
        u = uniforms(keys, 4 + 4 * ERASE_ATTEMPTS if self.erase else 3)
        span = 2 * self.padding + 1
        top, left = np.floor(u[:, 0] * span), np.floor(u[:, 1] * span)
        flip = u[:, 2] < self.flip
        erase = np.zeros((n, 5), dtype=np.int64)  # on, top, left, h, w
        if self.erase:
            # timm's: of 10 attempts, the first whose rectangle fits is used (all drawn at once here).
            attempts = u[:, 4:].reshape(n, ERASE_ATTEMPTS, 4)
            area = height * width
            target = (self.erase_area[0] + (self.erase_area[1] - self.erase_area[0]) * attempts[..., 0]) * area
            aspect = np.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * attempts[..., 1])
            h, w = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
            fits = (w < width) & (h < height)
            first = fits.argmax(1)  # the first fitting attempt (0 when none fits: then `on` is False)
            rows = np.arange(n)
            on = (u[:, 3] < self.erase) & fits[rows, first]
            h, w, c, d = h[rows, first], w[rows, first], attempts[rows, first, 2], attempts[rows, first, 3]
            erase[:, 0] = on
            erase[:, 1] = np.where(on, np.floor(c * (height - h + 1)), 0)
            erase[:, 2] = np.where(on, np.floor(d * (width - w + 1)), 0)
            erase[:, 3], erase[:, 4] = np.where(on, h, 0), np.where(on, w, 0)
        return {"crop": torch.from_numpy(np.stack([top, left], 1).astype(np.int64)),
                "flip": torch.from_numpy(flip), "erase": torch.from_numpy(erase),
                "key": torch.from_numpy((keys >> np.uint64(33)).astype(np.int64))}  # 31 bits: noise seed

    # ------------------------------------------------------------ on the device

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (N, C, H, W) on the device -> augmented, normalised float32 batch."""
        n, c, h, w = images.shape
        device = images.device
        nhwc = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        if self.padding or self.flip:
            # Crop and flip in one gather: each output pixel's position in the padded image.
            p = self.padding
            padded = torch.nn.functional.pad(images, (p,) * 4) if p else images.contiguous()
            xs = torch.arange(w, device=device).expand(n, w)
            if self.flip:
                xs = torch.where(params["flip"][:, None], w - 1 - xs, xs)
            rows = params["crop"][:, 0, None] + torch.arange(h, device=device) if p else \
                torch.arange(h, device=device).expand(n, h)
            cols = params["crop"][:, 1, None] + xs if p else xs
            where = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
            images = padded.reshape(n, c, -1).gather(2, where).view(n, c, h, w)
        from torchvision.transforms.v2 import functional as F

        out = F.normalize(F.to_dtype(images.contiguous(), torch.float32, scale=True), self.mean, self.std)
        if self.erase:
            out = self._erase(out, params["erase"], params["key"])
        return out.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)

    def _erase(self, out: torch.Tensor, erase: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """timm's erasing, mode pixel: the rectangle's pixels become normal noise (drawn only there)."""
        if not bool(erase[:, 0].any()):
            return out
        n, c, h, w = out.shape
        device = out.device
        chosen = erase[:, 0].nonzero().squeeze(1)  # the erased samples only
        top, left, eh, ew = (erase[chosen, k, None] for k in range(1, 5))
        ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
        inside = ((ys >= top) & (ys < top + eh))[:, :, None] & ((xs >= left) & (xs < left + ew))[:, None, :]
        which, pixel = inside.view(len(chosen), -1).nonzero(as_tuple=True)
        # (C, pixels): every channel of each erased pixel, broadcast rather than repeated.
        position = torch.arange(c, device=device)[:, None] * (h * w) + pixel
        hashed = _hash32(key[chosen] & _M32)[which]  # each sample's key hashed once, not once a pixel
        out = out.contiguous()  # fresh from normalize: written in place
        # scatter_, not index assignment: the positions are distinct, and it is 6x faster on the CPU.
        out.view(-1).scatter_(0, (chosen[which] * (c * h * w) + position).view(-1),
                              _normals(hashed, position).view(-1))
        return out


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors holding values below
    2**33; every product stays below 2**63, so CPU and CUDA compute the same bits."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def normals_at(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Standard normal values, each a function of its sample's key and its position (c*H*W + y*W
    + x) only: Box-Muller on two hashed 24-bit uniforms, in float32."""
    return _normals(_hash32(keys & _M32), positions)


def _normals(hashed_keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    u1 = ((_hash32(hashed_keys ^ (2 * positions)) >> 8) + 1).float() * (1.0 / (1 << 24))  # (0, 1]
    u2 = (_hash32(hashed_keys ^ (2 * positions + 1)) >> 8).float() * (1.0 / (1 << 24))  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def pixel_normals(keys: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """(len(keys), c, h, w): normals_at for every position of each sample."""
    positions = torch.arange(c * h * w, device=keys.device, dtype=torch.int64)
    return normals_at(keys[:, None].expand(len(keys), len(positions)), positions.expand(len(keys), -1)).view(
        len(keys), c, h, w)


def augment_path(data) -> tuple[str, str]:
    """Where the recipe's training augmentation runs ("device" or "loader") and why, for the run
    and for --check. data.augment_on: device is refused at load when an op has no batched form."""
    ops = "crop, flip, erasing and normalisation on the whole batch"
    if data._augment_reason:  # chosen by data.augment_on: auto
        where = ops if data.augment_on == "device" else "per sample in the loader workers"
        return data.augment_on, f"{where} (data.augment_on: auto, {data._augment_reason})"
    if data.augment_on == "device":
        return "device", f"data.augment_on: device ({ops})"
    return "loader", "per sample in the loader workers (data.augment_on: loader)"
