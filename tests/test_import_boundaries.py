"""The packages' import rules, checked in fresh processes: validating a config, raising a user error
and listing data load neither TensorFlow nor Ray, nothing in imgcls imports the job scripts, and a
training without tracking loads no MLflow."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

HEAVY = ("tensorflow", "keras", "ray")


@pytest.mark.parametrize("module", ["imgcls.config", "imgcls.errors", "imgcls.data.listing", "imgcls.cli"])
def test_light_modules_import_neither_tensorflow_nor_ray(module):
    script = (
        f"import sys, {module}\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == "[]", f"{module} loads {finished.stdout.strip()}"


def test_listing_a_folder_and_validating_a_config_load_neither(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    for name in ("cats/a.png", "dogs/b.png"):
        (tmp_path / name).write_bytes(b"x")
    script = (
        "import sys\n"
        "from imgcls.config import load_job_config\n"
        "from imgcls.data.listing import list_labelled\n"
        f"config = load_job_config(None, ['data.train={tmp_path}', 'output_dir={tmp_path.parent / 'out'}'])\n"
        "images = list_labelled(config.data.train)\n"
        f"print(images.class_names, sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == "['cats', 'dogs'] []"


def test_no_module_of_the_package_imports_the_job_scripts():
    for path in sorted((REPO_ROOT / "imgcls").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            assert not any(name == "jobs" or name.startswith("jobs.") for name in names), path


def test_training_without_tracking_never_imports_mlflow(tmp_path):
    # Predict and evaluate with an artifact URI, the training and search drivers' and the worker's modules,
    # the tracking settings, and rank 0's sinks of a plan without tracking: MLflow (an optional extra)
    # stays unloaded, installed or not.
    script = (
        "import sys, types\n"
        "import imgcls.train, imgcls.tune, imgcls.training.worker, imgcls.tracking, imgcls.tracking.params\n"
        "import imgcls.predict, imgcls.evaluate\n"
        "from imgcls.config import PredictConfig, load_job_config\n"
        "from imgcls.inference.registered_model import registered_model\n"
        "from imgcls.tracking.settings import tracking_uri\n"
        "from imgcls.training.epoch_sinks import build_sinks\n"
        f"config = load_job_config(None, ['data.train={tmp_path}', 'output_dir={tmp_path.parent / 'out'}'])\n"
        "assert tracking_uri(config.tracking) is None\n"
        "assert build_sinks(types.SimpleNamespace(tracking=None, tensorboard_uri=None), 0) == []\n"
        "predict = PredictConfig(model='/models/m', input='/in', output='/out')\n"
        "assert registered_model(predict) == (predict, None)  # an artifact URI: no registry asked\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'mlflow'))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=environment
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == "[]"
