"""Where the shard writer's images come from: each source as arrays (or, for an image folder, as
files), checked so that they can only mean one thing (counts, dtypes, label ranges) before
anything is written. The CIFAR python version is read with an unpickler that runs nothing.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.errors import LauncherError


def digits_arrays(seed: int = 0):
    """scikit-learn's bundled digits (1,797 real 8x8 scans), stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    x_train, x_val, y_train, y_val = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    return x_train, y_train, x_val, y_val, [str(i) for i in range(10)]


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR "python version" is a set of pickles, and a pickle may run any code it names
    while loading. The published files hold dicts of bytes, lists of ints and numpy arrays, so
    only what numpy needs to rebuild an array may be named; anything else stops the load before
    it runs. Written here: neither pickle nor numpy offers such a loader."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")} | {
        (module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks to call {module}.{name} while loading, which a CIFAR file never "
                                     "does (only numpy arrays, bytes and lists)")


def load_cifar_pickle(path: Path) -> dict:
    """One file of the CIFAR python version, read without running anything it names."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError) as err:
        raise LauncherError(f"'{path}' is not a readable CIFAR batch file ({err or type(err).__name__}): it is "
                            "truncated, damaged or not from the CIFAR python version; download the data set again "
                            "(cifar-10-python.tar.gz / cifar-100-python.tar.gz) and extract it") from None
    if not isinstance(d, dict):
        raise LauncherError(f"'{path}' is not a CIFAR batch file (it holds a {type(d).__name__}, not a dict); "
                            "--src must be the extracted cifar-10-batches-py or cifar-100-python folder")
    return d


def cifar_arrays(src: Path, fine: bool):
    num_classes = 100 if fine else 10

    def load(name):
        path = src / name
        if not path.is_file():
            raise LauncherError(f"'{path}' not found: --src must be the extracted cifar-{'100-python' if fine else '10-batches-py'} folder")
        d = load_cifar_pickle(path)
        label_key = b"fine_labels" if fine else b"labels"
        missing = [k.decode() for k in (b"data", label_key) if k not in d]
        if missing:
            raise LauncherError(f"'{path}' lacks {missing} (keys: {sorted(k.decode('latin-1') if isinstance(k, bytes) else str(k) for k in d)}): "
                                f"is it a batch of {'CIFAR-10' if fine else 'CIFAR-100'} rather than "
                                f"{'CIFAR-100' if fine else 'CIFAR-10'}?")
        data = d[b"data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", None)
            raise LauncherError(f"'{path}': its data is {getattr(data, 'dtype', type(data).__name__)} of shape "
                                f"{shape}, not CIFAR's uint8 rows of 3072 values (3 x 32 x 32); the file is damaged")
        x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return checked_split(x, d[label_key], f"'{path}'", num_classes=num_classes, what="CIFAR")

    if fine:
        (x_train, y_train), (x_val, y_val) = load("train"), load("test")
        meta = src / "meta"
        key = b"fine_label_names"
    else:
        parts = [load(f"data_batch_{i}") for i in range(1, 6)]
        x_train, y_train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        x_val, y_val = load("test_batch")
        meta = src / "batches.meta"
        key = b"label_names"
    classes = [str(i) for i in range(num_classes)]
    if meta.is_file():
        names = load_cifar_pickle(meta).get(key)
        if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(c, bytes) for c in names):
            raise LauncherError(f"'{meta}' does not hold {num_classes} class names under {key.decode()}: the file is "
                                "damaged or from the other CIFAR")
        classes = [c.decode("utf-8", "replace") for c in names]
    return x_train, y_train, x_val, y_val, classes


def checked_split(x, y, where: str, num_classes: Optional[int] = None, what: str = "the"):
    """(images, labels) of one split, refused unless they can only mean one thing: uint8 images
    N x H x W or N x H x W x C (C 1 or 3, channels last), one integer class per image, as many
    labels as images, inside [0, num_classes)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8:
        raise LauncherError(f"{where}: the images are {x.dtype}, not uint8 pixels (0-255). Convert them, e.g. "
                            "(x * 255).round().astype(np.uint8) for floats in [0, 1]")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)) or 0 in x.shape[1:]:
        raise LauncherError(f"{where}: the images have shape {x.shape}; give N x H x W (grey) or N x H x W x C with "
                            "C = 1 or 3 channels last (from N x C x H x W: x.transpose(0, 2, 3, 1))")
    if y.ndim != 1:
        raise LauncherError(f"{where}: the labels have shape {y.shape}; give one class number per image (a 1-D "
                            "array; from one-hot rows: y.argmax(1))")
    if len(x) != len(y):
        raise LauncherError(f"{where}: {len(x)} images but {len(y)} labels; give one label per image")
    if len(y) == 0:
        raise LauncherError(f"{where}: no images")
    if y.dtype.kind == "f":
        fractional = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(fractional):
            raise LauncherError(f"{where}: label {float(y[fractional[0]])} (image {fractional[0]}) is not a class number; "
                                "labels must be integers 0, 1, 2, ...")
    elif y.dtype.kind not in "iu":
        raise LauncherError(f"{where}: the labels are {y.dtype}, not integers; labels must be class numbers 0, 1, "
                            "2, ...")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise LauncherError(f"{where}: label {y.min()} (image {int(np.argmin(y))}) is negative; labels are class "
                            "numbers 0, 1, 2, ...")
    if num_classes is not None and y.max() >= num_classes:
        raise LauncherError(f"{where}: label {y.max()} (image {int(np.argmax(y))}) is outside {what} {num_classes} "
                            f"classes (0-{num_classes - 1}): the file is damaged or from another data set")
    return x, y


