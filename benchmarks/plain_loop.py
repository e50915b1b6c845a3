"""A plain, hand-written PyTorch training loop: the reference the launcher is measured and
checked against (same model, data, optimizer and schedule; no Accelerate, no plugins)."""

from __future__ import annotations

import time

import timm
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from launcher.data import EpochPlan, TrainStream, index_shards
from launcher.data.transforms import ImageTransform


def plain_train(recipe, max_steps: int) -> tuple[torch.nn.Module, list[float]]:
    """Train `max_steps` steps on one process; returns the model and each step's
    (wall, process CPU) seconds."""
    torch.manual_seed(recipe.seed)
    m = recipe.model
    model = timm.create_model(m.name, num_classes=m.num_classes, in_chans=m.in_chans, drop_rate=m.drop_rate)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Weight decay on weights only: not on biases and norm parameters.
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    decay = [p for n, p in model.named_parameters() if not (p.ndim <= 1 or n.endswith(".bias"))]
    o = recipe.optimizer
    assert o.name in ("momentum", "sgd"), "the plain loop implements SGD only"
    optimizer = torch.optim.SGD([{"params": no_decay, "weight_decay": 0.0},
                                 {"params": decay, "weight_decay": o.weight_decay}],
                                lr=o.lr, momentum=o.momentum, nesterov=o.name == "sgd")

    d = recipe.data
    index = index_shards(d.train, "data.train")
    plan = EpochPlan(tuple(index.shard_sizes.tolist()), global_batch=d.batch_size, streams=d.streams or 1,
                     world_size=1, seed=recipe.seed, shuffle=d.shuffle, window=d.shuffle_window)
    steps_per_epoch = plan.steps_per_epoch()
    s = recipe.schedule
    assert s.name == "cosine" and s.cycles == 1
    warmup_steps = s.warmup_epochs * steps_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=round(recipe.train.epochs * steps_per_epoch - warmup_steps),
                                  lr_min=s.min_lr, warmup_t=warmup_steps, warmup_lr_init=s.warmup_lr,
                                  warmup_prefix=True, t_in_epochs=False)
    # The recipe's augmentation path: per sample in the loader, or on the batch (data.augment_on:
    # device, resolved by validate_recipe) with the parameters the loader drew per sample.
    transform = ImageTransform(d, m.in_chans, train=True, batched=d.augment_on == "device")
    memory_format = torch.channels_last if m.channels_last else torch.contiguous_format

    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731  (wall, process CPU)
    step, times, epoch = 0, [], 0
    model.train()
    while step < max_steps:
        loader = DataLoader(TrainStream(index, plan, transform, epoch, rank=0), batch_size=None,
                            num_workers=d.num_workers)
        start = clock()
        for item in loader:
            images = transform.finish(item["images"], item["augment"]).to(memory_format=memory_format)
            loss = F.cross_entropy(model(images), item["targets"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(step)
            loss.item()  # the launcher syncs once per log row; this loop reads every loss
            now = clock()
            times.append((now[0] - start[0], now[1] - start[1]))
            start = now
            if step >= max_steps:
                break
        epoch += 1
    return model, times
