"""cluster/make_token.sh never puts a token where someone else can read it: it refuses a symlink and a
file of another user, and writes a new token only into a fresh file it renames into place."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "make_token.sh"
NOBODY = 65534


def make_token(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), str(path)], capture_output=True, text=True, timeout=30)


def assert_refused(completed: subprocess.CompletedProcess, words: str) -> None:
    assert completed.returncode == 2, completed
    assert completed.stdout == ""
    assert len(completed.stderr.strip().splitlines()) == 1 and words in completed.stderr, completed.stderr


def no_leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".")]


def test_a_new_token_is_64_hex_characters_mode_0600(tmp_path):
    token = tmp_path / "fresh" / "auth_token"
    completed = make_token(token)
    assert completed.returncode == 0 and completed.stderr == "", completed
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert no_leftovers(token.parent) == []


def test_two_new_tokens_differ(tmp_path):
    assert make_token(tmp_path / "one").returncode == 0 and make_token(tmp_path / "two").returncode == 0
    assert (tmp_path / "one").read_text() != (tmp_path / "two").read_text()


def test_an_existing_token_of_this_user_is_kept_and_made_private(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("my-existing-token")
    token.chmod(0o644)
    inode = token.stat().st_ino
    assert make_token(token).returncode == 0
    assert token.read_text() == "my-existing-token" and token.stat().st_ino == inode
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_an_empty_file_of_this_user_is_replaced_not_written_into(tmp_path):
    token = tmp_path / "auth_token"
    token.touch(mode=0o644)
    token.chmod(0o644)
    # Someone who opened the empty file before (or holds a hard link to it) must not see the token.
    hard_link = tmp_path / "reader"
    os.link(token, hard_link)
    assert make_token(token).returncode == 0
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert hard_link.read_text() == "" and hard_link.stat().st_ino != token.stat().st_ino


@pytest.mark.parametrize("target_exists", [True, False], ids=["to a file", "dangling"])
def test_a_symlink_is_refused_and_its_target_untouched(tmp_path, target_exists):
    target = tmp_path / "elsewhere"
    if target_exists:
        target.write_text("")
        target.chmod(0o644)
    link = tmp_path / "auth_token"
    link.symlink_to(target)
    assert_refused(make_token(link), "is a symlink")
    assert link.is_symlink() and os.readlink(link) == str(target)
    if target_exists:
        assert target.read_text() == "" and stat.S_IMODE(target.stat().st_mode) == 0o644
    else:
        assert not target.exists()
    assert no_leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("content", ["", "their-token"], ids=["empty", "non-empty"])
def test_a_file_of_another_user_is_refused(tmp_path, content):
    planted = tmp_path / "auth_token"
    planted.write_text(content)
    planted.chmod(0o666)
    os.chown(planted, NOBODY, NOBODY)
    assert_refused(make_token(planted), "belongs to another user")
    assert planted.read_text() == content and planted.stat().st_uid == NOBODY
    assert stat.S_IMODE(planted.stat().st_mode) == 0o666
    assert no_leftovers(tmp_path) == []


def test_a_directory_is_refused(tmp_path):
    assert_refused(make_token(tmp_path), "is not a regular file")
    assert os.listdir(tmp_path) == []


def test_a_long_path_is_shortened_in_the_message(tmp_path):
    link = tmp_path / ("x" * 250)
    link.symlink_to(tmp_path / "elsewhere")
    completed = make_token(link)
    assert_refused(completed, "is a symlink")
    assert len(completed.stderr) < 300
