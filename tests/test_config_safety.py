"""Hostile or mistaken configs: none may hang a job, exhaust its memory, or echo huge or secret input.

Real files, real FIFOs and real job processes; slowness is bounded with pytest-timeout, never timed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from imgcls.config import (
    MAX_CONFIG_BYTES,
    EvaluateConfig,
    JobConfig,
    PredictConfig,
    build_model,
    load_job_config,
    normalised_uri,
    parse_overrides,
    read_yaml_mapping,
    uri_contains,
)
from imgcls.errors import ConfigError, redact, shorten

# Nine levels of nine each: 9**9 (387 million) strings once the aliases are expanded, from under 400 bytes.
BILLION_LAUGHS = "\n".join(
    ["a: &a [" + ",".join(["lol"] * 9) + "]"]
    + [f"{name}: &{name} [{','.join([f'*{previous}'] * 9)}]" for previous, name in zip("abcdefgh", "bcdefghi")]
) + "\n"


def run_job(name: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / f"{name}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_job_config(None, ["data.train=/data/train", *overrides])
    return str(raised.value)


def assert_user_error(completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr


# Reading the file: bounded, regular files only, strict UTF-8.


@pytest.mark.timeout(150)
def test_a_fifo_as_config_exits_2_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    completed = run_job("train", "--config", str(fifo))
    assert_user_error(completed)
    assert "is not a regular file" in completed.stderr and "FIFO" in completed.stderr


@pytest.mark.timeout(30)
def test_a_directory_as_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a regular file but a directory"):
        read_yaml_mapping(tmp_path)


@pytest.mark.timeout(30)
def test_a_unix_socket_as_config_is_refused(tmp_path):
    import socket

    # AF_UNIX paths are limited to ~100 bytes; pytest's tmp_path can be longer.
    path = Path(f"/tmp/imgcls-test-{os.getpid()}.sock")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        with pytest.raises(ConfigError, match="is not a regular file but a socket"):
            read_yaml_mapping(path)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


@pytest.mark.timeout(150)
def test_dev_null_is_an_empty_config(tmp_path):
    assert read_yaml_mapping("/dev/null") == {}
    # An endless character device stops at the limit instead of filling memory.
    with pytest.raises(ConfigError, match="larger than 1,048,576 bytes"):
        read_yaml_mapping("/dev/zero")


@pytest.mark.timeout(150)
def test_a_2_mb_config_exits_2_naming_the_limit(tmp_path):
    config = tmp_path / "huge.yaml"
    config.write_text("data:\n  train: /x\n# " + "x" * (2 * MAX_CONFIG_BYTES) + "\n")
    completed = run_job("train", "--config", str(config))
    assert_user_error(completed)
    assert "larger than 1,048,576 bytes" in completed.stderr
    assert len(completed.stderr) < 3000


def test_a_config_of_exactly_the_limit_is_read(tmp_path):
    config = tmp_path / "big.yaml"
    head = "data:\n  train: /x\n# "
    config.write_text(head + "x" * (MAX_CONFIG_BYTES - len(head) - 1) + "\n")
    assert config.stat().st_size == MAX_CONFIG_BYTES
    assert read_yaml_mapping(config) == {"data": {"train": "/x"}}


@pytest.mark.timeout(150)
def test_a_non_utf8_config_exits_2_naming_the_offset(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("data:\n  train: /images/café\n".encode("latin-1"))
    completed = run_job("train", "--config", str(config))
    assert_user_error(completed)
    assert "is not UTF-8" in completed.stderr and str(config) in completed.stderr
    assert "0xe9 at offset 26 (line 2)" in completed.stderr


def test_a_utf8_config_with_a_byte_order_mark_loads(tmp_path):
    config = tmp_path / "bom.yaml"
    config.write_bytes("\ufeffdata:\n  train: /images/café\n".encode("utf-8"))
    assert load_job_config(config).data.train == "/images/café"
    # Offsets count the mark: they are offsets into the file as it is on disk.
    config.write_bytes(b"\xef\xbb\xbfdata: \xff\n")
    with pytest.raises(ConfigError, match="0xff at offset 9 "):
        read_yaml_mapping(config)


# YAML: no aliases, no deep nesting, no huge echoes.


@pytest.mark.timeout(150)
def test_billion_laughs_exits_2_at_once_through_the_job(tmp_path):
    assert len(BILLION_LAUGHS) < 400
    config = tmp_path / "laughs.yaml"
    config.write_text(BILLION_LAUGHS)
    completed = run_job("train", "--config", str(config))
    assert_user_error(completed)
    assert len(completed.stderr) < 3000
    assert "uses a YAML alias (*a) at line 2" in completed.stderr
    assert "write the value out" in completed.stderr


def test_an_anchor_without_alias_is_harmless(tmp_path):
    config = tmp_path / "anchor.yaml"
    config.write_text("data: &data\n  train: /x\n")
    assert load_job_config(config).data.train == "/x"


def test_a_merge_key_is_an_alias_too(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("base: &base\n  epochs: 2\ntrain:\n  <<: *base\n")
    with pytest.raises(ConfigError, match=r"uses a YAML alias \(\*base\) at line 4"):
        read_yaml_mapping(config)


@pytest.mark.timeout(150)
def test_an_alias_in_set_exits_2(tmp_path):
    completed = run_job(
        "train", "--config", "/dev/null", "--set", "data.train=/x", "--set", "train.class_weights={a: &w 1, b: *w}"
    )
    assert_user_error(completed)
    assert "--set train.class_weights" in completed.stderr and "YAML alias (*w)" in completed.stderr
    with pytest.raises(ConfigError, match=r"YAML alias \(\*x\)"):
        parse_overrides(["data.train=*x"])


@pytest.mark.timeout(60)
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    config = tmp_path / "deep.yaml"
    config.write_text("data: " + "[" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nests collections more than 64 deep") as raised:
        read_yaml_mapping(config)
    assert len(str(raised.value)) < 600
    with pytest.raises(ConfigError, match="nests collections"):
        parse_overrides(["data.train=" + "{a: " * 1000])


@pytest.mark.timeout(60)
def test_a_yaml_syntax_error_on_a_huge_line_is_reported_briefly(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("data: [" + "a, " * 300_000 + "\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as raised:
        read_yaml_mapping(config)
    message = str(raised.value)
    assert len(message) < 800 and "\n" not in message
    with pytest.raises(ConfigError, match="is not valid YAML") as raised:
        parse_overrides(["data.train=[" + "b, " * 5000])
    assert len(str(raised.value)) < 800


def test_an_integer_of_thousands_of_digits_is_a_config_error():
    with pytest.raises(ConfigError, match="is not valid YAML") as raised:
        parse_overrides(["train.epochs=" + "9" * 5000])
    assert len(str(raised.value)) < 800


# Messages: short, and never a credential.


def test_shorten_and_redact():
    assert shorten("abc") == "'abc'"
    cut = shorten("x" * 5000)
    assert len(cut) < 240 and cut.startswith("'xxx") and "…" in cut and "5,000 characters" in cut
    assert redact("http://admin:pw@host:9000/path") == "http://***@host:9000/path"
    assert redact("s3://bucket/key@version and https://user@example.com") == "s3://bucket/key@version and https://***@example.com"
    # Masked before the cut, so a long value never shows the start of a password.
    assert "hunter2" not in shorten("x" * 150 + " http://admin:hunter2" + "y" * 100 + "@host")


@pytest.mark.timeout(150)
def test_credentials_in_the_endpoint_url_are_never_echoed():
    message = config_error("storage.endpoint_url=http://admin:pw@host")
    assert "'storage.endpoint_url'" in message and "must not contain credentials" in message
    assert "pw" not in message
    # Without a scheme the value cannot be masked: it is not shown at all.
    message = config_error("storage.endpoint_url=admin:s3cretpassword@minio:9000")
    assert "s3cretpassword" not in message
    completed = run_job(
        "predict", "--model", "m", "--input", "in", "--output", "out",
        "--set", "storage.endpoint_url=https://admin:Sup3rSecretPassw0rd@minio:9000",
    )  # fmt: skip
    assert_user_error(completed)
    assert "storage.endpoint_url" in completed.stderr and "Sup3rSecretPassw0rd" not in completed.stderr


def test_a_url_with_credentials_in_another_refused_value_is_masked():
    message = config_error("model.name=https://admin:hunter2@example.com/model")
    assert "'model.name'" in message and "https://***@example.com/model" in message and "hunter2" not in message


def test_a_5000_character_bad_value_is_echoed_at_most_200_characters():
    message = config_error("model.name=" + "z" * 5000)
    assert "'model.name'" in message and "5,000 characters" in message
    assert "z" * 201 not in message and len(message) < 800
    message = config_error("x" * 5000 + "=1")
    assert "unknown key" in message and len(message) < 800
    with pytest.raises(ConfigError) as raised:
        parse_overrides(["q" * 5000])
    assert "key=value" in str(raised.value) and len(str(raised.value)) < 400


def test_many_problems_are_counted_not_all_listed():
    message = config_error(*[f"bogus{number}=1" for number in range(500)])
    assert "unknown key 'bogus0'" in message and "and 490 more problems" in message
    assert len(message) < 1000


@pytest.mark.timeout(150)
def test_the_cli_prints_at_most_about_2000_characters_of_a_user_error(tmp_path):
    # The artifact check quotes the whole --model path; the CLI's last guard bounds what reaches stderr.
    completed = run_job("predict", "--model", str(tmp_path / ("m" * 5000)), "--input", str(tmp_path), "--output", "out")
    assert_user_error(completed)
    assert len(completed.stderr) < 2200


# Validation of values that used to pass.


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_learning_rate_must_be_finite(value):
    message = config_error(f"train.learning_rate={value}")
    assert "'train.learning_rate'" in message and "finite number" in message


@pytest.mark.parametrize("override", ["scaling.data_cpus=.inf", "augment.zoom=.nan", "finetune.learning_rate=.inf"])
def test_every_float_field_must_be_finite(override):
    assert "finite number" in config_error(override)


@pytest.mark.parametrize("weight", ["-1", "-0.5", ".nan", ".inf"])
def test_class_weights_must_be_finite_and_non_negative(weight):
    message = config_error(f"train.class_weights={{cat: 1, dog: {weight}}}")
    assert "'train.class_weights'" in message and "class 'dog'" in message and ">= 0" in message


def test_valid_class_weights_still_load():
    config = load_job_config(None, ["data.train=/x", "train.class_weights={cat: 0, dog: 2.5}"])
    assert config.train.class_weights == {"cat": 0.0, "dog": 2.5}
    assert load_job_config(None, ["data.train=/x", "train.class_weights=balanced"]).train.class_weights == "balanced"


def test_max_image_pixels_bounds():
    assert "'data.max_image_pixels'" in config_error("data.max_image_pixels=1")
    assert "'data.max_image_pixels'" in config_error("data.max_image_pixels=2000000000")
    assert load_job_config(None, ["data.train=/x", "data.max_image_pixels=10000"]).data.max_image_pixels == 10_000
    for model_type, values in ((PredictConfig, {"input": "in", "output": "out"}), (EvaluateConfig, {"data": "d", "output": "out"})):
        with pytest.raises(ConfigError, match="'max_image_pixels'"):
            build_model(model_type, {"model": "m", **values, "max_image_pixels": 1}, "test")


def test_image_size_bounds():
    message = config_error("data.image_size=[100000, 100000]")
    assert "'data.image_size'" in message and "at most [4096, 4096]" in message
    assert "'data.image_size'" in config_error("data.image_size=[4, 64]")
    assert load_job_config(None, ["data.train=/x", "data.image_size=[4096, 8]"]).data.image_size == (4096, 8)


@pytest.mark.parametrize("output_dir", ["/", "//", "///", "file:///"])
def test_output_dir_must_not_be_the_root(output_dir):
    message = config_error(f"output_dir={output_dir}")
    assert "'output_dir'" in message and "root directory" in message


def test_output_dir_must_not_be_empty():
    message = config_error("output_dir=''")
    assert "'output_dir'" in message and "must not be empty" in message


@pytest.mark.parametrize(
    ("output_dir", "train"),
    [("/data", "/data/cats/train"), ("/data/train", "/data/train/"), ("/data/x/..", "/data/train"), ("s3://b/p/", "s3://b/p/train")],
)
def test_output_dir_must_not_hold_the_training_data(output_dir, train):
    with pytest.raises(ConfigError, match="output_dir .* data.train"):
        load_job_config(None, [f"data.train={train}", f"output_dir={output_dir}"])


def test_output_dir_must_not_hold_the_validation_data():
    with pytest.raises(ConfigError, match="data.val"):
        load_job_config(None, ["data.train=/d/train", "data.val=runs/a/val", "output_dir=runs/a"])


def test_output_dir_beside_the_data_is_fine():
    config = load_job_config(None, ["data.train=/data/train", "data.val=/data/val", "output_dir=/data/train-run"])
    assert config.output_dir == "/data/train-run"


def test_predict_input_and_output_are_compared_normalised():
    with pytest.raises(ConfigError, match="output must differ from input"):
        build_model(PredictConfig, {"model": "m", "input": "same", "output": "./same"}, "predict arguments")
    with pytest.raises(ConfigError, match="output must differ from input"):
        build_model(PredictConfig, {"model": "m", "input": "s3a://b/images", "output": "s3://b/images/"}, "test")


@pytest.mark.parametrize(("input_uri", "output_uri"), [("images", "images/predictions"), ("all/images", "all")])
def test_overwrite_refuses_an_output_inside_the_input_or_around_it(input_uri, output_uri):
    values = {"model": "m", "input": input_uri, "output": output_uri}
    with pytest.raises(ConfigError, match="with overwrite"):
        build_model(PredictConfig, {**values, "overwrite": True}, "predict arguments")
    # Without overwrite nothing is replaced: the nesting alone is allowed, as before.
    assert build_model(PredictConfig, values, "predict arguments").output == output_uri


@pytest.mark.parametrize("model_type", [PredictConfig, EvaluateConfig])
@pytest.mark.parametrize("output", ["", "/"])
def test_predict_and_evaluate_output_must_be_a_folder_of_its_own(model_type, output):
    values = {"model": "m", "input": "in", "data": "d", "output": output}
    values.pop("data" if model_type is PredictConfig else "input")
    with pytest.raises(ConfigError, match="'output'"):
        build_model(model_type, values, "test")


def test_search_space_bounds_must_be_finite():
    message = config_error("tune={search_space: {train.learning_rate: {loguniform: [.nan, 0.1]}}}")
    assert "bounds must be finite" in message


# The helpers other modules reuse, and normal configs.


def test_normalised_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGCLS_BASE_DIR", str(tmp_path))
    assert normalised_uri("runs/a/../b/") == f"{tmp_path}/runs/b"
    assert normalised_uri("file://runs/b") == f"{tmp_path}/runs/b"
    assert normalised_uri("file:///x//y/") == "/x/y"
    assert normalised_uri("~/data") == os.path.expanduser("~/data")
    assert normalised_uri("//x") == "/x"
    # Object keys are never normalised: `a/../b` and `a//b` are distinct keys in S3.
    assert normalised_uri("S3A://bucket/a/../b//c//") == "s3://bucket/a/../b//c"
    monkeypatch.delenv("IMGCLS_BASE_DIR")
    assert normalised_uri("x") == os.path.join(os.getcwd(), "x")


def test_uri_contains():
    assert uri_contains("/a", "/a") and uri_contains("/a/", "/a/b/c") and uri_contains("/", "/a")
    assert not uri_contains("/a", "/ab") and not uri_contains("/a/b", "/a")
    assert uri_contains("s3://b", "s3a://b/k") and not uri_contains("s3://b", "s3://bb")
    assert not uri_contains("/b", "s3://b") and not uri_contains("s3://b", "/b")


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_example_configs_still_load(path):
    assert isinstance(load_job_config(path), JobConfig)


def test_finite_values_still_load():
    config = load_job_config(None, ["data.train=/x", "train.learning_rate=1e-3", "augment.zoom=0.2"])
    assert math.isfinite(config.train.learning_rate) and config.augment.zoom == 0.2
