"""TensorFlow imported for inference without Keras' optional extras, and only in processes imgcls owns."""

import os
import subprocess
import sys

from conftest import REPO_ROOT

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from imgcls.platform.tensorflow_import import import_for_inference
tensorflow = import_for_inference(lean=sys.argv[2] == "lean")
import keras
import numpy as np
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
scores = model.predict_on_batch(np.ones((3, 4), np.float32))
assert scores.shape == (3, 2) and np.allclose(np.asarray(scores).sum(axis=1), 1.0, atol=1e-5)
print("after import:", sorted(name for name in ("sklearn", "matplotlib") if name in sys.modules))
import matplotlib.pyplot, sklearn.base  # still importable afterwards, and importable for real
print("later:", sorted(name for name in ("sklearn", "matplotlib") if sys.modules.get(name) is not None))
"""


def run_probe(mode: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO_ROOT), mode], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_a_lean_import_leaves_out_sklearn_and_matplotlib_and_keras_still_predicts():
    output = run_probe("lean")
    assert "after import: []" in output
    assert "later: ['matplotlib', 'sklearn']" in output


def test_a_plain_import_hides_nothing():
    # What a caller's own process gets (imgcls.predict.run from a notebook): Keras as installed.
    assert "after import: ['matplotlib', 'sklearn']" in run_probe("plain")


def test_only_a_command_line_process_is_claimed_and_its_fast_exit_keeps_code_and_output():
    from imgcls.platform import tensorflow_import

    assert tensorflow_import.process_is_ours() is False  # pytest's process, not a job's
    # process_main claims the process, runs the job, then leaves with os._exit: the exit code and
    # output still buffered in a pipe (no flush here) must survive.
    job = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from imgcls import cli\n"
        "from imgcls.platform import tensorflow_import\n"
        "cli.main = lambda argv: print('claimed', tensorflow_import.process_is_ours(), argv) or 3\n"
        "cli.process_main(['predict'])\n"
        "print('never reached')\n"
    )
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    completed = subprocess.run(
        [sys.executable, "-c", job, str(REPO_ROOT)], env=buffered, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 3, completed.stderr[-3000:]
    assert completed.stdout == "claimed True ['predict']\n"
