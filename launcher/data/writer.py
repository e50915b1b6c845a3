"""Write WebDataset train/val shards from common sources.

    python -m launcher.shards digits --out data/digits
    python -m launcher.shards cifar100 --src DIR/cifar-100-python --out data/cifar100
    python -m launcher.shards cifar10 --src DIR/cifar-10-batches-py --out data/cifar10
    python -m launcher.shards fashion-mnist --src DIR --out data/fashion-mnist   # also mnist, kmnist (IDX files)
    python -m launcher.shards imagefolder --src DIR --out data/mine
    python -m launcher.shards npz --src arrays.npz --out data/mine   # x_train, y_train, x_val, y_val (uint8 NHWC)
    python -m launcher.shards synthetic --out data/fake --num-classes 100 --train 2048 --val 512
    python -m launcher.shards index 'data/other/train-{000000..000999}.tar'   # shards of other tools

Each sample is `<key>.<npy|png|jpg>` + `<key>.cls`, written by webdataset.ShardWriter, so
the shards are plain WebDataset. `--format raw` stores uint8 arrays as .npy (no decode
cost); png/jpg store encoded images. The output folder gets train-NNNNNN.tar,
val-NNNNNN.tar and info.json (brace patterns, counts, classes), written last, so a folder
with info.json is complete.

Next to each shard goes its index, `<shard>.index.npz` (sample offsets, sizes, extensions,
labels, the shard's size and SHA-256), so that a run starts without scanning the tars
(launcher/data/index_files.py). `index PATTERN` writes the same for existing shards; a
run without them scans once per machine and caches the result. For s3:// shards, `index` also
uploads one object with every shard's index and ETag (`shards-N-HASH.index.npz` in their folder),
which a run reads in one request instead of one index file (and its checks) per shard.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from launcher.data import expand_pattern, index_file_next_to, scan_shard, write_index_file
from launcher.errors import LauncherError, run_command

FORMATS = ("raw", "png", "jpg")


def encode(image: np.ndarray, fmt: str) -> tuple[str, bytes]:
    """uint8 HxW or HxWxC array -> (extension, bytes)."""
    if image.dtype != np.uint8:
        raise LauncherError(f"images must be uint8, got {image.dtype}")
    buf = io.BytesIO()
    if fmt == "raw":
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        return "npy", buf.getvalue()
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if fmt == "png":
        pil.save(buf, format="PNG")
        return "png", buf.getvalue()
    pil.save(buf, format="JPEG", quality=95)
    return "jpg", buf.getvalue()


def write_split(out: Path, split: str, samples: Iterable[tuple[str, bytes, int]], shard_size: int) -> tuple[str, int]:
    """Write (ext, bytes, label) samples as out/split-NNNNNN.tar; return (brace pattern, count)."""
    import webdataset as wds

    count = 0
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for ext, data, label in samples:
            sink.write({"__key__": f"{split}{count:08d}", ext: data, "cls": str(int(label)).encode()})
            count += 1
        shards = sink.shard
    if count == 0:
        raise LauncherError(f"the {split} split is empty")
    return f"{split}-{{000000..{shards - 1:06d}}}.tar", count


def write_dataset(out: Path, train, val, fmt: str, shard_size: int, classes: list[str], source: str,
                  force: bool = False) -> dict:
    """train/val: iterables of (image array or (ext, bytes), label). The data set is written into a
    new folder beside `out` and swapped in when complete, so `out` holds the old data set or the
    new one, never a mix, and a run cut short leaves the old one untouched."""
    check_output_folder(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    old = None
    try:
        info = {"source": source, "format": fmt, "num_classes": len(classes), "classes": classes}
        for split, items in (("train", train), ("val", val)):
            samples = ((*(item if isinstance(item, tuple) else encode(item, fmt)), label) for item, label in items)
            pattern, count = write_split(tmp, split, samples, shard_size)
            info[split] = str(out / pattern)
            info[f"num_{split}"] = count
        for f in sorted(tmp.glob("*.tar")):  # each index computed from the finished file
            write_index_file(scan_shard(f, split_of(f), checksum=True), index_file_next_to(f))
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return info


# What the writer itself puts in its output folder (and its temporary folders from a run cut short).
WRITER_FILES = ("train-*.tar", "val-*.tar", "train-*.tar.index.npz", "val-*.tar.index.npz", "info.json", ".shards-*")


def check_output_folder(out: Path, force: bool) -> None:
    """--out must be a folder the writer may fill: new, empty, or (with --force) a data set the
    writer wrote. A folder holding anything else is never replaced: it may be someone's data."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise LauncherError(f"--out '{out}': '{parent}' is a file, not a folder. Give a folder for the shards.")
        if parent.exists():
            break
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    foreign = [name for name in present if not any(fnmatch.fnmatch(name, pattern) for pattern in WRITER_FILES)]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise LauncherError(f"--out '{out}' holds {', '.join(foreign[:3])}{more}, which this writer did not write; it "
                            "replaces only its own data sets, even with --force. Choose a new or empty folder for "
                            "--out.")
    if not force:
        raise LauncherError(f"--out '{out}' already holds a data set ({len(present)} files, e.g. {present[0]}). Add "
                            "--force to replace it (the new one is written beside it and swapped in whole), or "
                            "choose another folder.")


