"""URIs to pyarrow filesystems, streaming listings, and small safe read/write helpers.

Every path in imgcls goes through `resolve`: local paths and `s3://bucket/prefix` URIs on AWS S3 or
any S3-compatible store (MinIO, Ceph). The endpoint comes from the explicit `endpoint_url` (config key
`storage.endpoint_url`) or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`; credentials always come from
the standard AWS chain (environment, shared files, instance or pod role) and are never stored here.

Relative local paths resolve against `IMGCLS_BASE_DIR` when it is set (so a job submitted with
`ray job submit --working-dir .` still writes next to the user's checkout), else the current directory.

Retries and timeouts are the clients' own (standard retry mode, see `StorageConfig`), set once per
process by `configure(config.storage)`: by each job's driver, and where a job's work starts in another
process (the Ray Train worker loop, the decode UDF, the model actor), so that every filesystem and
client made in that process, from whatever call site, uses the job's settings. A filesystem that
Ray pickles (Ray Train's storage filesystem) is rebuilt from the same settings where it lands.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

from imgcls.config.common import StorageConfig
from imgcls.errors import StorageError, UserError, redact, shorten

BASE_DIR_VARIABLE = "IMGCLS_BASE_DIR"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
DEFAULT_REGION = "us-east-1"
# Since 2025 the AWS SDKs send a CRC32 checksum as an aws-chunked trailer on every upload; Ceph RGW
# (16.x) answers that with HTTP 411 on UploadPart, which pyarrow uses for every write. "when_required"
# is the SDKs' behaviour before 2025, what S3-compatible stores expect. pyarrow's SDK reads these from
# the environment when a filesystem is created or unpickled: `s3_filesystem` sets them for a custom
# endpoint (never over the user's own choice), in every process (see S3FileSystem.__reduce__).
S3_COMPATIBLE_CHECKSUMS = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem to use, the path inside it, and the URI users see."""

    filesystem: pafs.FileSystem
    path: str
    endpoint_url: str | None = None

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def uri(self) -> str:
        return self.path if self.is_local else f"s3://{self.path}"

    def join(self, *parts: str) -> "Location":
        if self.is_local:
            return Location(self.filesystem, str(PurePosixPath(self.path, *parts)), self.endpoint_url)
        # Object keys are used exactly as listed: `a//b`, `a/./b` and `a/../b` are three other keys
        # than `a/b`, so nothing here may normalise them.
        return Location(self.filesystem, "/".join([self.path.rstrip("/"), *parts]), self.endpoint_url)

    @property
    def parent(self) -> "Location":
        if self.is_local:
            return Location(self.filesystem, str(PurePosixPath(self.path).parent), self.endpoint_url)
        return Location(self.filesystem, self.path.rsplit("/", 1)[0], self.endpoint_url)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name if self.is_local else self.path.rsplit("/", 1)[-1]


class ClientSettings(NamedTuple):
    """How the S3 clients retry and wait: the retry and timeout keys of a `StorageConfig`, hashable,
    so that filesystems and clients are cached per endpoint, region and settings."""

    max_attempts: int
    connect_timeout_s: float
    request_timeout_s: float

    @classmethod
    def of(cls, config: StorageConfig) -> "ClientSettings":
        return cls(config.max_attempts, config.connect_timeout_s, config.request_timeout_s)


_settings = ClientSettings.of(StorageConfig())


def configure(config: StorageConfig) -> None:
    """Use `config`'s retry and timeout settings for every S3 filesystem and client this process
    makes or looks up from now on (the defaults until a job calls this)."""
    global _settings
    _settings = ClientSettings.of(config)


# pyarrow's messages for failures its retries are for: connection failures and timeouts, throttling, 5xx.
_UNAVAILABLE_MARKERS = re.compile(r"NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|THROTTLING|HTTP status 5\d\d")
# S3's codes for "too many requests" that come with other statuses than 503.
_THROTTLING_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"})


def is_unavailable(error: BaseException) -> bool:
    """Whether the client's error says the endpoint failed (what its retries are for: connection
    failures, timeouts, throttling, 5xx) rather than something about one object."""
    if isinstance(error, OSError) and not _is_botocore_error(error):
        return bool(_UNAVAILABLE_MARKERS.search(str(error)))
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.response.get("Error", {}).get("Code") in _THROTTLING_CODES
    return isinstance(error, (ConnectionError, HTTPClientError))


