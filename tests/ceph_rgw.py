"""A real S3 server for the tests: Ceph's RADOS Gateway over a one-monitor, one-OSD Ceph cluster
that keeps its objects in memory (memstore), all on 127.0.0.1, state in a folder of its own.

Debian 12's `ceph-mon`, `ceph-osd` and `radosgw` packages (Ceph 16.2) are enough: no manager, no
cephx, pool size 1. `ensure_binaries` installs them with apt-get when they are missing and this
process may (root, apt-get present), else says why the tests must skip. `start` brings the cluster
up in a few seconds; every step is bounded, and a failed step raises with the tail of the logs.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGES = ("ceph-mon", "ceph-osd", "radosgw")
# Everything `start` runs; the CLIs come with the packages' dependencies (ceph-base, ceph-common).
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool", "ceph-authtool")
# Measured: about 40 s. Bounded well inside the suite's 600 s per test (pytest-timeout), so that a
# stalled mirror ends as a skip that says so, not as a killed test.
INSTALL_TIMEOUT_S = 6 * 60
STEP_TIMEOUT_S = 60
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 10
# Objects live in the OSD's memory: enough for the suite's images, models and checkpoints.
MEMSTORE_BYTES = 1 << 30
LOG_TAIL_CHARS = 3000
INSTALL_LOCK = "/tmp/imgcls-ceph-install.lock"


class CephStartError(RuntimeError):
    """A step of bringing the cluster up failed or timed out; the message carries the logs' tails."""


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def ensure_binaries(timeout_s: float = INSTALL_TIMEOUT_S) -> str | None:
    """None when the Ceph binaries are there (installed now if need be), else why they are not.
    Parallel test processes (pytest -n) install one at a time: the others wait, then find them."""
    import fcntl

    if not missing_binaries():
        return None
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install_binaries(timeout_s)


