"""A local Ray whose dashboard port is taken between the probe and Ray's bind (two jobs starting at
the same moment on one machine) starts again on another port instead of failing."""

import json
import subprocess
import sys

from conftest import REPO_ROOT

RACE = """
import json, logging, socket
logging.basicConfig(level=logging.INFO)
from imgcls.platform import ray_runtime

# Another process takes the probed port just before Ray binds it: here, the first probe's answer is
# a port this script already listens on.
held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
probed = ray_runtime._dashboard_port
answers = []

def racing_probe(preferred=8265):
    answers.append(held.getsockname()[1] if not answers else probed(preferred))
    return answers[-1]

ray_runtime._dashboard_port = racing_probe
ray_runtime.ensure_ray(num_cpus=1)
import ray
print(json.dumps({"answers": answers, "dashboard": ray._private.worker.global_worker.node.address_info["webui_url"]}))
ray.shutdown()
"""


def test_a_dashboard_port_taken_meanwhile_means_another_port_not_a_failed_start():
    completed = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300,
                               cwd=REPO_ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    started = json.loads(completed.stdout.strip().splitlines()[-1])
    answers = started["answers"]
    assert len(answers) == 2 and answers[0] != answers[1]
    assert started["dashboard"].endswith(f":{answers[1]}")
    assert "port was taken meanwhile (attempt 1)" in completed.stderr