def _describe_failure(error: BaseException) -> str:
    # A ClientError's response is a dict; urllib3's ReadTimeoutError has `response` too, set to None.
    response = getattr(error, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return shorten(redact(code or str(error) or type(error).__name__), 300)


def storage_error(location: "Location", action: str, error: BaseException) -> StorageError:
    """The user's view of a client's failure: the URI, for object stores the endpoint, the reason,
    and when the endpoint itself kept failing, that the retries ran out."""
    where = "" if location.is_local else f" (endpoint {redact(location.endpoint_url or 'AWS S3 default')})"
    if not location.is_local and is_unavailable(error):
        return StorageError(
            f"Cannot {action} {location.uri}{where}: {_describe_failure(error)}; the endpoint kept failing "
            f"through the retries (storage.max_attempts={_settings.max_attempts}). Check that it is up and reachable "
            "from every node; a run that stopped here can simply be run again."
        )
    return StorageError(
        f"Cannot {action} {location.uri}{where}: {_describe_failure(error)}. Check that the path or bucket "
        "exists, the endpoint is reachable and the credentials allow it."
    )


# How pyarrow's S3 errors read: "When listing objects under key '...' in bucket '...': AWS Error ...".
_PYARROW_S3_FAILURE = re.compile(r"When [^\n]*?: AWS Error [^\n]*")


@contextmanager
def endpoint_failures_named(location: "Location", action: str) -> Iterator[None]:
    """For work that is not imgcls's on `location` (Ray Train reading and writing its checkpoints
    with the filesystem it was given): a failure whose text shows pyarrow's S3 client giving up on a
    failing endpoint becomes a StorageError naming it; anything else passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        texts = [str(error), *map(str, (getattr(error, "worker_failures", None) or {}).values())]
        reasons = [reason for text in texts for reason in _PYARROW_S3_FAILURE.findall(text)]
        if location.is_local or not reasons or not is_unavailable(OSError(reasons[-1])):
            raise
        raise storage_error(location, action, OSError(reasons[-1])) from None


@contextmanager
def user_facing_errors(location: "Location", action: str) -> Iterator[None]:
    """Turn the storage client's exceptions (pyarrow's OSError, botocore's errors) into one
    StorageError that names the URI and, for object stores, the endpoint."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        if not isinstance(error, OSError) and not _is_botocore_error(error):
            raise
        raise storage_error(location, action, error) from None


def _is_botocore_error(error: BaseException) -> bool:
    module = type(error).__module__
    return module.startswith(("botocore", "boto3", "urllib3"))


def endpoint_from_environment() -> str | None:
    for variable in ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def region_from_environment() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


class ConfiguredS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem made from imgcls's settings, and rebuilt from them where it is
    unpickled (Ray Train sends its storage filesystem to the workers and its controller): pyarrow's
    own pickling keeps the timeouts but drops the retry strategy, which would fall back to 3 tries."""

    def __init__(self, endpoint_url: str | None, region: str, settings: ClientSettings):
        # Bounded waits: an unreachable or stalled endpoint fails a try within seconds instead of
        # hanging a job (request_timeout: curl's low-speed limit, on Linux too).
        options: dict[str, object] = {
            "region": region,
            "connect_timeout": settings.connect_timeout_s,
            "request_timeout": settings.request_timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        }
        if endpoint_url:
            parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
            options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            options["scheme"] = parsed.scheme
        super().__init__(**options)
        self.made_from = (endpoint_url, region, settings)

    def __reduce__(self):
        return s3_filesystem, self.made_from


@lru_cache(maxsize=8)
def s3_filesystem(endpoint_url: str | None, region: str, settings: ClientSettings) -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint, region and settings per process. No keys are passed: pyarrow
    reads the AWS credential chain itself, so nothing secret is held or pickled with the filesystem.
    Unpickling comes here too, so a Ray worker gets the checksum setting before its client exists."""
    if endpoint_url:
        for variable, value in S3_COMPATIBLE_CHECKSUMS.items():
            os.environ.setdefault(variable, value)
    return ConfiguredS3FileSystem(endpoint_url, region, settings)


def resolve(uri: str, endpoint_url: str | None = None) -> Location:
    """Map a user URI to a filesystem and path. Local paths become absolute."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("s3", "s3a"):
            path = rest.strip("/")
            if not path:
                raise UserError(f"{uri!r} names no bucket: use s3://bucket/prefix.")
            endpoint = endpoint_url or endpoint_from_environment()
            return Location(s3_filesystem(endpoint, region_from_environment(), _settings), path, endpoint)
        if scheme != "file":
            raise UserError(f"Unsupported storage scheme '{scheme}://' in {uri!r}: use a local path or s3://.")
        uri = rest
    path = Path(os.path.expanduser(uri))
    if not path.is_absolute():
        path = Path(os.environ.get(BASE_DIR_VARIABLE) or os.getcwd()) / path
    return Location(pafs.LocalFileSystem(), os.path.normpath(str(path)))


def exists(location: Location) -> bool:
    with user_facing_errors(location, "look up"):
        return location.filesystem.get_file_info(location.path).type != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    with user_facing_errors(location, "look up"):
        return location.filesystem.get_file_info(location.path).type == pafs.FileType.File


def read_bytes(location: Location) -> bytes:
    if not location.is_local:
        # Through boto3: pyarrow reads an object into a buffer of the object's size, and S3's error
        # body for a 503 does not fit one of a few hundred bytes (a run marker), so the AWS SDK calls
        # that an internal failure and does not retry it.
        bucket, _, key = location.path.partition("/")
        with user_facing_errors(location, "read"):
            return s3_client(location.endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()
    with user_facing_errors(location, "read"), location.filesystem.open_input_stream(location.path) as stream:
        return stream.read()


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Write so that readers see the old object or the whole new one, never a partial one."""
    with user_facing_errors(location, "write"):
        _write_bytes_atomic(location, data)


def _write_bytes_atomic(location: Location, data: bytes) -> None:
    if location.is_local:
        parent = str(PurePosixPath(location.path).parent)
        location.filesystem.create_dir(parent, recursive=True)
        temporary = f"{parent}/.{location.name}.{uuid.uuid4().hex}.tmp"
        with location.filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        location.filesystem.move(temporary, location.path)
    else:
        # An object store makes an upload visible only once it is complete.
        with location.filesystem.open_output_stream(location.path) as stream:
            stream.write(data)


def write_text_atomic(location: Location, text: str) -> None:
    write_bytes_atomic(location, text.encode("utf-8"))


def write_parquet_atomic(location: Location, table) -> None:
    """A small Arrow table as one Parquet file, written atomically."""
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(location, buffer.getvalue())


def s3_client(endpoint_url: str | None):
    """A boto3 client on the same endpoint (thread-safe, one per process and settings), for paged
    listings and for many small concurrent reads, where it outpaces pyarrow's S3 client."""
    return _s3_client(endpoint_url, region_from_environment(), _settings)


@lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, region: str, settings: ClientSettings):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        # botocore's standard mode retries throttling, 5xx, resets and timeouts. `total_max_attempts`
        # counts the first try, as pyarrow's max_attempts does (botocore's `max_attempts` would not).
        config=Config(
            max_pool_connections=32,
            retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.request_timeout_s,
        ),
    )


