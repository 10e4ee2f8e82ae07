"""MLflow tracking of training against a real tracking server (tests/mlflow_server.py): what a run
holds, a server down at the start (exit 2) or lost mid-run (training finishes), and a Ray Tune
search as one parent run with each trial's run nested under it, the trials' outcomes, and a lost
server costing one warning. Checked where the same trainings already run: no credential reaching
MLflow and bucket outputs linked (tests/test_registry.py's bucket training), and a killed driver's
rerun and a restarted worker continuing the same MLflow run (tests/test_fault_tolerance.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port, tiny_job_overrides
from mlflow_server import PER_EPOCH_METRICS, metric_steps, mlflow_client, recorded_run_id

from imgcls import cli, train
from imgcls.config import JobConfig, load_job_config
from imgcls.errors import ConfigError
from imgcls.tracking.epoch_sink import epoch_metric_values
from imgcls.tracking.params import MAX_PARAM_VALUE_CHARACTERS, config_params
from imgcls.tracking.settings import experiment_name, tracking_uri

def git_head() -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


# --- without a server ---


def test_the_experiment_defaults_to_the_config_files_name(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config_file = tmp_path / "digits.yaml"
    config_file.write_text("data:\n  train: /data/train\noutput_dir: /runs/digits\n")
    from_file = load_job_config(config_file, ["tracking.mlflow_uri=http://mlflow:5000"])
    assert experiment_name(from_file.tracking) == "digits"
    assert tracking_uri(from_file.tracking) == "http://mlflow:5000"
    named = load_job_config(config_file, ["tracking.experiment=nightly"])
    assert experiment_name(named.tracking) == "nightly"
    without_file = load_job_config(None, ["data.train=/data/train", "output_dir=/runs/x"])
    assert experiment_name(without_file.tracking) == "imgcls"
    assert tracking_uri(without_file.tracking) is None  # neither the config nor the environment: off
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-mlflow:5000")
    assert tracking_uri(without_file.tracking) == "http://team-mlflow:5000"


def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(ConfigError) as refused:
        load_job_config(None, ["data.train=/d", "output_dir=/o", "tracking.mlflow_uri=http://me:hunter2@mlflow:5000"])
    assert "tracking.mlflow_uri" in str(refused.value) and "hunter2" not in str(refused.value)


def test_params_are_flat_text_without_storage_or_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    config = JobConfig.model_validate(
        {"data": {"train": "s3://bucket/train", "image_size": [16, 16]}, "output_dir": "s3://bucket/run",
         "storage": {"endpoint_url": "http://minio:9000"}, "train": {"class_weights": {"cat/dog": 2.0}}}
    )  # fmt: skip
    values = config.model_dump(mode="json")
    values["extra"] = {
        "api_token": "abc", "note": f"copied {TEST_SECRET_KEY} by mistake", "id": TEST_ACCESS_KEY,
        "url": "http://user:pw@host/x", "long": "x" * 2000,
    }  # fmt: skip
    params = config_params(values)
    assert params["data.image_size"] == "[16, 16]"
    assert params["train.epochs"] == "10" and params["train.deterministic"] == "true"
    assert params["data.val"] == "null" and params["tracking.mlflow_uri"] == "null"
    assert params["train.class_weights.cat_dog"] == "2.0"  # `/` is refused in MLflow names
    assert not [key for key in params if key.startswith("storage.")]
    assert "extra.api_token" not in params and "extra.note" not in params and "extra.id" not in params
    assert params["extra.url"] == "http://***@host/x"
    assert len(params["extra.long"]) == MAX_PARAM_VALUE_CHARACTERS and params["extra.long"].endswith("(2,000 characters)")
    assert not [value for value in params.values() if TEST_SECRET_KEY in value or TEST_ACCESS_KEY in value]


def test_epoch_metrics_are_the_numbers_only():
    metrics = {"epoch": 3, "loss": 0.5, "workers": 1, "weights_checksums": [1.0, 1.0], "stopped_early": False,
               "thresholds": [0.5], "_model_version": "v", "val_loss": float("nan")}  # fmt: skip
    assert epoch_metric_values(metrics) == {"loss": 0.5, "workers": 1.0}


def test_a_server_down_at_the_start_exits_2_naming_it(pattern_dataset, tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    started = time.monotonic()
    code = cli.main(
        ["train", "--config", str(REPO_ROOT / "examples/configs/smoke.yaml"), "--set", f"data.train={pattern_dataset}",
         "--set", f"output_dir={tmp_path / 'run'}", "--set", f"tracking.mlflow_uri={uri}"]
    )  # fmt: skip
    assert code == 2
    assert time.monotonic() - started < 30
    error = capsys.readouterr().err
    assert uri in error and "does not answer" in error and "Traceback" not in error
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- against a real server ---


def test_a_tracked_training_holds_its_params_metrics_tags_and_artifacts(ray_session, mlflow_server, pattern_dataset, tmp_path):
    overrides = tiny_job_overrides(pattern_dataset, tmp_path, epochs=3)
    config = load_job_config(None, [*overrides, f"tracking.mlflow_uri={mlflow_server}", "tracking.experiment=tracked"])
    result = train.run(config)
    client = mlflow_client(mlflow_server)
    run = client.get_run(recorded_run_id(tmp_path))
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"
    params = run.data.params
    assert params["train.epochs"] == "3" and params["data.image_size"] == "[16, 16]"
    assert params["data.train"] == str(pattern_dataset) and params["model.name"] == "seed_cnn"
    assert not [key for key in params if key.startswith("storage.")]
    for key in PER_EPOCH_METRICS:
        assert metric_steps(client, run.info.run_id, key) == [1, 2, 3], key
    assert "weights_checksums" not in run.data.metrics and "epoch" not in run.data.metrics
    tags = run.data.tags
    summary = json.loads((tmp_path / "model" / "metadata.json").read_text())["data_summary"]
    assert tags["model_version"] == result.model_version
    assert tags["data.train"] == str(pattern_dataset) and tags["imgcls.output_dir"] == str(tmp_path)
    assert tags["train_images"] == str(summary["train_images"]) and tags["val_images"] == str(summary["val_images"])
    assert tags["git_commit"] == git_head() and len(tags["git_commit"]) == 40
    assert tags["imgcls.artifact_uri"] == str(tmp_path / "model")
    artifacts = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert {"model", "training_curves.png", "history.csv", "skipped_images.parquet", "augmentation_samples.png",
            "config.yaml"} <= artifacts  # fmt: skip
    assert {"model/model.keras", "model/metadata.json"} <= {entry.path for entry in client.list_artifacts(run.info.run_id, "model")}
    downloaded = client.download_artifacts(run.info.run_id, "model/metadata.json", str(tmp_path / "downloaded"))
    assert json.loads(Path(downloaded).read_text())["model_version"] == result.model_version


def test_a_server_lost_mid_run_leaves_training_finishing(ray_session, mlflow_server, pattern_dataset, tmp_path, caplog):
    from fault_proxy import FaultProxy

    # The server goes away for this run only: every request through the proxy is reset from epoch 1 on.
    with FaultProxy(mlflow_server) as proxy:
        output_dir = tmp_path / "run"
        config = load_job_config(
            None, [*tiny_job_overrides(pattern_dataset, output_dir, epochs=8), f"tracking.mlflow_uri={proxy.url}"]
        )
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=train.run(config)), daemon=True)
        with caplog.at_level(logging.WARNING, logger="imgcls"):
            runner.start()
            client = mlflow_client(mlflow_server)
            deadline = time.monotonic() + 300
            while not ((output_dir / "tracking.json").exists() and client.get_metric_history(recorded_run_id(output_dir), "loss")):
                assert time.monotonic() < deadline and runner.is_alive(), "epoch 1 never reached MLflow"
                time.sleep(0.05)
            proxy.endpoint_down()
            runner.join(timeout=300)
        assert proxy.faults, "no request reached the lost server"
    assert "result" in outcome, "training did not finish after its tracking server was lost"
    assert [entry["epoch"] for entry in outcome["result"].history] == list(range(1, 9))
    assert (output_dir / "model" / "metadata.json").is_file()
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING and "MLflow" in record.getMessage()]
    assert len(warnings) == 1 and proxy.url in warnings[0].getMessage(), [record.getMessage() for record in warnings]


def _trial_summary(trial_id: str, status: str, metric: float | None):
    from imgcls.tune import TrialSummary

    return TrialSummary(trial_id=trial_id, status=status, epochs=2 if metric is not None else 0, metric_last=metric,
                        metric_best=metric, params={"train.learning_rate": 0.01}, artifact_uri=None)  # fmt: skip


def test_the_search_run_ends_the_trial_runs_tune_stopped_and_names_the_best(mlflow_server, tmp_path):
    from imgcls.platform import storage
    from imgcls.tracking.runs import find_or_create_run
    from imgcls.tracking.search_run import start_search_run
    from imgcls.tracking.tags import trial_tags
    from imgcls.tune import TuneResult

    experiment = f"outcomes-{uuid.uuid4().hex[:8]}"
    config = load_job_config(
        None, ["data.train=/data/train", f"output_dir={tmp_path}", "tune.metric=val_loss",
               'tune.search_space={"train.learning_rate": {"grid": [0.01, 0.1]}}',
               f"tracking.mlflow_uri={mlflow_server}", f"tracking.experiment={experiment}"],
    )  # fmt: skip
    output_dir = storage.resolve(str(tmp_path))
    search_run = start_search_run(config, output_dir)
    client = mlflow_client(mlflow_server)
    parent = client.get_run(search_run.run_id)
    assert parent.data.tags["imgcls.kind"] == "tune_search" and parent.info.status == "RUNNING"
    assert parent.data.tags["imgcls.output_dir"] == str(tmp_path) and parent.data.params["tune.mode"] == "min"
    # Trial: (its status in trials.csv, its run's status as Tune left it, the status the search ends it with).
    cases = {
        "t0": ("completed", "FINISHED", "FINISHED"),
        "t1": ("stopped_by_asha", "RUNNING", "KILLED"),  # ASHA ended its process
        "t2": ("error", "RUNNING", "FAILED"),  # its process died
        "t3": ("completed", "RUNNING", "FINISHED"),  # stopped after writing its artifact
        "t4": ("not_run", None, None),  # never started a run
    }
    trials_root = output_dir.join("trials")
    for trial_id, (_, left_as, _) in cases.items():
        if left_as is not None:
            tags = trial_tags(search_run.run_id, trial_id, ["train.learning_rate"])
            run_id, _ = find_or_create_run(client, trials_root.join(trial_id), parent.info.experiment_id, None, tags,
                                           mlflow_server)  # fmt: skip
            if left_as != "RUNNING":
                client.set_terminated(run_id, left_as)
    trials = [_trial_summary(trial_id, status, 0.5 - index / 10 if left_as else None)
              for index, (trial_id, (status, left_as, _)) in enumerate(cases.items())]  # fmt: skip
    search_run.trials_ended(trials, trials_root)
    (tmp_path / "trials.csv").write_text("trial_id,status\n")
    best = TuneResult(best_trial_id="t3", best_metric=0.2, best_config_uri=str(tmp_path / "best_config.yaml"),
                      artifact_uri=str(tmp_path / "model"), trials=trials)  # fmt: skip
    search_run.finished(best, "val_loss")

    for trial_id, (status, left_as, ended_as) in cases.items():
        if left_as is None:
            assert not (tmp_path / "trials" / trial_id).exists()
            continue
        run = client.get_run(recorded_run_id(tmp_path / "trials" / trial_id))
        assert run.info.status == ended_as, trial_id
        assert run.data.tags["imgcls.tune.status"] == status and run.data.tags["mlflow.parentRunId"] == search_run.run_id
        assert run.data.tags["imgcls.tune.best"] == ("true" if trial_id == "t3" else "false")
    parent = client.get_run(search_run.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics == {"best_val_loss": 0.2}
    assert parent.data.tags["imgcls.tune.best_trial_id"] == "t3"
    assert parent.data.tags["imgcls.tune.best_run_id"] == recorded_run_id(tmp_path / "trials" / "t3")
    assert [entry.path for entry in client.list_artifacts(search_run.run_id)] == ["trials.csv"]


def test_a_search_run_whose_server_is_lost_warns_once(tmp_path, caplog):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    from imgcls.platform import storage
    from imgcls.tracking.search_run import SearchRun
    from imgcls.tracking.server import create_client
    from imgcls.tune import TuneResult

    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    search_run = SearchRun(create_client(uri), uri, uuid.uuid4().hex, storage.resolve(str(tmp_path)))
    trials = [_trial_summary("t0", "completed", 0.2)]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="imgcls"):
        search_run.trials_ended(trials, storage.resolve(str(tmp_path / "trials")))
        search_run.finished(TuneResult(best_trial_id="t0", best_metric=0.2, best_config_uri="b", artifact_uri="m",
                                       trials=trials), "val_loss")  # fmt: skip
        search_run.failed()
    assert time.monotonic() - started < 30
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and uri in warnings[0] and "the search itself is unaffected" in warnings[0], warnings


@pytest.fixture
def placement_groups_freed_after(ray_session):
    """After the test, the placement groups its trials left are removed. Ray Train's cleaner, which
    frees those of a trial Tune stopped, gives up when it finds several Ray instances on the machine
    (the suite's processes each have one); the next test in this process needs the session's CPUs."""
    yield
    import ray
    from ray.util.placement_group import PlacementGroup

    deadline = time.monotonic() + 30
    while live := [group_id for group_id, group in ray.util.placement_group_table().items() if group["state"] != "REMOVED"]:
        if time.monotonic() > deadline:
            for group_id in live:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            break
        time.sleep(1)


def test_a_tune_search_is_one_parent_run_with_each_trial_nested(ray_session, mlflow_server, pattern_dataset, tmp_path,
                                                                placement_groups_freed_after):  # fmt: skip
    import csv

    from imgcls import tune

    experiment = f"search-{uuid.uuid4().hex[:8]}"
    output_dir = tmp_path / "search"
    config = load_job_config(
        None, [*tiny_job_overrides(pattern_dataset, output_dir, epochs=2),
               'tune.search_space={"train.learning_rate": {"grid": [0.01, 1.0e-7]}}', "tune.num_samples=1",
               "tune.metric=val_loss", "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_concurrent_trials=2",
               f"tracking.mlflow_uri={mlflow_server}", f"tracking.experiment={experiment}"],
    )  # fmt: skip
    result = tune.run(config)
    client = mlflow_client(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [run for run in runs if run.data.tags.get("imgcls.kind") == "tune_search"]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert parent.info.run_id == recorded_run_id(output_dir) and parent.info.status == "FINISHED"
    assert parent.data.params["tune.metric"] == "val_loss" and parent.data.params["tune.grace_period"] == "1"
    assert json.loads(parent.data.params["tune.search_space"]) == {"train.learning_rate": {"grid": [0.01, 1e-7]}}
    assert parent.data.params["train.epochs"] == "2" and not [key for key in parent.data.params if key.startswith("storage.")]
    assert parent.data.metrics["best_val_loss"] == pytest.approx(result.best_metric)
    assert parent.data.tags["imgcls.tune.best_trial_id"] == result.best_trial_id
    assert {"trials.csv", "trials.png", "best_config.yaml"} <= {entry.path for entry in client.list_artifacts(parent.info.run_id)}

    rows = {row["trial_id"]: row for row in csv.DictReader((output_dir / "trials.csv").open())}
    children = {run.data.tags["imgcls.tune.trial_id"]: run for run in runs if run is not parent}
    assert sorted(children) == sorted(rows)
    # ASHA stops the worse trial after its first epoch: its process ends, and its run is KILLED.
    expected_status = {"completed": "FINISHED", "stopped_by_asha": "KILLED"}
    for trial_id, child in children.items():
        tags, row = child.data.tags, rows[trial_id]
        assert tags["mlflow.parentRunId"] == parent.info.run_id and child.info.run_name == trial_id
        assert tags["imgcls.tune.searched"] == "train.learning_rate"
        assert float(child.data.params["train.learning_rate"]) == float(row["train.learning_rate"])
        assert (tags["imgcls.tune.status"], tags["imgcls.tune.epochs"]) == (row["status"], row["epochs"])
        assert child.info.status == expected_status[row["status"]], (row, child.info.status)
        assert child.info.run_id == recorded_run_id(output_dir / "trials" / trial_id)
    best = [trial_id for trial_id, child in children.items() if child.data.tags["imgcls.tune.best"] == "true"]
    assert best == [result.best_trial_id]
    assert parent.data.tags["imgcls.tune.best_run_id"] == children[result.best_trial_id].info.run_id
