"""Connecting to Ray (join the cluster named by RAY_ADDRESS, or start a private local one), its shape, and CPUs held through it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from imgcls.errors import UserError

logger = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join `RAY_ADDRESS` when set (a `ray job submit` driver or a user's cluster); otherwise start
    a local Ray bound to the loopback interface, so nothing is reachable from the network."""
    import ray

    from imgcls.platform.logs import verbose, worker_environment

    if ray.is_initialized():
        return
    quiet = {} if verbose() else {"logging_level": logging.WARNING}
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        # An address for `ray job submit` (the dashboard), not for drivers: on a cluster node,
        # join the cluster running here instead, as Ray's own `auto` does.
        logger.info("RAY_ADDRESS %s is a Jobs API address; joining the Ray cluster on this machine", address)
        os.environ.pop("RAY_ADDRESS")
        try:
            context = ray.init(address="auto", log_to_driver=True, **quiet)
            _check_same_dashboard(context.dashboard_url, address)
        except ConnectionError as error:
            raise UserError(
                f"RAY_ADDRESS={address} is the Jobs API of a cluster, and no Ray cluster that a driver can join "
                f"was found on this machine ({error}). Run the job through `ray job submit` (see README, "
                "Operations), or set RAY_ADDRESS to the cluster's GCS address (host:port, `ray status` shows it)."
            ) from None
        finally:
            os.environ["RAY_ADDRESS"] = address
    elif address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, **quiet)
    else:
        logger.info("starting a local Ray (set RAY_ADDRESS to use a cluster)")
        # A private Ray on one machine has no node to lose to preemption: no watcher actor (and no
        # warning about its restarts).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The dashboard (on loopback only) serves Ray's state API, which Ray Train's placement-group
        # cleaner needs: without it, a trial that Ray Tune stops early leaks its workers' CPUs.
        arguments = dict(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            runtime_env={"env_vars": worker_environment()},
            **quiet,
        )
        _init_with_a_free_dashboard_port(arguments)
    _quiet_ray_data()
    logger.info("Ray's own logs: %s", session_logs())


def _quiet_ray_data() -> None:
    """Ray Data's progress bars on a terminal only (a long prediction with an actor pool), never as
    log lines in a file; all of it again when verbose."""
    import sys

    import ray.data

    from imgcls.platform.logs import quiet_third_parties, verbose

    if not verbose():
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        quiet_third_parties()  # Ray Data's console handler exists now


def session_logs() -> str:
    """Where this Ray keeps its logs (on the head node of a cluster)."""
    import ray

    try:
        node = ray._private.worker.global_worker.node
        return os.path.join(node.get_session_dir_path(), "logs")
    except AttributeError:  # a joined cluster: the session folder lives on its head node
        return "the session folder of the cluster's head node (ray job logs, ray logs)"


def _check_same_dashboard(dashboard_url: str | None, jobs_address: str) -> None:
    """`auto` joins whichever Ray this machine runs; make sure it is the one RAY_ADDRESS names."""
    from urllib.parse import urlparse

    import ray

    wanted = urlparse(jobs_address).port or 8265
    joined = urlparse(f"http://{dashboard_url}").port if dashboard_url else None
    if joined != wanted:
        ray.shutdown()
        raise ConnectionError(f"the Ray cluster found here serves its dashboard on port {joined}, not {wanted}")


# Attempts at a local Ray whose dashboard lost its port to another process starting at the same moment.
DASHBOARD_PORT_ATTEMPTS = 3


def _init_with_a_free_dashboard_port(arguments: dict) -> None:
    """ray.init on Ray's usual dashboard port when free, else on any free one. The port is probed
    before Ray binds it, so two jobs starting together can both choose it; the one that loses the
    race starts again on another port instead of failing."""
    import ray

    preferred = 8265
    for attempt in range(1, DASHBOARD_PORT_ATTEMPTS + 1):
        try:
            ray.init(dashboard_port=_dashboard_port(preferred), **arguments)
            return
        except Exception as error:
            if "dashboard" not in str(error) or "port" not in str(error) or attempt == DASHBOARD_PORT_ATTEMPTS:
                raise
            logger.info("the Ray dashboard's port was taken meanwhile (attempt %d); starting on another", attempt)
            ray.shutdown()
            preferred = 0  # any free port


