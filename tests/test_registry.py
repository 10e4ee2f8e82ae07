"""The MLflow model registry against a real tracking server (tests/mlflow_server.py): trainings that
register themselves (`tracking.register_as`), `imgcls promote` moving an alias, and predict
following `models:/NAME@ALIAS` to the version it names, whether the artifact lives in MLflow or in a bucket.
The bucket's training is also the one that shows no credential reaches MLflow and its outputs are linked."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TEST_ACCESS_KEY, TEST_BUCKET, TEST_SECRET_KEY, tiny_job_overrides

from imgcls import cli, train
from imgcls.config import PredictConfig, load_job_config
from imgcls.errors import ConfigError
from imgcls.platform import storage


def parquet_model_versions(output: Path) -> set[str]:
    return set(pq.read_table(output, columns=["model_version"]).column("model_version").to_pylist())


def run_record(output: Path) -> dict:
    (record,) = [json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")]
    return record


def test_malformed_references_and_register_as_without_tracking_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        from imgcls.config import build_model

        build_model(PredictConfig, {"model": "models:/digits", "input": "/in", "output": "/out"}, "predict arguments")
    with pytest.raises(ConfigError, match="register_as"):
        load_job_config(None, ["data.train=/d", "output_dir=/o", "tracking.register_as=no/slashes"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_job_config(None, ["data.train=/d", f"output_dir={tmp_path}", "tracking.register_as=digits"])
    with pytest.raises(ConfigError, match="tracking is off"):
        train.run(config)
    assert cli.main(["promote", "digits", "1", "--alias", "champion"]) == 2


def test_register_promote_and_predict_follow_the_alias(
    ray_session, mlflow_server, s3_endpoint, pattern_dataset, pattern_holdout, tmp_path, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    from imgcls.tracking.registry import register_artifact

    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    name = f"patterns-{uuid.uuid4().hex[:8]}"
    tracking = [f"tracking.mlflow_uri={mlflow_server}", f"tracking.register_as={name}", "tracking.experiment=registry"]
    # Version 1 from a local output_dir (its artifact copied into MLflow), version 2 from a bucket (linked).
    local = tmp_path / "local"
    first = train.run(load_job_config(None, [*tiny_job_overrides(pattern_dataset, local, epochs=1), *tracking]))
    bucket_output = f"s3://{TEST_BUCKET}/registry/{uuid.uuid4().hex}"
    second = train.run(load_job_config(
        None, [*tiny_job_overrides(pattern_dataset, bucket_output, epochs=1), *tracking, "seed=7",
               f"storage.endpoint_url={s3_endpoint}"],
    ))  # fmt: skip
    assert (first.registered_as, second.registered_as) == (f"models:/{name}/1", f"models:/{name}/2")
    assert first.model_version != second.model_version
    client = MlflowClient(tracking_uri=mlflow_server)
    version_one, version_two = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    assert version_one.tags["model_version"] == first.model_version and version_one.source == f"runs:/{version_one.run_id}/model"
    assert version_one.run_id == json.loads((local / "tracking.json").read_text())["run_id"]
    assert version_two.source == f"{bucket_output}/model" and version_two.tags["model_version"] == second.model_version
    assert client.get_run(version_one.run_id).data.tags["imgcls.registered_as"] == f"models:/{name}/1"

    # Registering a run's artifact again (a rerun of the finished training) gives the version it has.
    again = register_artifact(client, name, version_one.run_id, storage.resolve(str(local)), first.model_version)
    assert again.version == "1" and len(client.search_model_versions(f"name='{name}'")) == 2
    # The bucket's run holds no credential (the suite's fake keys are in this process's environment and
    # its Ray's), no storage.* param, and links its outputs instead of copying them.
    run = client.get_run(version_two.run_id)
    texts = [*run.data.params.keys(), *run.data.params.values(), *run.data.tags.keys(), *run.data.tags.values()]
    assert not [text for text in texts if TEST_ACCESS_KEY in text or TEST_SECRET_KEY in text]
    assert not [key for key in run.data.params if key.startswith("storage.")]
    tags = run.data.tags
    assert tags["imgcls.outputs"] == "linked" and tags["imgcls.artifact_uri"] == f"{bucket_output}/model"
    assert tags["imgcls.history_uri"] == f"{bucket_output}/history.csv"
    assert tags["imgcls.training_curves_uri"] == f"{bucket_output}/training_curves.png"
    assert client.list_artifacts(run.info.run_id) == [] and run.info.status == "FINISHED"

    def predict(reference: str, output: Path) -> int:
        return cli.main(["predict", "--model", reference, "--input", str(pattern_holdout), "--output", str(output),
                         "--set", f"mlflow_uri={mlflow_server}", "--set", f"storage.endpoint_url={s3_endpoint}"])  # fmt: skip

    capsys.readouterr()
    assert cli.main(["promote", name, "1", "--alias", "champion", "--mlflow-uri", mlflow_server]) == 0
    assert f"models:/{name}@champion -> version 1" in capsys.readouterr().out
    assert predict(f"models:/{name}@champion", tmp_path / "night1") == 0
    assert parquet_model_versions(tmp_path / "night1") == {first.model_version}
    record = run_record(tmp_path / "night1")
    assert record["registered_model"] == {"name": name, "version": "1", "alias": "champion", "source": version_one.source}
    assert record["model_version"] == first.model_version and Path(record["model"]).is_relative_to(tmp_path / "cache")

    # A person moves the alias: the next night follows it, here to the bucket's artifact.
    assert cli.main(["promote", name, "2", "--alias", "champion", "--mlflow-uri", mlflow_server]) == 0
    assert "it named version 1" in capsys.readouterr().out
    assert predict(f"models:/{name}@champion", tmp_path / "night2") == 0
    assert parquet_model_versions(tmp_path / "night2") == {second.model_version}
    assert run_record(tmp_path / "night2")["model"] == f"{bucket_output}/model"
    # A version by number, through MLflow's own variable; the cached download is used again.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli.main(["predict", "--model", f"models:/{name}/1", "--input", str(pattern_holdout), "--output",
                     str(tmp_path / "pinned")]) == 0  # fmt: skip
    assert parquet_model_versions(tmp_path / "pinned") == {first.model_version}

    capsys.readouterr()
    assert predict(f"models:/{name}@nobody", tmp_path / "missing") == 2
    error = capsys.readouterr().err
    assert f"models:/{name}@nobody is not in the MLflow registry" in error and "Traceback" not in error
    assert cli.main(["promote", name, "9", "--alias", "champion"]) == 2
    assert "not in the MLflow registry" in capsys.readouterr().err
    assert client.get_model_version_by_alias(name, "champion").version == "2"
