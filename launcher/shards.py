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
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from launcher.data import expand_pattern, index_file_next_to, scan_shard, write_index_file
from launcher.errors import LauncherError

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


def write_dataset(out: Path, train, val, fmt: str, shard_size: int, classes: list[str], source: str) -> dict:
    """train/val: iterables of (image array or (ext, bytes), label). Writes atomically into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shards-", dir=out))
    try:
        info = {"source": source, "format": fmt, "num_classes": len(classes), "classes": classes}
        for split, items in (("train", train), ("val", val)):
            samples = ((*(item if isinstance(item, tuple) else encode(item, fmt)), label) for item, label in items)
            pattern, count = write_split(tmp, split, samples, shard_size)
            info[split] = str(out / pattern)
            info[f"num_{split}"] = count
        for old in list(out.glob("train-*.tar")) + list(out.glob("val-*.tar")) + [out / "info.json"]:
            old.unlink(missing_ok=True)
        for old in list(out.glob("train-*.tar.index.npz")) + list(out.glob("val-*.tar.index.npz")):
            old.unlink(missing_ok=True)
        for f in sorted(tmp.iterdir()):
            if f.suffix == ".tar":  # its index, computed from the finished file
                write_index_file(scan_shard(f, split_of(f), checksum=True), index_file_next_to(out / f.name))
            os.replace(f, out / f.name)
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
        os.replace(tmp / "info.json", out / "info.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


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


def cifar_arrays(src: Path, fine: bool):
    # The CIFAR "python version" is a set of pickles; that is the format it is published in.
    def load(name):
        path = src / name
        if not path.is_file():
            raise LauncherError(f"'{path}' not found: --src must be the extracted cifar-{'100-python' if fine else '10-batches-py'} folder")
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(d[b"fine_labels" if fine else b"labels"])
        return x, y

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
    classes = [str(i) for i in range(100 if fine else 10)]
    if meta.is_file():
        with open(meta, "rb") as f:
            classes = [c.decode() for c in pickle.load(f, encoding="bytes")[key]]
    return x_train, y_train, x_val, y_val, classes


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
# Where Debian's packages put them (apt-get install dataset-fashion-mnist).
IDX_DEFAULT_SRC = {name: Path("/usr/share/datasets") / name for name in IDX_CLASSES}


def read_idx(src: Path, stem: str, magic: int) -> np.ndarray:
    """One IDX file (`stem` or `stem.gz` in src) as a uint8 array: (n, rows, cols) or (n,)."""
    import gzip
    import zlib

    candidates = [src / f"{stem}.gz", src / stem]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise LauncherError(f"'{src}' has no {stem}.gz (or {stem}): --src must be the folder holding the four IDX "
                            "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise LauncherError(f"'{path}' is not a readable gzip file ({err}): it is truncated or damaged; download it "
                            "again") from None
    dims = 3 if magic == IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * dims
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise LauncherError(f"'{path}' is not an IDX {'images' if dims == 3 else 'labels'} file: its magic number is "
                            f"{found}, expected {magic} (is it the {'labels' if dims == 3 else 'images'} file, or "
                            "not IDX at all?)")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise LauncherError(f"'{path}' holds {len(data) - header} bytes of data where its header {shape} promises "
                            f"{expected}: the file is truncated or damaged; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


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
    with np.load(src, allow_pickle=False) as z:
        missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in z]
        if missing:
            raise LauncherError(f"'{src}' lacks arrays {missing}; it needs x_train, y_train, x_val, y_val")
        arrays = [z[k] for k in ("x_train", "y_train", "x_val", "y_val")]
    num_classes = int(max(arrays[1].max(), arrays[3].max())) + 1
    return (*arrays, [str(i) for i in range(num_classes)])


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


def imagefolder_items(src: Path, fmt: str, seed: int, val_fraction: float):
    """DIR/<class>/<image> (split stratified), or DIR/train/<class>/... and DIR/val/<class>/..."""
    if not src.is_dir():
        raise LauncherError(f"'{src}' is not a folder")

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
                from PIL import Image

                with Image.open(path) as img:
                    yield np.asarray(img.convert("RGB")), label

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
    from launcher.remote import FetchOptions, Remote, kind, remote_url_of_index

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
    try:
        if args.source in ("cifar10", "cifar100", *IDX_CLASSES, "imagefolder", "npz") and args.src is None:
            where = (f" (the folder of its four IDX files; Debian's package puts them in {IDX_DEFAULT_SRC[args.source]}, "
                     "the default when it exists)" if args.source in IDX_CLASSES else "")
            raise LauncherError(f"{args.source} needs --src{where}")
        if args.source == "imagefolder":
            train, val, classes = imagefolder_items(args.src, fmt, args.seed, args.val_fraction)
            default_shard = 1000
        else:
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
        info = write_dataset(args.out, train, val, fmt, args.shard_size or default_shard, classes, args.source)
    except LauncherError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {info['num_train']} train and {info['num_val']} val samples ({fmt}) to {args.out}:")
    print(f"  data.train={info['train']}\n  data.val={info['val']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