def _dashboard_port(preferred: int = 8265) -> int:
    """Ray's usual dashboard port, or any free one when another Ray on this machine holds it."""
    import socket

    for port in dict.fromkeys((preferred, 0)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RuntimeError("no free port for the Ray dashboard")


def cluster_totals() -> dict[str, float]:
    """CPUs and GPUs of the whole cluster as Ray accounts them, held or not."""
    import ray

    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0.0)), "GPU": float(resources.get("GPU", 0.0))}


def free_resources(settle_seconds: float = 2.0) -> dict[str, float]:
    """CPUs and GPUs this job can plan with: the cluster's, less what others hold right now (other
    jobs, Tune trials, or this job's own entrypoint reservation from `ray job submit
    --entrypoint-num-cpus`). Planning with the totals instead would reserve CPUs that are not there
    and leave the data pipeline waiting forever. Resources freed a moment ago (a finished job's
    actors) are given `settle_seconds` to come back."""
    import time

    import ray

    deadline = time.monotonic() + settle_seconds
    while True:
        total, available = ray.cluster_resources(), ray.available_resources()
        free = {name: float(available.get(name, 0.0)) for name in ("CPU", "GPU")}
        if all(free[name] >= float(total.get(name, 0.0)) - 1e-6 for name in free) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    held = float(total.get("CPU", 0.0)) - free["CPU"]
    if held > 1e-6:
        logger.info("%g of the cluster's %g CPUs are held by other work; planning with %g", held, total.get("CPU", 0.0), free["CPU"])
    return free


def ray_in_use() -> bool:
    """Whether this process has a Ray cluster to use: one it has already joined, or one RAY_ADDRESS
    names. Without either, a job would start a private Ray on this machine alone."""
    import sys

    ray = sys.modules.get("ray")  # not imported here: a run that needs no Ray should not pay for it
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


def cluster_shape() -> tuple[int, float]:
    """The joined cluster's number of live nodes, and the CPUs of the node this process runs on."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    cpus = next((float(node["Resources"].get("CPU", 0.0)) for node in nodes if node["NodeID"] == here), 0.0)
    return len(nodes), cpus


def live_node_ids() -> set[str]:
    import ray

    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def cluster_state(known_nodes: set[str] | None = None) -> str:
    """What the cluster has now, for a message about work that cannot run: live nodes, CPUs (and
    custom resources) in all and free, and the nodes that died (those of `known_nodes` gone, and
    any the GCS reports dead)."""
    import ray

    nodes = ray.nodes()
    alive = [node for node in nodes if node.get("Alive")]
    dead = [node["NodeID"] for node in nodes if not node.get("Alive")]
    if known_nodes:
        dead = sorted(set(dead) | (known_nodes - {node["NodeID"] for node in alive}))
    total, free = ray.cluster_resources(), ray.available_resources()
    names = sorted(name for name in total if not _is_builtin_resource(name))
    resources = ", ".join(
        f"{float(total.get(name, 0.0)):g} {name} ({float(free.get(name, 0.0)):g} free)" for name in ["CPU", "GPU", *names]
        if name in ("CPU",) or total.get(name)
    )  # fmt: skip
    text = f"the cluster has {len(alive)} live node(s) with {resources}"
    if dead:
        text += f" since node(s) {', '.join(node_id[:12] for node_id in dead)} died"
    return text


def _is_builtin_resource(name: str) -> bool:
    return name in ("CPU", "GPU", "memory", "object_store_memory") or name.startswith(("node:", "accelerator_type:"))


@contextmanager
def reserved_cpus(cpus: int) -> Iterator[None]:
    """Hold `cpus` CPUs of the (single-node) cluster through a placement group while threads of this
    process use them, so Ray schedules other jobs' tasks and actors around them. 0: hold nothing."""
    if cpus <= 0:
        yield
        return
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": cpus}], strategy="STRICT_PACK")
    try:
        try:
            ray.get(group.ready(), timeout=10)
        except ray.exceptions.GetTimeoutError:
            logger.info("waiting for %d CPUs of the Ray cluster, held by other work", cpus)
            ray.get(group.ready())
        yield
    finally:
        remove_placement_group(group)
