"""Connecting to Ray: join the cluster named by RAY_ADDRESS, or start a private local one."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join `RAY_ADDRESS` when set (a `ray job submit` driver or a user's cluster); otherwise start
    a local Ray bound to the loopback interface, so nothing is reachable from the network."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        # An address for `ray job submit` (the dashboard), not for drivers: on a cluster node,
        # join the cluster running here instead, as Ray's own `auto` does.
        logger.info("RAY_ADDRESS %s is a Jobs API address; joining the Ray cluster on this machine", address)
        os.environ.pop("RAY_ADDRESS")
        try:
            ray.init(address="auto", log_to_driver=True)
        finally:
            os.environ["RAY_ADDRESS"] = address
    elif address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        logger.info("starting a local Ray (set RAY_ADDRESS to use a cluster)")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)


def cluster_totals() -> dict[str, float]:
    """CPUs, GPUs and memory of the whole cluster as Ray accounts them."""
    import ray

    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0.0)), "GPU": float(resources.get("GPU", 0.0))}
