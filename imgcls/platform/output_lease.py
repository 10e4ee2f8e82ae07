"""One writer per output: a lease in `output/_lock`, taken before staging and held until the commit.

The lease is a small JSON record (run id, host, process, expiry). It is taken by an atomic
create-if-absent: `O_CREAT | O_EXCL` on a file system, a conditional PUT (`If-None-Match: *`) on an
object store (AWS S3 since 2024, moto, MinIO and Ceph RGW honour it). The holder renews it every
ttl/4 from a heartbeat thread, so a lease outlives its run only by its ttl: a killed run's lease
expires and the next run takes it over. A lease whose process is gone from this same machine is
taken over at once. Takeover and renewal are compare-and-swap operations: a PUT with `If-Match`
on the ETag read, on an object store; on a file system, under a short-lived `_lock.update` mutex
(also O_EXCL) so that no two processes rewrite the lease at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from imgcls.errors import OutputBusyError, UserError
from imgcls.platform import storage

logger = logging.getLogger(__name__)

LOCK_FILE = "_lock"
UPDATE_MUTEX = "_lock.update"
# A file-system update mutex older than this was left by a process killed mid-update.
STALE_MUTEX_SECONDS = 30.0
POLL_SECONDS = 0.5


class LeaseLostError(RuntimeError):
    """This run's lease expired and another run took it over: it must not commit."""


