"""Ray Tune search: planning on a small cluster, search-space checks, and a real 4-trial search
with ASHA on the suite's 2-CPU Ray whose best config trains through the train command."""

from __future__ import annotations

import csv

import pytest
from conftest import tiny_job_overrides
from PIL import Image

from imgcls.config import load_job_config
from imgcls.errors import ConfigError, ResourcePlanError

SEARCH = 'tune.search_space={"train.learning_rate": {"grid": [0.01, 1.0e-7]}}'


def _tune_config(train_uri, output_dir, *extra: str):
    return load_job_config(None, tiny_job_overrides(train_uri, output_dir, epochs=3) + [SEARCH, *extra])


def test_plan_shares_the_cluster_and_keeps_cpu_for_data(tmp_path):
    from imgcls.tune import TRIAL_DRIVER_CPUS, plan_tuning

    one_at_a_time = plan_tuning(_tune_config("x", tmp_path), cluster_cpus=2)
    assert one_at_a_time.max_concurrent_trials == 1
    assert one_at_a_time.cpus_per_worker + one_at_a_time.data_cpus + TRIAL_DRIVER_CPUS <= 2

    two = plan_tuning(_tune_config("x", tmp_path, "tune.max_concurrent_trials=2"), cluster_cpus=2)
    assert two.max_concurrent_trials == 2
    assert two.data_cpus >= 0.25 and two.cpus_per_worker >= 0.25
    assert 2 * (two.cpus_per_worker + two.data_cpus + TRIAL_DRIVER_CPUS) <= 2 + 1e-9

    with pytest.raises(ResourcePlanError, match="at most 3 concurrent trials"):
        plan_tuning(_tune_config("x", tmp_path, "tune.max_concurrent_trials=4"), cluster_cpus=2)
    # Explicit worker CPUs: as many trials as fit, always leaving a whole CPU for Ray Data's tasks.
    fixed = plan_tuning(_tune_config("x", tmp_path, "scaling.cpus_per_worker=1", "scaling.data_cpus=1"), cluster_cpus=8)
    assert fixed.max_concurrent_trials == 3


def test_search_space_keys_and_values_are_checked_before_any_trial(tmp_path):
    from imgcls.tune import check_search_space

    with pytest.raises(ConfigError, match="train.learnig_rate"):
        check_search_space(_tune_config("x", tmp_path, 'tune.search_space={"train.learnig_rate": {"choice": [0.1]}}'))
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_search_space(_tune_config("x", tmp_path, 'tune.search_space={"train.batch_size": {"choice": [16, -1]}}'))
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        _tune_config("x", tmp_path, 'tune.search_space={"train.learning_rate": {"loguniform": [0, 1]}}')
    with pytest.raises(ConfigError, match="scaling.num_workers cannot be searched"):
        check_search_space(_tune_config("x", tmp_path, 'tune.search_space={"scaling.num_workers": {"choice": [1, 2]}}'))
    check_search_space(
        _tune_config("x", tmp_path, 'tune.search_space={"model.name": {"choice": ["seed_cnn", "cnn"]}, '
                     '"model.filters": {"choice": [[8], [8, 16]]}, "augment.zoom": {"uniform": [0.0, 0.2]}}')
    )  # fmt: skip


@pytest.mark.long  # two minutes: `make test-long`
def test_four_trials_with_asha_on_two_cpus_and_the_best_config_trains(ray_session, pattern_dataset, tmp_path, capsys):
    from imgcls import tune
    from imgcls.cli import main

    output_dir = tmp_path / "search"
    # Two trials at once with augmentation: each trial's Ray Data tasks must fit in its half-CPU share.
    config = _tune_config(
        pattern_dataset, output_dir, "tune.num_samples=2", "tune.metric=val_loss", "tune.max_concurrent_trials=2",
        "augment.horizontal_flip=true",
    )  # fmt: skip
    result = tune.run(config)

    # Trials ASHA stopped must give their workers' CPUs back (Ray Train's placement-group cleaner).
    assert _live_placement_groups_after_cleanup() == []

    rows = list(csv.DictReader((output_dir / "trials.csv").open()))
    assert len(rows) == 4 == len(result.trials)
    statuses = [row["status"] for row in rows]
    assert statuses.count("stopped_by_asha") >= 1, statuses
    assert all(row["status"] in ("completed", "stopped_by_asha") for row in rows), rows
    for row in rows:
        if row["status"] == "stopped_by_asha":
            assert int(row["epochs"]) < 3 and row["artifact_uri"] == ""
    best = next(row for row in rows if row["trial_id"] == result.best_trial_id)
    assert best["status"] == "completed" and float(best["train.learning_rate"]) == 0.01
    with Image.open(output_dir / "trials.png") as figure:
        assert figure.size[0] > 100
    assert (output_dir / "model" / "metadata.json").is_file() and (output_dir / "model" / "model.keras").is_file()

    best_config = load_job_config(output_dir / "best_config.yaml")
    assert best_config.train.learning_rate == 0.01 and best_config.tune is None
    assert best_config.output_dir == f"{output_dir}/best"
    assert best_config.scaling == config.scaling  # the trial's CPU share is not carried over

    # Rerunning the finished search restores it instead of starting over.
    again = tune.run(config)
    assert again.best_trial_id == result.best_trial_id and len(again.trials) == 4

    assert main(["train", "--config", str(output_dir / "best_config.yaml")]) == 0
    assert "written to" in capsys.readouterr().out
    assert (output_dir / "best" / "model" / "metadata.json").is_file()


def _live_placement_groups_after_cleanup(timeout_seconds: float = 60) -> list:
    import time

    import ray

    deadline = time.monotonic() + timeout_seconds
    while True:
        live = [group["bundles"] for group in ray.util.placement_group_table().values() if group["state"] != "REMOVED"]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(1)


def test_tune_command_without_a_tune_section_exits_2(tmp_path, capsys):
    from imgcls.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("data:\n  train: x\n")
    assert main(["tune", "--config", str(config)]) == 2
    assert "tune:" in capsys.readouterr().err