# ---------------------------------------------------------------- sources


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


def split_of(shard: Path) -> str:
    return shard.name.split("-")[0]


def index_main(argv: list[str]) -> int:
    """`python -m launcher.shards index PATTERN...`: write <shard>.index.npz next to each shard
    (local files, or s3:// objects: each is fetched once, indexed and the index uploaded, then one
    index object for the whole set)."""
    import time

    from launcher.data import is_local
    from launcher.data.index_files import set_index_url, write_set_index
    from launcher.data.remote.store import FetchOptions, Remote, kind, remote_url_of_index

    parser = argparse.ArgumentParser(prog="python -m launcher.shards index",
                                     description="Write each shard's index next to it, so runs start without "
                                                 "scanning the tars.")
    parser.add_argument("patterns", nargs="+", help="shard paths or brace patterns: local files or s3:// URLs")
    parser.add_argument("--no-checksum", action="store_true", help="skip the SHA-256 of each shard (faster; "
                        "downloads are then checked by size only)")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    start, shards, samples = time.perf_counter(), 0, 0
    store = Remote(FetchOptions(s3_endpoint=args.s3_endpoint))
    try:
        for pattern in args.patterns:
            urls = expand_pattern(pattern)
            # For a set of s3:// shards, also one object with every index and each shard's ETag, listed
            # before any is read (a shard replaced meanwhile then mismatches and is indexed on its own).
            set_url = set_index_url(urls) if all(kind(u) == "s3" for u in urls) else None
            listing = store.listing(urls) if set_url else {}
            parts = []
            for url in urls:
                if is_local(url):
                    path = Path(url)
                    if not path.is_file():
                        raise LauncherError(f"shard '{url}' does not exist (pattern '{pattern}').")
                    index = scan_shard(path, pattern, checksum=not args.no_checksum)
                    write_index_file(index, index_file_next_to(path))
                elif kind(url) == "s3":
                    with tempfile.TemporaryDirectory() as tmp:
                        local = Path(tmp) / "shard.tar"
                        store.fetch(url, local, pattern)
                        index = scan_shard(local, url, checksum=not args.no_checksum)
                        write_index_file(index, Path(tmp) / "index.npz")
                        store.upload(Path(tmp) / "index.npz", remote_url_of_index(url))
                else:
                    raise LauncherError(f"'{url}': index files can be written for local shards and s3:// only; for "
                                        "http(s):// shards, index the files where they are served from.")
                shards, samples = shards + 1, samples + len(index["labels"])
                parts.append(index)
            if set_url and all(etag for _, etag in listing.values()):
                with tempfile.TemporaryDirectory() as tmp:
                    write_set_index(urls, parts, [listing[u][1] for u in urls], Path(tmp) / "set.npz")
                    store.upload(Path(tmp) / "set.npz", set_url)
                print(f"{pattern}: one index for the {len(urls)} shards: {set_url}")
    except LauncherError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the index next to the shards ({err}). Runs still work: they index "
              "once per machine into data.cache_dir.", file=sys.stderr)
        return 2
    print(f"indexed {samples} samples in {shards} shards ({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["index"]:
        return index_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m launcher.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", choices=["digits", "cifar10", "cifar100", *IDX_CLASSES, "imagefolder", "npz",
                                           "synthetic"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--src", type=Path, help="input folder or file (cifar10/100, fashion-mnist/mnist/kmnist: the "
                        "IDX files' folder, default Debian's /usr/share/datasets/<name> when it exists; imagefolder, "
                        "npz)")
    parser.add_argument("--format", default=None, choices=FORMATS + ("keep",),
                        help="raw (uint8 .npy, no decode cost; default), png or jpg; keep (imagefolder: copy files)")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    parser.add_argument("--force", action="store_true", help="replace the data set already in --out (written "
                        "beside it, then swapped in whole); a folder holding other files is never replaced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="imagefolder without train/val folders")
    parser.add_argument("--num-classes", type=int, default=100, help="synthetic")
    parser.add_argument("--train", type=int, default=2048, help="synthetic: training samples")
    parser.add_argument("--val", type=int, default=512, help="synthetic: validation samples")
    parser.add_argument("--size", type=int, default=32, help="synthetic: image size")
    args = parser.parse_args(argv)
    fmt = args.format or "raw"
    if fmt == "keep" and args.source != "imagefolder":
        parser.error("--format keep only applies to imagefolder")
    if args.source in IDX_CLASSES and args.src is None and IDX_DEFAULT_SRC[args.source].is_dir():
        args.src = IDX_DEFAULT_SRC[args.source]
    return run_command(lambda: write_command(args, fmt))


def write_command(args, fmt: str) -> int:
    if args.source in ("cifar10", "cifar100", *IDX_CLASSES, "imagefolder", "npz") and args.src is None:
        where = (f" (the folder of its four IDX files; Debian's package puts them in {IDX_DEFAULT_SRC[args.source]}, "
                 "the default when it exists)" if args.source in IDX_CLASSES else "")
        raise LauncherError(f"{args.source} needs --src{where}")
    if args.source == "imagefolder":
        train, val, classes = imagefolder_items(args.src, fmt, args.seed, args.val_fraction, args.out)
        default_shard = 1000
        check_output_folder(args.out, args.force)
    else:
        check_output_folder(args.out, args.force)  # before reading a large source
        if args.source == "digits":
            arrays = digits_arrays(args.seed)
            default_shard = 400  # 1,437 training images -> 4 shards, so 2 ranks get different shards
        elif args.source in ("cifar10", "cifar100"):
            arrays = cifar_arrays(args.src, fine=args.source == "cifar100")
            default_shard = 5000
        elif args.source in IDX_CLASSES:
            arrays = idx_arrays(args.src, args.source)
            default_shard = 5000  # 12 train shards: 2 ranks x 2 workers each get whole shards
        elif args.source == "npz":
            arrays = npz_arrays(args.src)
            default_shard = 5000
        else:
            arrays = synthetic_arrays(args.num_classes, args.train, args.val, args.size, args.seed)
            default_shard = 512
        x_train, y_train, x_val, y_val, classes = arrays
        train, val = zip(x_train, y_train), zip(x_val, y_val)
    info = write_dataset(args.out, train, val, fmt, args.shard_size or default_shard, classes, args.source,
                         force=args.force)
    print(f"wrote {info['num_train']} train and {info['num_val']} val samples ({fmt}) to {args.out}:")
    print(f"  data.train={info['train']}\n  data.val={info['val']}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
