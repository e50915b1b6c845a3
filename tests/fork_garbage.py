"""Run by tests/test_data.py::test_loader_workers_never_finalise_the_training_process_garbage:
a training process with a garbage gloo process group when its loader workers fork, and workers
that collect. Prints the number of batches loaded. Arguments: a recipe as JSON, and "persistent" or
"per-pass" (which workers: PersistentWorkers, or forked for the pass)."""

import gc
import json
import sys

import torch.distributed as dist

from launcher.data import EpochPlan, TrainStream, batches, index_shards
from launcher.data.loader import PersistentWorkers
from launcher.config.load import validate_recipe
from launcher.data.transforms import ImageTransform


class CollectingFirst:
    """The recipe's transform, after a full collection in the worker (workers collect anyway, at
    some allocation or other)."""

    def __init__(self, transform):
        self.transform, self.collected = transform, False

    def __getattr__(self, name):
        return getattr(self.transform, name)

    def __call__(self, image):
        if not self.collected:
            gc.collect()
            self.collected = True
        return self.transform(image)


recipe = validate_recipe(json.loads(sys.argv[1]))
index = index_shards(recipe.data.train, "data.train")
plan = EpochPlan(tuple(index.shard_sizes.tolist()), global_batch=32, streams=2, world_size=1, seed=0)
stream = TrainStream(index, plan, CollectingFirst(ImageTransform(recipe.data, 3, train=True)), 0, rank=0)
# A gloo process group in a reference cycle, its group destroyed (as a one-process FSDP run that
# cleans up can leave it): garbage that only a collection frees, whose threads live here. Automatic
# collection is off until the workers exist, so that it is still garbage when they fork.
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
cycle = {"group": dist.group.WORLD}
cycle["self"] = cycle
dist.destroy_process_group()
del cycle
gc.disable()
workers = PersistentWorkers(2, pin_memory=False) if sys.argv[2] == "persistent" else None
steps = sum(1 for _ in batches(stream, 2, workers=workers))
if workers is not None:
    workers.close()
gc.enable()
gc.collect()  # here, where its threads are, the group is finalised as usual
print("steps", steps)
