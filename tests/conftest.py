"""Shared fixtures: one real local Ray per session, tiny image folders made on the fly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests start their own clusters; a developer's RAY_ADDRESS must not leak into them.
os.environ.pop("RAY_ADDRESS", None)

from image_factory import write_pattern_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16


@pytest.fixture(scope="session")
def ray_session():
    """A real 2-CPU Ray on loopback, started once for the whole suite."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def pattern_dataset(tmp_path_factory) -> Path:
    """Two learnable classes (horizontal vs vertical stripes), 48 images each, 16x16 PNG."""
    root = tmp_path_factory.mktemp("patterns") / "train"
    write_pattern_dataset(root, per_class=48, num_classes=2, size=IMAGE_SIZE, seed=1)
    return root


@pytest.fixture(scope="session")
def pattern_holdout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("patterns_holdout") / "test"
    write_pattern_dataset(root, per_class=10, num_classes=2, size=IMAGE_SIZE, seed=2)
    return root


def tiny_job_overrides(train_uri: Path, output_dir: Path, workers: int = 1, epochs: int = 4) -> list[str]:
    return [
        f"data.train={train_uri}",
        f"data.image_size=[{IMAGE_SIZE}, {IMAGE_SIZE}]",
        "data.val_fraction=0.25",
        f"train.epochs={epochs}",
        "train.batch_size=16",
        f"scaling.num_workers={workers}",
        f"output_dir={output_dir}",
    ]


@pytest.fixture(scope="session")
def trained_one_worker(ray_session, pattern_dataset, tmp_path_factory):
    """One real single-worker training run, shared by the train, artifact and predict tests."""
    from imgcls import train
    from imgcls.config import load_job_config

    output_dir = tmp_path_factory.mktemp("run_one_worker")
    config = load_job_config(None, tiny_job_overrides(pattern_dataset, output_dir, workers=1))
    return train.run(config), output_dir
