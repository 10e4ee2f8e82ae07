"""Where one run classifies: in the job's own process, or in Ray Data decode tasks beside a pool of
model actors, and why (the reason is logged and kept in the run record)."""

from __future__ import annotations

import math
import os
from typing import Literal

from pydantic import BaseModel

from imgcls.config import EvaluateConfig, PredictConfig, pool_settings

# Decoding threads of a run in this process, and the most CPUs a machine may have for large runs to
# stay here. Part of each image's decode holds the GIL (reading the file, Pillow's header parsing),
# so threads stop gaining somewhere; 8 is an estimate from 2 cores (see README, placement).
MAX_DECODE_THREADS = 8


class ModelPlacement(BaseModel):
    """Where one run classifies, and why (logged, and kept in the run record)."""

    kind: Literal["driver", "actor_pool"]
    reason: str
    # Decoding threads of a run in the driver (0: one per CPU of this machine), and the CPUs of a
    # joined Ray cluster held for them (0: none held).
    decode_threads: int = 0
    reserved_cpus: int = 0


def choose_placement(num_images: int, config: PredictConfig | EvaluateConfig) -> ModelPlacement:
    """Run in this process (decoding on threads, the model here) or in Ray Data decode tasks and a
    model actor pool. A pool pays a fixed start-up (a worker process, TensorFlow's import and the
    model load in it) and moves every image between processes; it earns that back only where it
    reaches CPUs this process cannot: other nodes, or more cores than its decode threads use (see
    README for the figures). So with `placement: auto`: a pool
    when one is sized (use_gpu, num_actors, max_actors); small runs in this process without looking
    for Ray; larger ones in a pool only if the cluster has several nodes or this machine more than
    MAX_DECODE_THREADS CPUs. A run in this process on a joined cluster holds its CPUs through Ray."""
    from imgcls.platform import ray_runtime

    if config.placement == "actor_pool":
        return ModelPlacement(kind="actor_pool", reason="placement actor_pool")
    if config.placement == "driver":
        return ModelPlacement(kind="driver", reason="placement driver")
    sized = pool_settings(config)
    if sized:
        return ModelPlacement(kind="actor_pool", reason=f"{' and '.join(sized)} set")
    if num_images < config.pool_min_images:
        return ModelPlacement(kind="driver", reason=f"fewer than pool_min_images={config.pool_min_images} images")
    if not ray_runtime.ray_in_use():
        cpus = machine_cpus()
        if cpus > MAX_DECODE_THREADS:
            return ModelPlacement(kind="actor_pool", reason=f"this machine has {cpus} CPUs, more than {MAX_DECODE_THREADS} decode threads use")
        return ModelPlacement(kind="driver", reason=f"no Ray cluster in use; this machine has {cpus} CPUs")
    ray_runtime.ensure_ray()
    nodes, node_cpus = ray_runtime.cluster_shape()
    if nodes > 1:
        return ModelPlacement(kind="actor_pool", reason=f"the Ray cluster has {nodes} nodes")
    if node_cpus < 1:  # a driver outside the cluster's node (Ray Client), or a node without CPUs
        return ModelPlacement(kind="actor_pool", reason="this process is not on a Ray node with CPUs")
    if node_cpus > MAX_DECODE_THREADS:
        return ModelPlacement(kind="actor_pool", reason=f"this node has {node_cpus:g} CPUs, more than {MAX_DECODE_THREADS} decode threads use")
    free = math.floor(ray_runtime.free_resources()["CPU"] + 1e-6)
    if free < 1:
        return ModelPlacement(kind="actor_pool", reason="every CPU of the Ray cluster is held: the pool waits its turn")
    threads = min(free, MAX_DECODE_THREADS)
    return ModelPlacement(
        kind="driver", reason=f"the Ray cluster is this machine alone ({node_cpus:g} CPUs)",
        decode_threads=threads, reserved_cpus=threads,
    )  # fmt: skip


def machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_threads() -> int:
    """One decoding thread per CPU this process may use, up to MAX_DECODE_THREADS: Pillow releases
    the GIL while it decodes and resizes."""
    return max(1, min(MAX_DECODE_THREADS, machine_cpus()))
