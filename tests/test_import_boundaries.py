"""The packages' import rules, checked in fresh processes: validating a config, raising a user error
and listing data load neither TensorFlow nor Ray, and nothing in imgcls imports the job scripts."""

from __future__ import annotations

import ast
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
