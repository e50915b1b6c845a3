"""Data: WebDataset tar shards read through a deterministic epoch plan.

Why not WebDataset's own pipeline (split_by_node / split_by_worker / shuffle buffer)?
Its order depends on the number of ranks and workers and on buffer state, so it cannot
resume mid-epoch without replaying, and 1 and 2 processes see different batches. Here the
shards are still plain WebDataset tars (written with webdataset.ShardWriter, opened with
webdataset.gopen, brace patterns expanded by webdataset), but what each step reads is a pure
function of (seed, epoch, step):

  1. The shards are indexed: each sample's byte offset, size and label, read from the tar
     headers once and kept in an index file (see "index files" below), so that start-up
     reads ~1 KB per shard instead of scanning every header. Scanning also validates the
     shards (empty, truncated, corrupt shards and out-of-range labels fail before
     training, naming the file).
  2. Each epoch, the shard order is permuted and the concatenated sample stream is cut
     into `streams` contiguous lanes of near-equal length; each lane is shuffled inside
     windows of `shuffle_window` samples (a shuffle buffer that can be seeked).
  3. Global step s takes the next `global_batch / streams` samples of every lane. Rank r
     owns a contiguous block of lanes, so it reads its own part of the shard stream and
     its share of each global batch. Data-loader worker w builds the steps s = w mod W.
  4. Augmentation draws are seeded per sample from (seed, epoch, sample id), so they do
     not depend on which rank or worker loads the sample.

Consequences: every training sample is used exactly once per epoch across all ranks; a
run can start at any step of any epoch by seeking (no replay); with a fixed `streams`,
any process count that divides it trains on the same global batches. Remote shards
(`s3://`, `http(s)://`, `pipe:`) are indexed from the index files next to them in the
store, then fetched by each rank in the order its lanes read them, a few shards ahead,
into a bounded cache that drops a shard after its last use this epoch (shard_cache.py).

The package, one job per module: index_files.py (one shard's index: tar scanning, index files,
their checks and caching), index.py (a shard set and its ShardIndex), plan.py (the epoch plan),
stream.py (decoding, per-sample seeding, the training and evaluation streams), loader.py
(loader workers and the copy to the device).
"""

import importlib

# The names below, each imported from its module on first use (PEP 562), so that `--check` and
# `python -m launcher.shards` reach the index modules without importing torch for the loader.
_FROM = {"index": ["ShardIndex", "expand_pattern", "fetch_options", "index_shards", "is_local"],
         "index_files": ["IMAGE_EXTS", "LABEL_EXTS", "default_cache_dir", "index_file_next_to", "scan_shard",
                         "write_index_file"],
         "loader": ["PersistentWorkers", "batches", "on_device"],
         "plan": ["EpochPlan"],
         "stream": ["Batch", "EvalStream", "TrainStream", "decode_image", "seed_for_sample"]}
_MODULE_OF = {name: module for module, names in _FROM.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'launcher.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"launcher.data.{_MODULE_OF[name]}"), name)
