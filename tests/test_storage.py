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
