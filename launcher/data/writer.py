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
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from launcher.data import expand_pattern, index_file_next_to, scan_shard, write_index_file
from launcher.data.sources import (IDX_CLASSES, IDX_DEFAULT_SRC, cifar_arrays, digits_arrays, idx_arrays,
                                   imagefolder_items, npz_arrays, synthetic_arrays)
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