def _install_binaries(timeout_s: float) -> str | None:
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"Ceph RGW tests need {', '.join(missing_binaries())}; installing them needs root"
    if shutil.which("apt-get") is None:
        return f"Ceph RGW tests need {', '.join(missing_binaries())}; no apt-get here to install {' '.join(PACKAGES)}"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    logger.info("installing %s with apt-get (once per machine)", " ".join(PACKAGES))
    commands = (
        ["apt-get", "update", "-qq"],
        # Waits for a concurrent apt run's lock instead of failing at once.
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", *PACKAGES],
    )
    for command in commands:
        remaining = timeout_s - (time.monotonic() - started)
        try:
            result = subprocess.run(
                command, env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=remaining
            )
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` did not finish within {timeout_s:.0f} s"
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-800:].strip()
            return f"`{' '.join(command)}` failed (exit {result.returncode}): {tail}"
    logger.info("installed %s in %.1f s", " ".join(PACKAGES), time.monotonic() - started)
    if missing_binaries():
        return f"after installing {' '.join(PACKAGES)}, still missing: {', '.join(missing_binaries())}"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> list[str]:
    """A prefix that has the daemon killed when the test process dies, however it dies: util-linux's
    setpriv sets the parent-death signal and execs (same pid). No preexec_fn: this process runs threads."""
    return ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


@dataclass
class RadosGateway:
    endpoint: str
    state_dir: Path
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    startup_s: float = 0.0

    def log_tails(self) -> str:
        """The end of every daemon's log, for an error message."""
        parts = []
        for path in sorted((self.state_dir / "log").glob("*")):
            text = path.read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {path.name}:\n{text[-LOG_TAIL_CHARS:]}")
        return "\n".join(parts) or "(no logs)"

    def resident_memory_mb(self) -> dict[str, float]:
        """Each daemon's resident memory, from /proc (Linux)."""
        sizes = {}
        for name, process in self.daemons.items():
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    sizes[name] = int(line.split()[1]) / 1024
        return sizes

    def stop(self, remove_state: bool = True) -> None:
        """TERM each daemon (gateway first, monitor last), KILL what has not exited in time."""
        logger.info("Ceph daemons' resident memory at the end, MB: %s",
                    {name: round(size) for name, size in self.resident_memory_mb().items()})  # fmt: skip
        for name in ("rgw", "osd", "mon"):
            process = self.daemons.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("ceph %s did not exit on TERM within %d s: killed", name, STOP_TIMEOUT_S)
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        if remove_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _config(state_dir: Path, monitor_port: int, gateway_port: int) -> str:
    fsid = uuid.uuid4()
    return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{monitor_port}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
ms_bind_msgr1 = false
# No keys inside the test cluster: it listens on loopback only and lives for one test session.
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
ms_client_mode = crc
run_dir = {state_dir}/run
admin_socket = {state_dir}/run/$name.asok
log_file = {state_dir}/log/$name.log
keyring = {state_dir}/keyring
# One OSD: pools of one copy, few placement groups, no warnings about either.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
# A nearly full /tmp must not stop the monitor.
mon_data_avail_warn = 1
mon_data_avail_crit = 0

[mon]
mon_data = {state_dir}/mon/$name
mon_initial_members = a
# One monitor has no peers to batch proposals for: commit each map change at once, not once a
# second (the gateway's start makes a dozen of them, one per pool and setting).
paxos_propose_interval = 0.01
paxos_min_wait = 0.001

[osd]
osd_data = {state_dir}/osd/$name
osd_objectstore = memstore
memstore_device_bytes = {MEMSTORE_BYTES}
osd_memory_target = 536870912
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1

[client.rgw]
rgw_data = {state_dir}/rgw
# tcp_nodelay=1: without it every small GET waits ~40 ms (Nagle's algorithm against delayed ACKs).
rgw_frontends = beast endpoint=127.0.0.1:{gateway_port} tcp_nodelay=1
rgw_thread_pool_size = 64
# Free the memory of deleted multipart parts soon (memstore holds every object in RAM).
rgw_gc_obj_min_wait = 30
rgw_gc_processor_period = 30
"""


def start(state_dir: Path, access_key: str, secret_key: str, timeout_s: float = START_TIMEOUT_S) -> RadosGateway:
    """A running gateway on 127.0.0.1 with one S3 user of these keys. The caller stops it."""
    started = time.monotonic()
    for folder in ("run", "log", "mon", "osd", "rgw"):
        (state_dir / folder).mkdir(parents=True, exist_ok=True)
    monitor_port, gateway_port = free_port(), free_port()
    config_path = state_dir / "ceph.conf"
    config_path.write_text(_config(state_dir, monitor_port, gateway_port))
    gateway = RadosGateway(f"http://127.0.0.1:{gateway_port}", state_dir)
    config = ["-c", str(config_path)]
    try:
        fsid = next(line.split(" = ")[1] for line in config_path.read_text().splitlines() if line.startswith("fsid"))
        _step(gateway, "monmaptool", ["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                                      f"[v2:127.0.0.1:{monitor_port}]", str(state_dir / "monmap")])  # fmt: skip
        _step(gateway, "ceph-authtool", ["ceph-authtool", "--create-keyring", str(state_dir / "keyring"), "--gen-key",
                                         "-n", "mon.", "--cap", "mon", "allow *"])  # fmt: skip
        _step(gateway, "ceph-mon --mkfs", ["ceph-mon", *config, "-i", "a", "--mkfs", "--monmap",
                                           str(state_dir / "monmap"), "--keyring", str(state_dir / "keyring")])  # fmt: skip
        _daemon(gateway, "mon", ["ceph-mon", *config, "-i", "a", "-f"])
        osd_uuid = str(uuid.uuid4())
        # The first call waits for the monitor to form its quorum of one.
        osd_id = _step(gateway, "ceph osd new", ["ceph", *config, "--connect-timeout", str(STEP_TIMEOUT_S - 10),
                                                 "osd", "new", osd_uuid]).strip()  # fmt: skip
        (state_dir / "osd" / f"osd.{osd_id}").mkdir(parents=True, exist_ok=True)
        _step(gateway, "ceph-osd --mkfs", ["ceph-osd", *config, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid])
        _daemon(gateway, "osd", ["ceph-osd", *config, "-i", osd_id, "-f"])
        _daemon(gateway, "rgw", ["radosgw", *config, "-n", "client.rgw", "-f"])
        _wait_until_serving(gateway, deadline=started + timeout_s)
        _step(gateway, "radosgw-admin user create", ["radosgw-admin", *config, "user", "create", "--uid=imgcls-test",
              "--display-name=imgcls tests", f"--access-key={access_key}", f"--secret-key={secret_key}"],
              quiet=True)  # fmt: skip
    except BaseException as error:
        tails = gateway.log_tails()
        gateway.stop(remove_state=False)
        if not isinstance(error, Exception):
            raise  # an interrupt: the daemons are stopped, nothing more to say
        raise CephStartError(
            f"the Ceph RGW test cluster did not start: {error}\nits logs (in {state_dir}):\n{tails}"
        ) from None
    gateway.startup_s = time.monotonic() - started
    logger.info("Ceph RGW up at %s in %.1f s (state in %s)", gateway.endpoint, gateway.startup_s, state_dir)
    return gateway


def _step(gateway: RadosGateway, name: str, command: list[str], quiet: bool = False) -> str:
    """Run one set-up command to its end within STEP_TIMEOUT_S; its stdout."""
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CephStartError(f"{name} did not finish within {STEP_TIMEOUT_S} s") from None
    if result.returncode != 0:
        # The user's record echoes its keys: shown only as the exit code and stderr.
        output = result.stderr if quiet else result.stdout + result.stderr
        raise CephStartError(f"{name} failed (exit {result.returncode}): {output[-LOG_TAIL_CHARS:]}")
    return result.stdout


def _daemon(gateway: RadosGateway, name: str, command: list[str]) -> None:
    with open(gateway.state_dir / "log" / f"{name}.out", "wb") as output:
        gateway.daemons[name] = subprocess.Popen(
            [*_die_with_parent(), *command], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )


def _wait_until_serving(gateway: RadosGateway, deadline: float) -> None:
    """The gateway answers HTTP once it has created its pools on the OSD."""
    while True:
        for name, process in gateway.daemons.items():
            if process.poll() is not None:
                raise CephStartError(f"ceph {name} exited with {process.returncode}")
        try:
            urllib.request.urlopen(gateway.endpoint, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (an anonymous request may be refused) means it serves
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise CephStartError(f"radosgw did not answer on {gateway.endpoint} in time")
        time.sleep(0.1)
