from pathlib import Path

import pytest
import yaml

from imgcls.config import JobConfig, PredictConfig, build_model, config_to_yaml, load_job_config, parse_overrides
from imgcls.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_loads_with_defaults(tmp_path):
    config = load_job_config(write(tmp_path, "data:\n  train: /data/train\n  image_size: [32, 48]\n"))
    assert config.data.train == "/data/train"
    assert config.data.image_size == (32, 48)
    assert config.model.name == "seed_cnn"
    assert config.train.epochs == 10 and config.scaling.num_workers == 1


def test_overrides_are_parsed_as_yaml_and_win(tmp_path):
    path = write(tmp_path, "data:\n  train: /a\ntrain:\n  epochs: 3\n")
    config = load_job_config(path, ["train.epochs=7", "data.image_size=[16, 16]", "scaling.use_gpu=true", "seed=42"])
    assert config.train.epochs == 7
    assert config.data.image_size == (16, 16)
    assert config.scaling.use_gpu is True
    assert config.seed == 42


def test_unknown_key_is_rejected_with_its_dotted_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch'"):
        load_job_config(write(tmp_path, "data:\n  train: /a\ntrain:\n  epoch: 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'data\.bogus'"):
        load_job_config(write(tmp_path, "data:\n  train: /a\n"), ["data.bogus=1"])


def test_bad_value_gives_readable_message(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_job_config(write(tmp_path, "data:\n  train: /a\ntrain:\n  epochs: -2\n"))
    message = str(raised.value)
    assert "'train.epochs'" in message and "greater than 0" in message and "-2" in message
    with pytest.raises(ConfigError, match="'data.channels'"):
        load_job_config(write(tmp_path, "data:\n  train: /a\n  channels: 4\n"))
    with pytest.raises(ConfigError, match="'data' is required"):
        load_job_config(write(tmp_path, "seed: 1\n"))


def test_unreadable_or_non_mapping_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_job_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_job_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(write(tmp_path, "data: [unclosed\n"))


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_resolved_config_round_trips(tmp_path):
    config = load_job_config(write(tmp_path, "data:\n  train: /a\n"), ["train.learning_rate=0.01"])
    again = JobConfig.model_validate(yaml.safe_load(config_to_yaml(config)))
    assert again == config


def test_predict_config_rejects_output_equal_to_input():
    with pytest.raises(ConfigError, match="output must differ from input"):
        build_model(PredictConfig, {"model": "m", "input": "/x/", "output": "/x"}, "test")


@pytest.mark.parametrize("name", ["digits.yaml", "smoke.yaml"])
def test_example_configs_are_valid(name):
    config = load_job_config(REPO_ROOT / "examples" / "configs" / name)
    assert config.model.name == "seed_cnn"


def test_storage_retry_settings_have_defaults_and_bounds():
    storage = PredictConfig(model="m", input="/in", output="/out").storage
    assert (storage.max_attempts, storage.connect_timeout_s, storage.request_timeout_s) == (10, 10.0, 60.0)
    config = load_job_config(None, ["data.train=/a", "storage.max_attempts=3", "storage.request_timeout_s=5"])
    assert (config.storage.max_attempts, config.storage.request_timeout_s) == (3, 5.0)
    with pytest.raises(ConfigError, match="'storage.max_attempts'"):
        load_job_config(None, ["data.train=/a", "storage.max_attempts=0"])
    with pytest.raises(ConfigError, match="'storage.connect_timeout_s'"):
        load_job_config(None, ["data.train=/a", "storage.connect_timeout_s=-1"])


def test_elastic_scaling_and_custom_resources_are_validated():
    base = ["data.train=/data"]
    elastic = load_job_config(None, [*base, "scaling.num_workers=4", "scaling.min_workers=2"])
    assert elastic.scaling.elastic and elastic.scaling.reschedule_timeout_s == 600
    assert not load_job_config(None, [*base, "scaling.num_workers=2", "scaling.min_workers=2"]).scaling.elastic
    with pytest.raises(ConfigError, match=r"scaling.min_workers \(3\) must be at most scaling.num_workers \(2\)"):
        load_job_config(None, [*base, "scaling.num_workers=2", "scaling.min_workers=3"])
    pinned = load_job_config(None, [*base, "scaling.resources_per_worker={trainer_slot: 1}"])
    assert pinned.scaling.resources_per_worker == {"trainer_slot": 1.0}
    for owned in ("CPU", "gpu"):
        with pytest.raises(ConfigError, match="set by scaling.cpus_per_worker and scaling.use_gpu"):
            load_job_config(None, [*base, f"scaling.resources_per_worker={{{owned}: 1}}"])
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        load_job_config(None, [*base, "scaling.resources_per_worker={trainer_slot: 0}"])
    with pytest.raises(ConfigError, match="reschedule_timeout_s"):
        load_job_config(None, [*base, "scaling.reschedule_timeout_s=0"])