class FileTooLargeError(OSError):
    """An image file over the configured byte limit: never read whole."""


def read_local_file(path: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of one regular file. A FIFO, device or socket would block or never end:
    they are refused before anything is read. Symlinks are followed, to regular files only (the check
    is on the opened file). The size is checked before reading and counted while reading, since a
    file can grow or its reported size be wrong (/proc)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"not a regular file ({_file_kind(status.st_mode)})")
        if status.st_size > max_bytes:
            raise FileTooLargeError(f"file of {status.st_size} bytes exceeds max_image_bytes ({max_bytes})")
        with os.fdopen(descriptor, "rb", closefd=True) as handle:
            descriptor = -1
            data = handle.read(max_bytes + 1)
    finally:
        if descriptor >= 0:
            os.close(descriptor)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"file grew past max_image_bytes ({max_bytes}) while it was read")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):  # fmt: skip
        if test(mode):
            return kind
    return "not a plain file"


def read_object(location: Location, max_bytes: int) -> bytes:
    """At most `max_bytes` of one file or object; a missing, unreadable or too large one raises
    OSError, as a file would."""
    if location.is_local:
        return read_local_file(location.path, max_bytes)
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = location.path.partition("/")
    try:
        response = s3_client(location.endpoint_url).get_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as error:
        # The client retried this and gave up: the endpoint is down or overloaded, not this object,
        # so the run stops (naming the endpoint) instead of writing or skipping every image as unreadable.
        if is_unavailable(error):
            raise storage_error(location, "read", error) from None
        if isinstance(error, ClientError):
            raise OSError(f"s3://{location.path}: {error.response.get('Error', {}).get('Code', 'error')}") from None
        raise OSError(f"s3://{location.path}: {error}") from None
    body = response["Body"]
    try:
        if response.get("ContentLength", 0) > max_bytes:
            raise FileTooLargeError(
                f"s3://{location.path}: object of {response['ContentLength']} bytes exceeds max_image_bytes ({max_bytes})"
            )
        data = body.read(max_bytes + 1)
    except BotoCoreError as error:  # the body cut off midway, which no client retries: this image's error
        raise OSError(f"s3://{location.path}: {error}") from None
    finally:
        body.close()
    if len(data) > max_bytes:
        raise FileTooLargeError(f"s3://{location.path}: object exceeds max_image_bytes ({max_bytes})")
    return data


def iter_files(root: Location) -> Iterator[str]:
    """Yield the path of every file under `root`, relative to it, one listing page at a time.

    Nothing is read but names: no object bodies, and no second copy of the listing. Object keys
    come back exactly as stored.
    """
    with user_facing_errors(root, "list"):
        yield from _iter_files(root)


def _iter_files(root: Location) -> Iterator[str]:
    if root.is_local:
        for directory, subdirectories, files in os.walk(root.path):
            subdirectories.sort()
            relative_directory = os.path.relpath(directory, root.path)
            for name in sorted(files):
                yield name if relative_directory == "." else f"{relative_directory}/{name}"
        return
    bucket, _, prefix = root.path.partition("/")
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    paginator = s3_client(root.endpoint_url).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": 1000}):
        for item in page.get("Contents", []):
            key = item["Key"]
            if not key.endswith("/"):  # "folder" marker objects
                yield key[len(prefix) :]
