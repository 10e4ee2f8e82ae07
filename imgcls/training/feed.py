"""Feeding one worker its shard every epoch: seeded block order and augmentation as Ray Data tasks,
or, for a small unaugmented shard, a cache in memory reshuffled in numpy."""

from __future__ import annotations

import numpy as np

from imgcls.config import JobConfig


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's data order in one epoch: the same run gives the same order."""
    return seed * 1000 + epoch * 10 + rank


def data_task_cpus(config: JobConfig) -> float:
    """CPUs per Ray Data task: a whole one, unless the plan keeps less than that for data (Tune
    trials sharing a small cluster), where a 1-CPU task would wait forever."""
    return min(1.0, config.scaling.data_cpus)


def epoch_pipeline(shard, config: JobConfig, epoch: int, rank: int, randomize_blocks: bool = True):
    """This worker's shard for one epoch: blocks in a new order, then augmented as Ray Data tasks
    (on the CPUs the resource plan keeps for data), so the training process only trains.

    A shard that fits in the local shuffle buffer is reshuffled whole by the iterator, so it skips
    the block shuffle and, without augmentation, runs no Ray Data job per epoch at all."""
    from imgcls.data.augment import augment_rows

    pipeline = shard
    if randomize_blocks:
        pipeline = pipeline.randomize_block_order(seed=epoch_seed(config.seed, epoch, rank))
    if config.augment.is_active:
        pipeline = pipeline.map_batches(
            augment_rows,
            batch_size=config.train.batch_size,
            batch_format="numpy",
            fn_kwargs={"config": config.augment, "seed": config.seed, "epoch": epoch},
            num_cpus=data_task_cpus(config),
        )
    return pipeline


# A worker keeps its decoded shard in memory when it is at most this big and unaugmented (what
# `tf.data.Dataset.cache()` does for a plain Keras loop): later epochs then reshuffle in numpy
# instead of streaming the same pixels from the object store again.
SHARD_CACHE_MAX_BYTES = 512 * 1024 * 1024


class ShardCache:
    """The decoded images and labels of one worker's shard, filled during the first epoch."""

    def __init__(self) -> None:
        self.images: list = []
        self.labels: list = []
        self.ready = False

    def add(self, batch: dict) -> None:
        self.images.append(batch["image"])
        self.labels.append(batch["label"])

    def finish(self) -> None:
        self.images = np.concatenate(self.images)
        self.labels = np.concatenate(self.labels)
        self.ready = True

    def batches(self, batch_size: int, seed: int):
        """A fresh seeded permutation every epoch, cut into batches like Ray Data's iterator."""
        order = np.random.default_rng(seed).permutation(len(self.labels))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield {"image": self.images[chosen], "label": self.labels[chosen]}


def evaluation_batches(shard, batch_size: int):
    """Validation batches: the decoded pixels exactly as stored, never augmented."""
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)


class EvaluationFeed:
    """One worker's validation batches each epoch: streamed from its shard the first time, and from
    memory afterwards when the shard is small (no Ray Data job per epoch). Always in the same order."""

    def __init__(self, shard, config: JobConfig, rows: int):
        self.shard, self.batch_size = shard, config.train.batch_size
        shard_bytes = rows * int(np.prod(config.data.image_size)) * config.data.channels
        self.cached: list[dict] | None = None
        self.cacheable = shard_bytes <= SHARD_CACHE_MAX_BYTES

    def batches(self):
        if self.cached is not None:
            yield from self.cached
            return
        kept: list[dict] = []
        for batch in evaluation_batches(self.shard, self.batch_size):
            if self.cacheable:
                kept.append({"image": batch["image"], "label": batch["label"]})
            yield batch
        if self.cacheable:
            self.cached = kept


class EpochFeed:
    """One worker's training batches for each epoch: from the shard cache once it is filled, else
    from its Ray Data shard (filling the cache on the way when the shard is small and unaugmented)."""

    def __init__(self, shard, config: JobConfig, rows_per_worker: int, rank: int, batch_size: int | None = None):
        self.shard, self.config, self.rank = shard, config, rank
        self.rows_per_worker = rows_per_worker
        # A smaller elastic group gives each worker a larger batch (the global batch stays).
        self.batch_size = batch_size or config.train.batch_size
        self.shuffle_buffer = max(self.batch_size, min(2048, rows_per_worker))
        shard_bytes = rows_per_worker * int(np.prod(config.data.image_size)) * config.data.channels
        small = not config.augment.is_active and shard_bytes <= SHARD_CACHE_MAX_BYTES
        self.cache = ShardCache() if small else None

    def batches(self, epoch: int):
        seed = epoch_seed(self.config.seed, epoch, self.rank)
        if self.cache is not None and self.cache.ready:
            yield from self.cache.batches(self.batch_size, seed)
            return
        pipeline = epoch_pipeline(self.shard, self.config, epoch, self.rank, self.rows_per_worker > self.shuffle_buffer)
        for batch in pipeline.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", prefetch_batches=2,
            local_shuffle_buffer_size=self.shuffle_buffer, local_shuffle_seed=seed,
        ):  # fmt: skip
            if self.cache is not None:
                self.cache.add(batch)
            yield batch
        if self.cache is not None:
            self.cache.finish()
