import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from imgcls.config import ScalingConfig
from imgcls.errors import ResourcePlanError
from imgcls.platform.resources import plan_prediction, plan_training


def test_auto_plan_leaves_cpu_for_ray_data():
    plan = plan_training(ScalingConfig(num_workers=2), cluster_cpus=2, cluster_gpus=0)
    assert plan.cpus_per_worker == 0.5 and plan.data_cpus == 1.0
    roomy = plan_training(ScalingConfig(num_workers=2), cluster_cpus=8, cluster_gpus=0)
    assert roomy.cpus_per_worker == 1.0


def test_explicit_plan_that_does_not_fit_names_the_numbers():
    with pytest.raises(ResourcePlanError) as raised:
        plan_training(ScalingConfig(num_workers=2, cpus_per_worker=1), cluster_cpus=2, cluster_gpus=0)
    message = str(raised.value)
    assert "needs 3 CPUs" in message and "has 2" in message and "scaling.num_workers" in message


def test_too_many_workers_or_gpus_are_refused():
    with pytest.raises(ResourcePlanError, match="at least 0.25 CPU each"):
        plan_training(ScalingConfig(num_workers=8), cluster_cpus=2, cluster_gpus=0)
    with pytest.raises(ResourcePlanError, match="0 GPU"):
        plan_training(ScalingConfig(num_workers=1, use_gpu=True), cluster_cpus=4, cluster_gpus=0)


def test_prediction_plan_keeps_cpu_for_decoding():
    plan = plan_prediction(None, False, cluster_cpus=2, cluster_gpus=0)
    assert plan.num_actors == 1 and plan.cpus_per_actor == 1.0
    squeezed = plan_prediction(2, False, cluster_cpus=2, cluster_gpus=0)
    assert squeezed.cpus_per_actor == pytest.approx(0.875)
    with pytest.raises(ResourcePlanError):
        plan_prediction(16, False, cluster_cpus=2, cluster_gpus=0)


def test_impossible_plan_exits_2_quickly_through_the_job(ray_session, pattern_dataset, tmp_path):
    """Joins the suite's real 2-CPU Ray through RAY_ADDRESS, like a submitted job does."""
    started = time.monotonic()
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "jobs" / "train.py"),
            "--config",
            str(REPO_ROOT / "examples" / "configs" / "smoke.yaml"),
            "--set",
            f"data.train={pattern_dataset}",
            "--set",
            "scaling.num_workers=16",
            "--set",
            f"output_dir={tmp_path}",
        ],
        env={**__import__("os").environ, "RAY_ADDRESS": ray_session},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "scaling.num_workers=16" in completed.stderr and "2 CPUs" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert elapsed < 60


def test_an_autoscaling_prediction_pool_starts_at_its_minimum():
    fixed = plan_prediction(None, False, cluster_cpus=4, cluster_gpus=0)
    assert (fixed.num_actors, fixed.max_actors, fixed.autoscaling) == (3, 3, False)
    growing = plan_prediction(1, False, cluster_cpus=4, cluster_gpus=0, max_actors=8)
    assert (growing.num_actors, growing.max_actors, growing.autoscaling) == (1, 8, True)
    assert growing.cpus_per_actor == 1.0
    capped = plan_prediction(None, False, cluster_cpus=8, cluster_gpus=0, max_actors=2)
    assert (capped.num_actors, capped.max_actors) == (2, 2)
    gpus = plan_prediction(None, True, cluster_cpus=8, cluster_gpus=1, max_actors=4)
    assert (gpus.num_actors, gpus.max_actors, gpus.gpus_per_actor) == (1, 4, 1)
    with pytest.raises(ResourcePlanError, match="at least num_actors"):
        plan_prediction(3, False, cluster_cpus=8, cluster_gpus=0, max_actors=2)


def test_pool_bounds_are_checked_in_the_config():
    from imgcls.config import PredictConfig

    with pytest.raises(ValueError, match="max_actors \\(1\\) must be at least num_actors \\(2\\)"):
        PredictConfig(model="m", input="i", output="o", num_actors=2, max_actors=1)


def test_an_elastic_plan_fits_its_minimum_and_carries_the_custom_resources():
    scaling = ScalingConfig(num_workers=4, min_workers=1, cpus_per_worker=1, resources_per_worker={"trainer_slot": 1})
    plan = plan_training(scaling, cluster_cpus=2, cluster_gpus=0)  # 4 workers would not fit; 1 does
    assert plan.elastic and plan.fewest_workers == 1
    assert plan.resources_per_worker() == {"CPU": 1.0, "trainer_slot": 1.0}
    assert "1 to 4 worker(s) x 1 CPU, 1 trainer_slot" in plan.describe()
    with pytest.raises(ResourcePlanError, match="scaling.min_workers=2"):
        plan_training(ScalingConfig(num_workers=4, min_workers=2, cpus_per_worker=1), cluster_cpus=2, cluster_gpus=0)
    assert plan_training(ScalingConfig(num_workers=2, min_workers=1, use_gpu=True), 4, cluster_gpus=1).gpus_per_worker == 1
