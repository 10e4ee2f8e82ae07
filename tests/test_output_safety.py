"""Hostile input and careless operators around bulk prediction, through the real CLI, real files,
FIFOs and processes: no command deletes what imgcls did not write, one writer per output, bounded
reads, failed images retried, one key per image. No Ray: these runs stay in the job's process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT
from image_factory import write_pattern_dataset
from PIL import Image

from imgcls.platform import output_runs, storage
from imgcls.cli import main
from imgcls.errors import OutputBusyError
from imgcls.platform.output_lease import LeaseRecord, OutputLease


def rows(output: Path) -> list[dict]:
    return pads.dataset(str(output), format="parquet").to_table().to_pylist()


def records(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output / "_runs").glob("*.json"))]


def predict(model: str, *arguments: str) -> int:
    return main(["predict", "--model", model, *arguments])


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    write_pattern_dataset(root, per_class=3, seed=3)
    return root


# Rule 1: own what you delete.


def test_overwrite_never_deletes_the_input_inside_the_output(tiny_artifact, tmp_path, capsys):
    output = tmp_path / "out"
    user_images = output / "run-nightly-images"
    write_pattern_dataset(user_images, per_class=2, seed=4)
    before = tree(user_images)
    assert predict(tiny_artifact, "--input", str(user_images), "--output", str(output), "--overwrite") == 2
    assert "overwrite" in capsys.readouterr().err
    # Without --overwrite the input is foreign to the output: refused, and nothing written.
    assert predict(tiny_artifact, "--input", str(user_images), "--output", str(output)) == 2
    assert "did not write" in capsys.readouterr().err
    assert tree(user_images) == before and sorted(path.name for path in output.iterdir()) == ["run-nightly-images"]


def test_same_folder_by_another_spelling_or_a_symlink_is_refused(tiny_artifact, images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(images.parent)
    assert predict(tiny_artifact, "--input", "images", "--output", "./images") == 2
    link = tmp_path / "link"
    link.symlink_to(images)
    capsys.readouterr()
    assert predict(tiny_artifact, "--input", str(images), "--output", str(link)) == 2  # only resolving tells
    assert "input folder itself" in capsys.readouterr().err
    assert len(list(images.rglob("*.png"))) == 6


def test_overwrite_and_cleanup_leave_folders_imgcls_cannot_prove_it_wrote(tiny_artifact, images, tmp_path):
    output = tmp_path / "out"
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 0
    # The user's folders, named like runs, partitions and staging, with no record that names them.
    lookalikes = [output / "run-20260101T000000000Z-deadbeef", output / "day=1" / "run-mine", output / "_staging" / "mine"]
    for folder in lookalikes:
        write_pattern_dataset(folder, per_class=1, seed=5)
    # A run-shaped folder with a marker but no run record is not imgcls's either.
    forged = output / "run-20260102T000000000Z-cafecafe"
    forged.mkdir()
    (forged / "_run.json").write_text(json.dumps({"run_id": "20260102T000000000Z-cafecafe"}))
    before = {str(folder): tree(folder) for folder in [*lookalikes, forged]}
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output), "--overwrite") == 2  # foreign files
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output), "--overwrite", "--allow-foreign-files") == 0
    assert {str(folder): tree(folder) for folder in [*lookalikes, forged]} == before
    latest = records(output)[-1]
    owned = [path.name for path in output.glob("run-*") if (path / "_run.json").exists() and path != forged]
    assert owned == [f"run-{latest['run_id']}"]
    assert len([row for row in rows_of_runs(output) if row["error"] is None]) == 6


def rows_of_runs(output: Path) -> list[dict]:
    files = output_runs.committed_files(storage.resolve(str(output)))
    return pads.dataset(files, format="parquet").to_table().to_pylist()


def test_a_users_parquet_in_the_output_is_refused_or_left_alone(tiny_artifact, images, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    pq.write_table(pa.table({"something": [1, 2, 3]}), output / "mine.parquet")
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 2
    assert "mine.parquet" in capsys.readouterr().err
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output), "--set", "allow_foreign_files=true") == 0
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output), "--set", "allow_foreign_files=true") == 0
    assert [record["already_done"] for record in records(output)] == [0, 6]
    assert pq.read_table(output / "mine.parquet").num_rows == 3


# Rule 2: one writer per output.


def test_a_held_lease_refuses_a_second_run_which_writes_nothing(tiny_artifact, images, tmp_path, capsys):
    output = storage.resolve(str(tmp_path / "out"))
    with OutputLease(output, "20260101T000000000Z-holder00", ttl_s=30):
        assert predict(tiny_artifact, "--input", str(images), "--output", output.path) == 2
        message = capsys.readouterr().err
        assert "being written by run 20260101T000000000Z-holder00" in message and "Traceback" not in message
        assert sorted(path.name for path in Path(output.path).iterdir()) == ["_lock"]
    assert not Path(output.path, "_lock").exists()
    assert predict(tiny_artifact, "--input", str(images), "--output", output.path) == 0


def _write_lease(output: Path, host: str, pid: int, expires_in: float) -> None:
    output.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = LeaseRecord(run_id="20250101T000000000Z-0ldrun00", host=host, pid=pid, acquired_at=now - 60,
                         expires_at=now + expires_in, ttl_s=60)  # fmt: skip
    (output / "_lock").write_text(record.model_dump_json())


def test_an_expired_lease_or_a_dead_holder_is_taken_over(tiny_artifact, images, tmp_path, capsys):
    output = tmp_path / "out"
    _write_lease(output, "another-machine", 1, expires_in=-5)  # expired, elsewhere
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lease(output, socket.gethostname(), dead.pid, expires_in=600)  # alive by expiry, but its process is gone
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 0
    _write_lease(output, "another-machine", 1, expires_in=600)  # live, elsewhere
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 2
    assert "being written by run 20250101T000000000Z-0ldrun00" in capsys.readouterr().err
    assert [record["status"] for record in records(output)] == ["succeeded", "succeeded"]


def test_a_lease_is_renewed_and_a_lost_lease_stops_the_commit(tmp_path):
    output = storage.resolve(str(tmp_path / "out"))
    lease = OutputLease(output, "20260101T000000000Z-renewing", ttl_s=1.2)
    with lease:
        first = json.loads(Path(output.path, "_lock").read_text())["expires_at"]
        time.sleep(1.0)
        assert json.loads(Path(output.path, "_lock").read_text())["expires_at"] > first
        lease.verify()
        _write_lease(Path(output.path), "another-machine", 1, expires_in=600)  # taken over behind its back
        with pytest.raises(RuntimeError, match="lost its lease"):
            lease.verify()
    assert Path(output.path, "_lock").exists(), "a lost lease must not delete the new holder's lock"


def test_two_runs_started_together_write_every_image_once(tiny_artifact, tmp_path):
    images = tmp_path / "images"
    write_pattern_dataset(images, per_class=200, seed=6)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", tiny_artifact,
               "--input", str(images), "--output", str(output)]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), [error[-2000:] for _, _, error in results]
    if codes == [0, 2]:
        assert any("being written by run" in error for code, _, error in results if code == 2)
    table = rows(output)
    assert len(table) == 400 and len({row["path"] for row in table}) == 400
    # Waiting for the lease instead: both runs succeed, the second finds everything done.
    runs = [subprocess.Popen([*command, "--set", "lock_wait_s=120"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    assert len(rows(output)) == 400 and not (output / "_lock").exists()


def test_the_lease_on_an_object_store_is_a_conditional_put(s3_endpoint):
    from conftest import TEST_BUCKET

    output = storage.resolve(f"s3://{TEST_BUCKET}/lease-test/out")
    client = storage.s3_client(output.endpoint_url)
    with OutputLease(output, "20260101T000000000Z-s3holder", ttl_s=30) as lease:
        with pytest.raises(OutputBusyError, match="s3holder"):
            OutputLease(output, "20260101T000000000Z-s3second", ttl_s=30).acquire()
        etag = client.head_object(Bucket=TEST_BUCKET, Key="lease-test/out/_lock")["ETag"]
        assert lease._backend.renew()
        assert client.head_object(Bucket=TEST_BUCKET, Key="lease-test/out/_lock")["ETag"] != etag
        lease.verify()
    assert "Contents" not in client.list_objects_v2(Bucket=TEST_BUCKET, Prefix="lease-test/out/_lock")
    now = time.time()
    expired = LeaseRecord(run_id="20250101T000000000Z-expired0", host="elsewhere", pid=1, acquired_at=now - 90,
                          expires_at=now - 30, ttl_s=60)  # fmt: skip
    client.put_object(Bucket=TEST_BUCKET, Key="lease-test/out/_lock", Body=expired.model_dump_json().encode())
    with OutputLease(output, "20260101T000000000Z-takeover", ttl_s=30):
        body = client.get_object(Bucket=TEST_BUCKET, Key="lease-test/out/_lock")["Body"].read()
        assert json.loads(body)["run_id"] == "20260101T000000000Z-takeover"


# Rule 3: bounded reads; rule 7: a bad row is an error row, never a dead run.


def _sixteen_bit_png(path: Path, side: int) -> None:
    gradient = (np.arange(side, dtype=np.uint32)[None, :] * 65535 // side).astype(np.uint16)
    Image.fromarray(np.repeat(gradient, side, axis=0)).save(path)


PEAK_MEMORY_OF_CHILD = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.timeout(300)
def test_fifos_devices_huge_files_and_16_bit_giants_give_error_rows_with_bounded_memory(tiny_artifact, tmp_path):
    folder = tmp_path / "hostile"
    write_pattern_dataset(folder, per_class=2, seed=7)
    os.mkfifo(folder / "pipe.png")
    (folder / "link-to-pipe.jpg").symlink_to(folder / "pipe.png")
    with open(folder / "huge.png", "wb") as handle:  # 300 MB, sparse: over max_image_bytes, never read
        handle.truncate(300 * 1024 * 1024)
    _sixteen_bit_png(folder / "giant16.png", 9400)
    manifest = tmp_path / "manifest.csv"
    listed = sorted(str(path) for path in folder.rglob("*") if path.suffix in (".png", ".jpg")) + ["/dev/zero"]
    manifest.write_text("path\n" + "\n".join(listed) + "\n")
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", tiny_artifact,
               "--input", str(manifest), "--output", str(output)]  # fmt: skip
    # The job's own peak, measured by a parent of its own: this test process's other children (the
    # daemons of earlier tests in this process) count in its RUSAGE_CHILDREN too.
    completed = subprocess.run([sys.executable, "-c", PEAK_MEMORY_OF_CHILD, *command], capture_output=True, text=True,
                               timeout=240)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    peak_rss = int(completed.stderr.strip().splitlines()[-1].removeprefix("peak_rss_kib ")) * 1024
    table = rows(output)
    errors = {Path(row["path"]).name: row["error"] for row in table}
    assert "not a regular file (a named pipe)" in errors["pipe.png"]
    assert "not a regular file (a named pipe)" in errors["link-to-pipe.jpg"]
    assert "not a regular file (a character device)" in errors["zero"]
    assert "exceeds max_image_bytes" in errors["huge.png"]
    assert errors["giant16.png"] is None  # under the pixel limit: decoded, in bounded memory
    assert len(table) == 9 and sum(row["error"] is None for row in table) == 5
    # TensorFlow and the model take most of it; the 16-bit rescale in float64 alone took 2.5 GB.
    assert peak_rss < 1.8 * 1024**3, f"peak RSS {peak_rss / 1024**3:.2f} GiB"


def test_urls_nul_bytes_and_odd_paths_in_a_manifest_are_error_rows_with_one_key_each(tiny_artifact, images, tmp_path):
    first = sorted(images.rglob("*.png"))[0]
    relative = os.path.relpath(first, tmp_path)
    paths = [
        str(first),
        f"file://{first}",  # the same image by another spelling
        str(first.parent / ".." / first.parent.name / first.name),
        relative,  # beside the manifest
        str(first),  # repeated
        "http://example.invalid/cat.png",
        f"{first}\x00.png",
        str(sorted(images.rglob("*.png"))[1]),
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": paths}), manifest)
    output = tmp_path / "out"
    assert predict(tiny_artifact, "--input", str(manifest), "--output", str(output)) == 0
    table = {row["path"]: row for row in rows(output)}
    assert len(table) == 4 and str(first) in table and table[str(first)]["error"] is None
    assert "Unsupported storage scheme" in table["http://example.invalid/cat.png"]["error"]
    assert "NUL byte" in table[f"{first}\x00.png"]["error"]
    assert records(output)[0]["duplicates_dropped"] == 4


# Rule 6: failed images are retried; the newest row wins.


def test_a_failed_image_succeeds_on_rerun_and_has_one_visible_row(tiny_artifact, images, tmp_path):
    late = images / "horizontal" / "late.png"
    late.write_bytes(b"")  # still being uploaded
    output = tmp_path / "out"
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 0
    assert {row["path"]: row["error"] for row in rows(output)}[str(late)] == "empty file (0 bytes)"
    shutil.copy(images / "horizontal" / "0000.png", late)
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 0
    table = rows(output)
    assert len(table) == 7 and len({row["path"] for row in table}) == 7
    assert all(row["error"] is None for row in table)
    second = records(output)[1]
    assert second["already_done"] == 6 and second["classified"] == 1 and second["superseded_rows"] == 1
    assert predict(tiny_artifact, "--input", str(images), "--output", str(output)) == 0
    assert records(output)[2]["already_done"] == 7 and len(rows(output)) == 7


# Rule 7: storage failures are exit 2 with a message naming the place.


def test_a_missing_bucket_or_an_unreachable_endpoint_exits_2(s3_endpoint, tiny_artifact, images, tmp_path, capsys):
    from conftest import free_port

    assert predict(tiny_artifact, "--input", "s3://no-such-bucket-imgcls/images", "--output", str(tmp_path / "o")) == 2
    message = capsys.readouterr().err
    assert "no-such-bucket-imgcls" in message and "Traceback" not in message
    endpoint = f"http://127.0.0.1:{free_port()}"
    # Two tries: the default ten would spend the retry budget on a port nothing listens on.
    code = predict(tiny_artifact, "--input", "s3://bucket/images", "--output", str(tmp_path / "o"),
                   "--set", f"storage.endpoint_url={endpoint}", "--set", "storage.max_attempts=2")  # fmt: skip
    message = capsys.readouterr().err
    assert code == 2 and endpoint in message and "Traceback" not in message


def test_object_keys_are_used_exactly_as_listed(s3_endpoint, tiny_artifact, images, tmp_path):
    import boto3
    from conftest import TEST_BUCKET

    client = boto3.client("s3")
    png = (images / "vertical" / "0000.png").read_bytes()
    keys = ["odd/a//b.png", "odd/a/./c.png", "odd/a/../d.png", "odd/plain.png"]
    for key in keys:
        client.put_object(Bucket=TEST_BUCKET, Key=key, Body=png)
    from imgcls.data.listing import list_images

    assert list_images(f"s3://{TEST_BUCKET}/odd").paths == sorted(f"s3://{TEST_BUCKET}/{key}" for key in keys)
    output = tmp_path / "out"
    assert predict(tiny_artifact, "--input", f"s3://{TEST_BUCKET}/odd", "--output", str(output)) == 0
    table = rows(output)
    assert sorted(row["path"] for row in table) == sorted(f"s3://{TEST_BUCKET}/{key}" for key in keys)
    assert all(row["error"] is None for row in table)


# Rule 5 through the real CLI: artifacts that do not fit their model are exit 2, never predictions.


def _broken_copy(tiny_artifact: str, tmp_path: Path, edit) -> str:
    copy = tmp_path / "broken-model"
    shutil.copytree(tiny_artifact, copy)
    edit(copy)
    return str(copy)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda root: (root / "model.keras").write_bytes((root / "model.keras").read_bytes()[:5000]), "is damaged"),
        (lambda root: _edit_metadata(root, class_names=[]), "class_names"),
        (lambda root: _edit_metadata(root, image_size=[0, 0]), "image_size"),
        (lambda root: _edit_metadata(root, class_names=["a", "a"]), "class_names"),
        (lambda root: _edit_metadata(root, task="multiclass", class_names=[str(i) for i in range(10)]), "(None, 10)"),
        (lambda root: _edit_metadata(root, image_size=[32, 32]), "image_size [32, 32]"),
    ],
    ids=["truncated", "no-classes", "zero-size", "duplicate-classes", "width-mismatch", "size-mismatch"],
)
def test_artifacts_that_do_not_fit_their_model_exit_2(tiny_artifact, images, tmp_path, capsys, edit, expected):
    model = _broken_copy(tiny_artifact, tmp_path, edit)
    assert predict(model, "--input", str(images), "--output", str(tmp_path / "out")) == 2
    message = capsys.readouterr().err
    assert expected in message and "Traceback" not in message
    assert not list((tmp_path / "out").glob("run-*"))


def _edit_metadata(root: Path, **changes) -> None:
    metadata = json.loads((root / "metadata.json").read_text())
    metadata.update(changes)
    (root / "metadata.json").write_text(json.dumps(metadata))