class LeaseRecord(BaseModel):
    run_id: str
    host: str
    pid: int
    process_started: str | None = None
    acquired_at: float
    expires_at: float
    ttl_s: float

    def is_expired(self, now: float) -> bool:
        return self.expires_at <= now

    def process_is_gone(self) -> bool:
        """True only when the holder ran on this machine and its process no longer exists (or its pid
        now belongs to another process). A holder on another machine is judged by expiry alone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return self.process_started is not None and _process_start(self.pid) != self.process_started


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


@dataclass
class _Held:
    record: LeaseRecord
    etag: str | None = None  # object stores: the ETag of our lease object


class OutputLease:
    """`with OutputLease(output, run_id, ttl_s, wait_s):` holds the output for one run."""

    def __init__(self, output: storage.Location, run_id: str, ttl_s: float, wait_s: float = 0.0):
        self.output = output
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.lock = output.join(LOCK_FILE)
        self._held: _Held | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._backend = _LocalBackend(self) if output.is_local else _ObjectStoreBackend(self)

    # The lease's life: acquire, heartbeat, verify before committing, release.
    def __enter__(self) -> "OutputLease":
        self.acquire()
        self._heartbeat = threading.Thread(target=self._beat, name="imgcls-lease-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, *exception) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        self.release()

    def new_record(self) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(
            run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(), process_started=_process_start(os.getpid()),
            acquired_at=now, expires_at=now + self.ttl_s, ttl_s=self.ttl_s,
        )  # fmt: skip

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._backend.try_acquire()
            if holder is None:
                logger.debug("holding the output lease %s (ttl %g s)", self.lock.uri, self.ttl_s)
                return
            if time.monotonic() >= deadline:
                raise OutputBusyError(
                    f"Output {self.output.uri} is being written by run {holder.run_id} (process {holder.pid} on "
                    f"{holder.host}; its lease in {self.lock.uri} expires in {max(0.0, holder.expires_at - time.time()):.0f} s "
                    "unless renewed). One run writes an output at a time: wait for it to finish, or give this run "
                    "--set lock_wait_s=SECONDS to wait."
                )
            time.sleep(POLL_SECONDS)

    def verify(self) -> None:
        """Raise LeaseLostError unless this run still holds the lease (called before each commit)."""
        if self._lost is None:
            holder = self._backend.read()
            record = holder[0] if holder else None
            if record is None or record.run_id != self.run_id:
                self._lost = "the lease file names another run" if record else "the lease file is gone or unreadable"
        if self._lost is not None:
            raise LeaseLostError(f"run {self.run_id} lost its lease on {self.output.uri}: {self._lost}; nothing committed")

    def release(self) -> None:
        if self._held is not None and self._lost is None:
            try:
                self._backend.release()
            except (OSError, UserError) as error:
                logger.warning("could not release the output lease %s: %s (it expires by itself)", self.lock.uri, error)
        self._held = None

    def _beat(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                if not self._backend.renew():
                    self._lost = "another run took it over after it expired"
                    logger.error("run %s lost its output lease %s: %s", self.run_id, self.lock.uri, self._lost)
                    return
            except (OSError, UserError) as error:  # a passing storage fault: the next beat tries again
                logger.warning("could not renew the output lease %s: %s", self.lock.uri, error)


def _parse(data: bytes) -> LeaseRecord | None:
    try:
        return LeaseRecord.model_validate(json.loads(data))
    except (ValueError, ValidationError):
        return None  # half-written or foreign: treated as an expired lease after its file's age


def _is_takeable(holder: LeaseRecord | None) -> bool:
    return holder is None or holder.is_expired(time.time()) or holder.process_is_gone()


class _LocalBackend:
    """Lease on a (local or network) file system."""

    def __init__(self, lease: OutputLease):
        self.lease = lease
        self.path = lease.lock.path
        self.mutex = lease.output.join(UPDATE_MUTEX).path

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def read(self) -> tuple[LeaseRecord, None] | None:
        try:
            with open(self.path, "rb") as handle:
                record = _parse(handle.read(64 * 1024))
        except FileNotFoundError:
            return None
        return (record, None) if record else None

    def try_acquire(self) -> LeaseRecord | None:
        """None when acquired, else the holder."""
        os.makedirs(self.lease.output.path, exist_ok=True)
        record = self.lease.new_record()
        data = record.model_dump_json().encode()
        if self._create_exclusive(self.path, data):
            self.lease._held = _Held(record)
            return None
        with self._update_mutex() as have_mutex:
            if not have_mutex:
                return self._holder_or_placeholder()
            holder = self.read()
            if holder is not None and not _is_takeable(holder[0]):
                return holder[0]
            if holder is None and not self._unreadable_lease_is_stale():
                return self._holder_or_placeholder()
            self._replace(data)
            logger.warning(
                "took over the output lease %s from run %s (%s)", self.lease.lock.uri,
                holder[0].run_id if holder else "unknown",
                "its process is gone" if holder and not holder[0].is_expired(time.time()) else "it had expired",
            )  # fmt: skip
            self.lease._held = _Held(record)
            return None

    def renew(self) -> bool:
        with self._update_mutex() as have_mutex:
            if not have_mutex:
                return True  # someone is mid-update; the next beat renews
            holder = self.read()
            if holder is None or holder[0].run_id != self.lease.run_id:
                return False
            record = self.lease._held.record.model_copy(update={"expires_at": time.time() + self.lease.ttl_s})
            self._replace(record.model_dump_json().encode())
            self.lease._held.record = record
            return True

    def release(self) -> None:
        with self._update_mutex() as have_mutex:
            holder = self.read()
            if have_mutex and holder is not None and holder[0].run_id == self.lease.run_id:
                os.unlink(self.path)

    def _replace(self, data: bytes) -> None:
        temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def _unreadable_lease_is_stale(self) -> bool:
        try:
            return time.time() - os.stat(self.path).st_mtime > self.lease.ttl_s
        except FileNotFoundError:
            return True

    def _holder_or_placeholder(self) -> LeaseRecord:
        holder = self.read()
        if holder is not None:
            return holder[0]
        return LeaseRecord(run_id="(unreadable lease)", host="?", pid=0, acquired_at=0, expires_at=time.time() + 1, ttl_s=1)

    def _update_mutex(self):
        return _FileMutex(self.mutex, self._create_exclusive)


class _FileMutex:
    """An O_EXCL file held for the few milliseconds of one lease update."""

    def __init__(self, path: str, create_exclusive):
        self.path = path
        self.create_exclusive = create_exclusive
        self.held = False

    def __enter__(self) -> bool:
        deadline = time.monotonic() + 5
        while True:
            if self.create_exclusive(self.path, str(os.getpid()).encode()):
                self.held = True
                return True
            try:
                if time.time() - os.stat(self.path).st_mtime > STALE_MUTEX_SECONDS:
                    os.unlink(self.path)  # left by a process killed mid-update
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def __exit__(self, *exception) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class _ObjectStoreBackend:
    """Lease on an S3-compatible store, by conditional PUTs."""

    def __init__(self, lease: OutputLease):
        self.lease = lease
        self.bucket, _, self.key = lease.lock.path.partition("/")

    @property
    def client(self):
        return storage.s3_client(self.lease.output.endpoint_url)

    def _precondition_failed(self, error) -> bool:
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    @staticmethod
    def _if_match(etag: str) -> str:
        # Ceph RGW (16.x) compares If-Match with its stored ETag, which has no quotes, so a quoted one
        # never matches; moto takes either (ignoring quotes as, its authors note, AWS S3 does).
        return etag.strip('"')

    def _put(self, record: LeaseRecord, **condition) -> str | None:
        """The new ETag, or None when the condition did not hold."""
        from botocore.exceptions import ClientError

        with storage.user_facing_errors(self.lease.lock, "write the lease"):
            try:
                response = self.client.put_object(
                    Bucket=self.bucket, Key=self.key, Body=record.model_dump_json().encode(), **condition
                )
            except ClientError as error:
                if self._precondition_failed(error):
                    return None
                raise
        return response["ETag"]

    def read(self) -> tuple[LeaseRecord | None, str] | None:
        from botocore.exceptions import ClientError

        with storage.user_facing_errors(self.lease.lock, "read the lease"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return _parse(response["Body"].read(64 * 1024)), response["ETag"]

    def try_acquire(self) -> LeaseRecord | None:
        record = self.lease.new_record()
        etag = self._put(record, IfNoneMatch="*")
        if etag is None:
            holder = self.read()
            if holder is None:
                return self.try_acquire()  # released in between: try again
            current, current_etag = holder
            if current is not None and not _is_takeable(current):
                return current
            # Compare-and-swap on the ETag read: of two runs taking over at once, one wins.
            etag = self._put(record, IfMatch=self._if_match(current_etag))
            if etag is None:
                return current or record
            logger.warning("took over the output lease %s from run %s", self.lease.lock.uri, current.run_id if current else "unknown")
        self.lease._held = _Held(record, etag)
        return None

    def renew(self) -> bool:
        held = self.lease._held
        record = held.record.model_copy(update={"expires_at": time.time() + self.lease.ttl_s})
        etag = self._put(record, IfMatch=self._if_match(held.etag))
        if etag is None:
            return False
        held.record, held.etag = record, etag
        return True

    def release(self) -> None:
        from botocore.exceptions import ClientError

        # Ceph RGW (16.x) ignores If-Match on DELETE: without this look first, a run that lost its
        # lease unawares would delete the lease of the run that took it over.
        holder = self.read()
        if holder is None or holder[0] is None or holder[0].run_id != self.lease.run_id:
            return
        with storage.user_facing_errors(self.lease.lock, "release the lease"):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._if_match(self.lease._held.etag))
            except ClientError as error:
                if not self._precondition_failed(error):
                    raise
