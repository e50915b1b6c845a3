"""torchvision's augmentation policies (AutoAugment cifar10/imagenet/svhn, RandAugment,
TrivialAugmentWide) on whole batches, each sample with its own draws.

A policy applies to each image one or two ops, each a (name, magnitude) pair out of a small set
(AutoAugment's 25 sub-policies with fixed magnitudes and a random sign; RandAugment's 14 ops at one
magnitude; TrivialAugment's 14 ops x 31 magnitudes). So the samples that drew the same pair go
through torchvision's own op together, as one batch: the output equals the per-sample policy's bit
for bit given the same draws, and a batch of 128 takes a few dozen op calls instead of 128 x 2.

The draws follow torchvision's forward() (which samples the policy or op, whether it applies,
its sign and magnitude bin) with each sample's own uniforms in place of torch's global RNG.
Written by hand because torchvision and Kornia draw one op for a whole batch, or from one
generator for the batch, which would tie a sample's augmentation to the batch it lands in.
"""

from __future__ import annotations

import math

import numpy as np

from launcher.lazy import lazy

torch = lazy("torch")

# data.augment.auto_augment values with a batched form (timm's strings stay on the loader: its ops
# work on PIL images)
POLICIES = ("cifar10", "imagenet", "svhn", "randaugment", "trivialaugment")
STEPS = 2  # ops a sample goes through at most (AutoAugment's sub-policy pairs, RandAugment's num_ops)


class BatchPolicy:
    def __init__(self, name: str):
        from torchvision.transforms import v2

        self.name = name
        if name in ("cifar10", "imagenet", "svhn"):
            self.transform = v2.AutoAugment(v2.AutoAugmentPolicy(name))
        elif name == "randaugment":
            self.transform = v2.RandAugment()
            assert self.transform.num_ops == STEPS
        else:
            self.transform = v2.TrivialAugmentWide()
        self.ops = list(self.transform._AUGMENTATION_SPACE)

    @staticmethod
    def batched(name) -> bool:
        return name in POLICIES

    def params(self, u: np.ndarray, height: int, width: int) -> dict:
        """policy_op (N, 2): index into self.ops, -1 where the step does nothing; policy_magnitude
        (N, 2): the float torchvision passes to the op. u: (N, 8) uniforms, 4 a step: the choice,
        whether it applies, its sign, its magnitude bin."""
        n = len(u)
        op = np.full((n, STEPS), -1, dtype=np.int64)
        magnitude = np.zeros((n, STEPS), dtype=np.float64)
        bins = getattr(self.transform, "num_magnitude_bins", 10)  # AutoAugment's forward() uses 10
        tables = {}
        for name, (magnitudes_fn, _) in self.transform._AUGMENTATION_SPACE.items():
            values = magnitudes_fn(bins, height, width)
            tables[name] = None if values is None else [float(v) for v in values]
        for step in range(STEPS):
            choice, applies, sign, bin_draw = (u[:, 4 * step + k] for k in range(4))
            if self.name in ("cifar10", "imagenet", "svhn"):
                policies = self.transform._policies
                # one sub-policy per sample (drawn with step 0's choice), its step-th op
                picked = [policies[i][step] for i in np.floor(u[:, 0] * len(policies)).astype(np.int64)]
                names = [name for name, _, _ in picked]
                on = applies <= np.array([p for _, p, _ in picked])  # forward(): skipped unless rand <= p
                bin_of = [b for _, _, b in picked]
            else:
                if self.name == "trivialaugment" and step > 0:
                    break  # one op
                names = [self.ops[i] for i in np.floor(choice * len(self.ops)).astype(np.int64)]
                on = np.ones(n, dtype=bool)
                bin_of = np.floor(bin_draw * bins).astype(np.int64) if self.name == "trivialaugment" \
                    else [self.transform.magnitude] * n
            for i in np.flatnonzero(on):
                values = tables[names[i]]
                value = 0.0 if values is None else values[bin_of[i]]
                if values is not None and self.transform._AUGMENTATION_SPACE[names[i]][1] and sign[i] <= 0.5:
                    value = -value
                op[i, step], magnitude[i, step] = self.ops.index(names[i]), value
        return {"policy_op": torch.from_numpy(op), "policy_magnitude": torch.from_numpy(magnitude)}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """uint8 (N, C, H, W). In each step the samples whose op is a shear, translation or rotation
        go through one affine grid transform, each with the matrix torchvision's op would use; the
        others are grouped by (op, magnitude), each group through torchvision's op at once."""
        for step in range(STEPS):
            ops, magnitudes = params["policy_op"][:, step].tolist(), params["policy_magnitude"][:, step].tolist()
            groups: dict[tuple[int, float], list[int]] = {}
            affine_rows, matrices = [], []
            for i, (op, value) in enumerate(zip(ops, magnitudes)):
                matrix = self._affine_matrix(self.ops[op], value, images.shape[-2:]) if op >= 0 else None
                if matrix is not None:
                    affine_rows.append(i)
                    matrices.append(matrix)
                elif op >= 0:
                    groups.setdefault((op, value), []).append(i)
            if not groups and not affine_rows:
                continue
            out = images.clone()
            if affine_rows:
                chosen = torch.tensor(affine_rows, device=images.device)
                out[chosen] = affine_maps(images[chosen], matrices, fill=None)  # the policies' fill: None
            for (op, value), rows in groups.items():
                chosen = torch.tensor(rows, device=images.device)
                out[chosen] = self.transform._apply_image_or_video_transform(
                    images[chosen], self.ops[op], value, interpolation=self.transform.interpolation,
                    fill=self.transform._fill)
            images = out
        return images

    @staticmethod
    def _affine_matrix(op: str, magnitude: float, size) -> list[float] | None:
        """The inverse affine matrix torchvision's _apply_image_or_video_transform uses for a
        geometric op (its F.affine / F.rotate arguments), None for the other ops and for the
        rotations rotate_image does without a grid (multiples of 90 degrees)."""
        from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

        height, width = size
        corner = [0.0 - width * 0.5, 0.0 - height * 0.5]  # center=[0, 0] in F.affine's coordinates
        if op == "ShearX":
            return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, [math.degrees(math.atan(magnitude)), 0.0])
        if op == "ShearY":
            return _get_inverse_affine_matrix(corner, 0.0, [0.0, 0.0], 1.0, [0.0, math.degrees(math.atan(magnitude))])
        if op == "TranslateX":
            return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(magnitude)), 0.0], 1.0, [0.0, 0.0])
        if op == "TranslateY":
            return _get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(magnitude))], 1.0, [0.0, 0.0])
        if op == "Rotate" and magnitude % 90 != 0:
            return _get_inverse_affine_matrix([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
        return None


def affine_maps(images: torch.Tensor, matrices: list[list[float]], fill) -> torch.Tensor:
    """Each sample through its own inverse affine matrix (torchvision's _get_inverse_affine_matrix),
    nearest: torchvision's affine grid and grid transform with one matrix per sample instead of one
    a call (its kernels take one), so equal to its per-sample rotate/affine bit for bit."""
    from torchvision.transforms.v2.functional._geometry import _apply_grid_transform

    n, _, h, w = images.shape
    device = images.device
    theta = torch.tensor(matrices, dtype=torch.float32, device=device).reshape(n, 2, 3)
    # torchvision's _affine_grid, batched: the same base grid times each sample's rescaled matrix
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=device))
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(rescaled).view(n, h, w, 2)
    return _apply_grid_transform(images, grid, "nearest", fill=fill)
