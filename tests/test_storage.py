import pytest

from imgcls.platform import storage
from imgcls.errors import UserError


def test_relative_paths_resolve_against_the_base_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.BASE_DIR_VARIABLE, str(tmp_path))
    assert storage.resolve("runs/x").path == str(tmp_path / "runs" / "x")
    assert storage.resolve("/abs/path").path == "/abs/path"
    assert storage.resolve("file:///abs/y").path == "/abs/y"


def test_relative_paths_default_to_the_current_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.BASE_DIR_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("a/b").path == str(tmp_path / "a" / "b")


def test_unsupported_scheme_is_a_user_error():
    with pytest.raises(UserError, match="Unsupported storage scheme 'gs://'"):
        storage.resolve("gs://bucket/x")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = storage.resolve(str(tmp_path / "deep" / "file.txt"))
    storage.write_text_atomic(target, "one")
    storage.write_text_atomic(target, "two")
    assert (tmp_path / "deep" / "file.txt").read_text() == "two"
    assert [path.name for path in (tmp_path / "deep").iterdir()] == ["file.txt"]


def test_the_storage_settings_reach_both_clients_and_a_pickled_filesystem():
    import pickle

    from imgcls.config import StorageConfig

    endpoint = "http://127.0.0.1:9"  # nothing is sent: clients are made lazily
    storage.configure(StorageConfig(max_attempts=4, connect_timeout_s=3, request_timeout_s=7))
    try:
        config = storage.s3_client(endpoint).meta.config
        # botocore's `total_max_attempts` counts the first try, as pyarrow's `max_attempts` does.
        assert config.retries == {"mode": "standard", "total_max_attempts": 4}
        assert (config.connect_timeout, config.read_timeout) == (3, 7)
        filesystem = storage.resolve("s3://bucket/key", endpoint).filesystem
        assert filesystem.made_from == (endpoint, storage.region_from_environment(), storage.ClientSettings(4, 3.0, 7.0))
        # pyarrow's own pickling keeps the timeouts but not the retry strategy: ours is rebuilt.
        assert pickle.loads(pickle.dumps(filesystem)).made_from == filesystem.made_from
    finally:
        storage.configure(StorageConfig())
    assert storage.s3_client(endpoint).meta.config.retries["total_max_attempts"] == 10


def test_only_failures_of_the_endpoint_count_as_unavailable():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert storage.is_unavailable(client_error("SlowDown", 503)) and storage.is_unavailable(client_error("InternalError", 500))
    assert storage.is_unavailable(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_unavailable(ReadTimeoutError(endpoint_url="http://x"))
    assert storage.is_unavailable(OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28"))
    assert not storage.is_unavailable(client_error("NoSuchKey", 404)) and not storage.is_unavailable(client_error("AccessDenied", 403))
    assert not storage.is_unavailable(FileNotFoundError("Path does not exist 'bucket/key'"))


def test_a_timeout_without_a_response_is_described_not_crashed_on(tmp_path):
    """botocore's ReadTimeoutError carries `response = None`: the message must still name the endpoint."""
    from botocore.exceptions import ReadTimeoutError

    location = storage.resolve("s3://bucket/images/a.png", "http://127.0.0.1:9")
    error = storage.storage_error(location, "read", ReadTimeoutError(endpoint_url="http://127.0.0.1:9/bucket/images/a.png"))
    assert "s3://bucket/images/a.png" in str(error) and "Read timeout" in str(error) and "kept failing" in str(error)