# The MNIST family is published as IDX files (big-endian header, then uint8 data), under the same
# four names for all three data sets; the 10k test set becomes the val split.
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
IDX_CLASSES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "mnist": [str(i) for i in range(10)],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],  # Kuzushiji-MNIST's hiragana, romanised
}
# The largest IDX data a source may hold (EMNIST, the largest of the family, is about 700 MB):
# a header promising more is damage, refused before anything is read.
IDX_MAX_BYTES = 8 << 30
# Where Debian's packages put them (apt-get install dataset-fashion-mnist).
IDX_DEFAULT_SRC = {name: Path("/usr/share/datasets") / name for name in IDX_CLASSES}


def read_idx(src: Path, stem: str, magic: int) -> np.ndarray:
    """One IDX file (`stem` or `stem.gz` in src) as a uint8 array: (n, rows, cols) or (n,).

    The header is read first and checked (no zero dimension, a size a data set can have), then
    the data is read in chunks up to what the header promises, so a damaged or hostile gzip file
    is refused after reading at most that much, never decompressed whole."""
    import gzip
    import zlib

    candidates = [src / f"{stem}.gz", src / stem]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise LauncherError(f"'{src}' has no {stem}.gz (or {stem}): --src must be the folder holding the four IDX "
                            "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)")
    dims = 3 if magic == IDX_IMAGES_MAGIC else 1
    what = "images" if dims == 3 else "labels"
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            header = f.read(4 + 4 * dims)
            if len(header) < 4 + 4 * dims or int.from_bytes(header[:4], "big") != magic:
                found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
                raise LauncherError(f"'{path}' is not an IDX {what} file: its magic number is {found}, expected "
                                    f"{magic} (is it the {'labels' if dims == 3 else 'images'} file, or not IDX at "
                                    "all?)")
            shape = tuple(int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
            expected = math.prod(shape)  # Python ints: a header of (2**31, 2**31, 4) does not wrap around
            if 0 in shape or expected > IDX_MAX_BYTES:
                raise LauncherError(f"'{path}' has the header {shape}, which no {what} file of this family has "
                                    f"({'a dimension of 0' if 0 in shape else f'{expected:,} bytes of data'}): the "
                                    "file is damaged; download it again")
            data = bytearray()
            while len(data) < expected:
                chunk = f.read(min(1 << 24, expected - len(data)))
                if not chunk:
                    break
                data += chunk
            trailing = len(f.read(1 << 16))
    except (OSError, EOFError, zlib.error) as err:
        raise LauncherError(f"'{path}' is not a readable gzip file ({err}): it is truncated or damaged; download it "
                            "again") from None
    if len(data) != expected or trailing:
        held = f"{len(data)}" if not trailing else f"more than {expected}"
        raise LauncherError(f"'{path}' holds {held} bytes of data where its header {shape} promises {expected}: the "
                            "file is truncated or damaged; download it again")
    return np.frombuffer(bytes(data), dtype=np.uint8).reshape(shape)


def idx_arrays(src: Path, name: str):
    """Fashion-MNIST / MNIST / KMNIST from their IDX files: the 60k train, the 10k test set as val."""
    if not src.is_dir():
        raise LauncherError(f"'{src}' is not a folder: --src must be the folder holding {name}'s IDX files")
    classes = IDX_CLASSES[name]
    arrays = []
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images = read_idx(src, images_stem, IDX_IMAGES_MAGIC)
        labels = read_idx(src, labels_stem, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise LauncherError(f"'{src}': {images_stem} holds {len(images)} images but {labels_stem} "
                                f"{len(labels)} labels; the files are from different data sets or damaged")
        if len(labels) and labels.max() >= len(classes):
            raise LauncherError(f"'{src}/{labels_stem}' has label {int(labels.max())}, outside {name}'s "
                                f"{len(classes)} classes (0-{len(classes) - 1}): is it another data set?")
        arrays += [images[..., None], labels]  # HxWx1: grey images, like the other sources' HxWxC
    return (*arrays, classes)


def npz_arrays(src: Path):
    if not src.is_file():
        raise LauncherError(f"'{src}' not found")
    import zipfile

    with open(src, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise LauncherError(f"'{src}' is not an .npz file (not a zip archive of arrays): save x_train, y_train, "
                                "x_val, y_val with np.savez")
    try:
        with np.load(src, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in z]
            if missing:
                raise LauncherError(f"'{src}' lacks arrays {missing}; it needs x_train, y_train, x_val, y_val")
            x_train, y_train = checked_split(z["x_train"], z["y_train"], f"'{src}' x_train, y_train")
            x_val, y_val = checked_split(z["x_val"], z["y_val"], f"'{src}' x_val, y_val")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise LauncherError(f"'{src}' is not a readable .npz of numeric arrays ({err}): save x_train, y_train, "
                            "x_val, y_val with np.savez (object arrays are not read: they may run code)") from None
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    return x_train, y_train, x_val, y_val, [str(i) for i in range(num_classes)]


def synthetic_arrays(num_classes: int, n_train: int, n_val: int, size: int, seed: int):
    """Random CIFAR-shaped images whose class shows as a colour bias (learnable, for tests)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(num_classes, 3))

    def make(n):
        y = rng.integers(0, num_classes, size=n)
        noise = rng.normal(0, 40, size=(n, size, size, 3))
        x = np.clip(palette[y][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return x, y

    (x_train, y_train), (x_val, y_val) = make(n_train), make(n_val)
    return x_train, y_train, x_val, y_val, [str(i) for i in range(num_classes)]


IMAGE_FILE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".bmp": "bmp", ".ppm": "ppm"}


def imagefolder_items(src: Path, fmt: str, seed: int, val_fraction: float, out: Optional[Path] = None):
    """DIR/<class>/<image> (split stratified), or DIR/train/<class>/... and DIR/val/<class>/..."""
    if not src.is_dir():
        raise LauncherError(f"'{src}' is not a folder")
    if out is not None and (out.resolve() == src.resolve() or src.resolve() in out.resolve().parents):
        raise LauncherError(f"--out '{out}' is inside --src '{src}': its folder would be read as a class of images "
                            "the next time, shifting every label after it. Write the shards outside the image folder.")

    def scan(root: Path):
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir())
                 if f.suffix.lower() in IMAGE_FILE_EXTS]
        return classes, files

    if (src / "train").is_dir() and (src / "val").is_dir():
        classes, train = scan(src / "train")
        val_classes, val = scan(src / "val")
        if val_classes != classes:
            raise LauncherError(f"train/ and val/ in '{src}' have different class folders")
    else:
        from sklearn.model_selection import train_test_split

        classes, files = scan(src)
        if not files:
            raise LauncherError(f"'{src}' holds no images in class sub-folders (DIR/<class>/<image>)")
        train, val = train_test_split(files, test_size=val_fraction, random_state=seed,
                                      stratify=[c for _, c in files])

    def items(files):
        for path, label in files:
            if fmt == "keep":
                yield (IMAGE_FILE_EXTS[path.suffix.lower()], path.read_bytes()), label
            else:
                from PIL import Image, UnidentifiedImageError

                try:
                    with Image.open(path) as img:
                        pixels = np.asarray(img.convert("RGB"))
                except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
                    raise LauncherError(f"'{path}' is not a readable image ({err}); remove or replace it, or use "
                                        "--format keep to copy the files as they are") from None
                yield pixels, label

    return items(train), items(val), classes
