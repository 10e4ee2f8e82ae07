"""A Ray Train backend that gives each worker its TF_CONFIG (the cluster of workers and its own
index), as MultiWorkerMirroredStrategy reads it, without importing TensorFlow anywhere but in the
workers. Ray's own TensorflowTrainer imports TensorFlow in its controller process too, seconds of
start-up that every training run paid before its first epoch."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig


@dataclass
class MultiWorkerConfig(BackendConfig):
    @property
    def backend_cls(self):
        return MultiWorkerBackend


class MultiWorkerBackend(Backend):
    def on_start(self, worker_group, backend_config: MultiWorkerConfig) -> None:
        import ray

        addresses = worker_group.execute(_free_address)
        ray.get([
            worker_group.execute_single_async(rank, _set_tf_config, addresses, rank) for rank in range(len(worker_group))
        ])  # fmt: skip


def _free_address() -> str:
    """host:port on this worker's node where its TensorFlow collective server will listen."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
