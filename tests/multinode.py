"""A real multi-node Ray cluster on one machine, as an operator starts one: `ray start --head`, then
`ray start --address` once per node, each node its own raylet, with token authentication, its own
temp dir, token file and ports (so it lives beside the suite's own Ray and touches neither ~/.ray
nor /tmp/ray). A node is lost the way a machine is lost: SIGKILL of its raylet.

Nodes are told apart by a label (`imgcls-test-node=<name>`), which the state API reports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
NODE_LABEL = "imgcls-test-node"
# Each node's share of /dev/shm: the tests' data sets are a few MB.
OBJECT_STORE_BYTES = 256 * 1024 * 1024
# The ports a node listens on besides the raylet's; each node on this machine needs its own.
NODE_PORT_OPTIONS = (
    "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port", "--metrics-export-port",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    name: str
    node_manager_port: int
    resources: dict[str, float]

    def raylet(self) -> psutil.Process | None:
        """This node's raylet process (its command line names the node manager port)."""
        flag = f"--node_manager_port={self.node_manager_port}"
        for process in psutil.process_iter(["name", "cmdline"]):
            try:
                if "raylet" in (process.info["name"] or "") and flag in (process.info["cmdline"] or []):
                    return process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None


@dataclass
class LocalCluster:
    """Start with `start_head`; `add_node`, `kill_node`, `wait_for_node_state`; `stop` ends every
    process of this cluster (and only this one), also after a failed test."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="imgcls-mn-", dir="/tmp")))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    @property
    def temp_dir(self) -> Path:
        # Unix socket paths must stay short: the session folder lives directly under root.
        return self.root / "ray"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def environment(self) -> dict[str, str]:
        """What every process of this cluster and its clients run with: token auth, this checkout
        first on the path (the workers import the imgcls under test), quiet TensorFlow."""
        environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        environment.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "PYTHONPATH": python_path,
            # Ray's state API clients inside the cluster (Ray Train's placement-group cleaner) find
            # their cluster by address: with several Rays on one machine, "auto" finds too many.
            "RAY_ADDRESS": self.address,
            "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })  # fmt: skip
        return environment

    def driver_environment(self) -> dict[str, str]:
        """A job's driver on this machine joins the cluster by its GCS address (RAY_ADDRESS), with the token."""
        return self.environment()

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None, name: str = "head") -> Node:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(os.urandom(32).hex())
        self.token_path.chmod(0o600)
        options = [
            "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(self.dashboard_port), "--include-dashboard", "true", "--temp-dir", str(self.temp_dir),
            "--ray-client-server-port", str(free_port()), "--disable-usage-stats",
        ]  # fmt: skip
        return self._start(name, num_cpus, resources or {}, options)

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None) -> Node:
        # Nodes on one machine share the head's session folder: one log monitor (the head's) is
        # enough, a second would print every worker line twice.
        node = self._start(name, num_cpus, resources or {}, ["--address", self.address, "--include-log-monitor", "false"])
        self.wait_for_node_state(name, "ALIVE")
        return node

    def _start(self, name: str, num_cpus: int, resources: dict[str, float], options: list[str]) -> Node:
        ports = {option: free_port() for option in NODE_PORT_OPTIONS}
        command = [RAY, "start", *options, "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
                   "--labels", f"{NODE_LABEL}={name}", "--object-store-memory", str(OBJECT_STORE_BYTES)]  # fmt: skip
        for option, port in ports.items():
            command += [option, str(port)]
        started = subprocess.run(command, env=self.environment(), capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"ray start for node {name} failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
        node = Node(name=name, node_manager_port=ports["--node-manager-port"], resources=dict(resources))
        self.nodes[name] = node
        return node

    def kill_node(self, name: str) -> None:
        """Lose a node as a machine is lost: SIGKILL its raylet (its workers go with it)."""
        raylet = self.nodes[name].raylet()
        if raylet is None:
            raise RuntimeError(f"node {name} has no raylet running")
        raylet.send_signal(signal.SIGKILL)

    def node_states(self) -> dict[str, dict]:
        """Node name -> Ray's state API record (state ALIVE or DEAD, node_id, resources_total)."""
        token = self.token_path.read_text().strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dashboard_port}/api/v0/nodes?limit=1000&detail=1",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            records = json.load(response)["data"]["result"]["result"]
        states: dict[str, dict] = {}
        for record in sorted(records, key=lambda record: record.get("start_time_ms") or 0):
            name = (record.get("labels") or {}).get(NODE_LABEL)
            if name:
                states[name] = record  # a name reused later (a restarted node): the newest wins
        return states

    def wait_for_node_state(self, name: str, state: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                record = self.node_states().get(name)
            except OSError:  # the dashboard of a fresh head is not serving yet
                record = None
            if record is not None and record.get("state") == state:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} not {state} after {timeout:.0f} s (last seen: {record})")
            time.sleep(0.5)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its temp dir or GCS port."""
        markers = (str(self.temp_dir), f":{self.gcs_port}", f"--gcs-address=127.0.0.1:{self.gcs_port}")
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in argument for argument in process.info["cmdline"] or [] for marker in markers):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        # Ray's workers rename themselves (`ray::...`): found as the raylets' children.
        for process in list(found):
            try:
                found.extend(process.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        unique = {process.pid: process for process in found if process.pid != os.getpid()}
        return list(unique.values())

    def stop(self) -> list[int]:
        """SIGKILL every process of this cluster, wait for them, remove its folder; returns the pids
        still alive afterwards (none, or the teardown failed)."""
        processes = self.processes()
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=20)
        shutil.rmtree(self.root, ignore_errors=True)
        return [process.pid for process in alive]
