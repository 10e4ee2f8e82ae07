"""Resource plans that fit the cluster, checked before anything starts.

Ray Train workers that reserve every CPU leave Ray Data no CPU to decode images, and the job
waits forever. Every plan keeps CPU for data work, and a plan that cannot fit fails in seconds.
"""

from __future__ import annotations

from pydantic import BaseModel

from imgcls.config import ScalingConfig
from imgcls.errors import ResourcePlanError

# Below a quarter core per worker, TensorFlow processes mostly wait for each other.
MIN_CPUS_PER_WORKER = 0.25
# Decoding needs at least this much CPU beside the model actors during bulk prediction.
MIN_DATA_CPUS = 0.25


class TrainingPlan(BaseModel):
    num_workers: int  # the most workers; the fixed size unless elastic
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float
    cluster_cpus: float
    min_workers: int | None = None  # set: elastic between min_workers and num_workers
    custom_resources: dict[str, float] = {}  # per worker, beside CPU and GPU

    @property
    def fewest_workers(self) -> int:
        return self.min_workers if self.min_workers is not None else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.fewest_workers < self.num_workers

    def resources_per_worker(self) -> dict[str, float]:
        """What Ray reserves for each training worker."""
        resources = {"CPU": self.cpus_per_worker, **self.custom_resources}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def describe(self) -> str:
        gpu = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        custom = "".join(f", {amount:g} {name}" for name, amount in self.custom_resources.items())
        workers = f"{self.fewest_workers} to {self.num_workers}" if self.elastic else f"{self.num_workers}"
        return (
            f"{workers} worker(s) x {self.cpus_per_worker:g} CPU{gpu}{custom}, "
            f"{self.data_cpus:g} CPU left for Ray Data, of {self.cluster_cpus:g} free CPUs in the cluster"
        )


def plan_training(scaling: ScalingConfig, cluster_cpus: float, cluster_gpus: float) -> TrainingPlan:
    """CPUs and GPUs per worker for `scaling.num_workers` workers; an elastic plan must fit at least
    `scaling.min_workers` of them (more join when the cluster has room)."""
    workers = scaling.num_workers
    fewest = scaling.min_workers or workers
    fix = (
        "Lower scaling.num_workers or scaling.data_cpus, or give Ray more CPUs "
        "(`ray start --num-cpus N`, or a bigger cluster)."
    )
    if scaling.use_gpu and cluster_gpus < fewest:
        raise ResourcePlanError(
            f"scaling.use_gpu is on with scaling.num_workers={workers}, but the Ray cluster has "
            f"{cluster_gpus:g} GPU(s). Lower scaling.num_workers to {int(cluster_gpus)} or set scaling.use_gpu=false."
        )
    available = cluster_cpus - scaling.data_cpus
    if scaling.cpus_per_worker is not None:
        needed = fewest * scaling.cpus_per_worker + scaling.data_cpus
        if needed > cluster_cpus + 1e-9:
            raise ResourcePlanError(
                f"The training plan needs {needed:g} CPUs ({_fewest_key(scaling)}={fewest} x "
                f"scaling.cpus_per_worker={scaling.cpus_per_worker:g} + scaling.data_cpus={scaling.data_cpus:g} "
                f"for Ray Data) but the Ray cluster has {cluster_cpus:g}. {fix}"
            )
        cpus_per_worker = scaling.cpus_per_worker
    else:
        cpus_per_worker = min(1.0, available / workers) if available > 0 else 0.0
        if cpus_per_worker < MIN_CPUS_PER_WORKER:
            raise ResourcePlanError(
                f"scaling.num_workers={workers} training workers need at least {MIN_CPUS_PER_WORKER:g} CPU each "
                f"({workers * MIN_CPUS_PER_WORKER:g} CPUs) plus scaling.data_cpus={scaling.data_cpus:g} for Ray Data, "
                f"but the Ray cluster has {cluster_cpus:g} CPUs. {fix}"
            )
    return TrainingPlan(
        num_workers=workers,
        cpus_per_worker=round(cpus_per_worker, 4),
        gpus_per_worker=1.0 if scaling.use_gpu else 0.0,
        data_cpus=scaling.data_cpus,
        cluster_cpus=cluster_cpus,
        min_workers=scaling.min_workers,
        custom_resources=dict(scaling.resources_per_worker),
    )


def _fewest_key(scaling: ScalingConfig) -> str:
    return "scaling.min_workers" if scaling.min_workers is not None else "scaling.num_workers"


class PredictionPlan(BaseModel):
    num_actors: int  # the pool's size, or its minimum when it autoscales
    max_actors: int  # equal to num_actors for a fixed pool
    cpus_per_actor: float
    gpus_per_actor: float

    @property
    def autoscaling(self) -> bool:
        return self.max_actors > self.num_actors


def plan_prediction(
    num_actors: int | None, use_gpu: bool, cluster_cpus: float, cluster_gpus: float, max_actors: int | None = None
) -> PredictionPlan:
    """The minimum pool must fit the cluster now; actors up to `max_actors` start only when the cluster
    has room for them (an autoscaling cluster adds nodes for them), each with the same resources."""
    default = max(1, int(cluster_gpus)) if use_gpu else max(1, int(cluster_cpus - 1))
    actors = num_actors or (min(default, max_actors) if max_actors else default)
    if max_actors is not None and max_actors < actors:
        raise ResourcePlanError(f"max_actors ({max_actors}) must be at least num_actors ({actors}).")
    pool = {"num_actors": actors, "max_actors": max_actors or actors}
    if use_gpu:
        if cluster_gpus < actors:
            raise ResourcePlanError(
                f"use_gpu asks for {actors} model actor(s) with one GPU each, but the Ray cluster has "
                f"{cluster_gpus:g} GPU(s). Lower num_actors or drop use_gpu."
            )
        return PredictionPlan(**pool, cpus_per_actor=min(1.0, cluster_cpus / (2 * actors)), gpus_per_actor=1)
    cpus_per_actor = min(1.0, (cluster_cpus - MIN_DATA_CPUS) / actors)
    if cpus_per_actor < MIN_CPUS_PER_WORKER:
        raise ResourcePlanError(
            f"{actors} model actor(s) need at least {MIN_CPUS_PER_WORKER:g} CPU each plus {MIN_DATA_CPUS:g} CPU for "
            f"decoding, but the Ray cluster has {cluster_cpus:g} CPUs. Lower --set num_actors=N or add CPUs."
        )
    return PredictionPlan(**pool, cpus_per_actor=round(cpus_per_actor, 4), gpus_per_actor=0)
