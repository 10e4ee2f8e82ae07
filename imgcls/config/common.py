"""What every config shares: the strict base model, storage settings, limits, and the one rule for
comparing config locations. Imports no TensorFlow or Ray."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# Bytes read of one image file at most (config key `max_image_bytes`): far above any real photo.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024


# Bounds of `max_image_pixels`: below 32x32 nothing real decodes; above 1e9 pixels (4 GB of RGBA) the
# limit no longer protects a worker's memory.
MIN_IMAGE_PIXELS_LIMIT = 1_024


MAX_IMAGE_PIXELS_LIMIT = 1_000_000_000


# Bounds of each side of `data.image_size`: every batch is batch_size x height x width x channels
# floats, so a side of 100,000 asks Ray for hundreds of GiB before any image is read.
MIN_IMAGE_SIDE = 8


MAX_IMAGE_SIDE = 4096
# Pillow's own decompression-bomb limit, the default of every `max_image_pixels`.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment, and
    no float may be infinite or NaN (YAML's `.inf` and `.nan` would pass every `gt`/`le` bound check
    or poison training silently)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def normalised_uri(uri: str) -> str:
    """`uri` in the one form that comparisons between config locations use (the same resolution as
    `imgcls.platform.storage.resolve`, without touching any filesystem): `file://` dropped; `s3://` and `s3a://`
    URIs as `s3://` plus the rest without trailing slashes, object keys otherwise untouched; local paths
    with `~` expanded, made absolute against `IMGCLS_BASE_DIR` (else the current directory) and
    normalised. Other schemes are only stripped of trailing slashes (storage refuses them later)."""
    scheme, separator, rest = uri.partition("://")
    if separator:
        scheme = scheme.lower()
        if scheme in ("s3", "s3a"):
            return "s3://" + rest.rstrip("/")
        if scheme != "file":
            return f"{scheme}://{rest.rstrip('/')}"
        uri = rest
    path = os.path.expanduser(uri)
    if not os.path.isabs(path):
        path = os.path.join(os.environ.get("IMGCLS_BASE_DIR") or os.getcwd(), path)
    path = os.path.normpath(path)
    # POSIX normpath keeps exactly two leading slashes; for comparisons `//x` is `/x`.
    return "/" + path.lstrip("/") if path.startswith("//") else path


def uri_contains(parent: str, child: str) -> bool:
    """Whether `child` is `parent` or lies below it, on whole path components (`/a` holds `/a/b`, not
    `/ab`). Both are normalised first; an s3:// URI never contains a local path or the reverse."""
    parent, child = normalised_uri(parent), normalised_uri(child)
    if parent == child:
        return True
    prefix = parent if parent.endswith("/") else parent + "/"
    return child.startswith(prefix)


def _usable_output(value: str) -> str:
    """An output location must name a folder of its own: empty would be the current directory by
    accident, and `/` would have a run write (and an overwrite replace) files at the filesystem root."""
    if not value.strip():
        raise ValueError("must not be empty; name the folder the outputs go to")
    if normalised_uri(value) == "/":
        raise ValueError("must not be the root directory (/); name a folder of its own")
    return value


# Error type of a value refused for holding credentials: its input is never shown.
CREDENTIALS_ERROR_TYPE = "credentials_in_url"


# Tries per S3 request, the first included, in both clients' standard retry mode. Between tries they
# wait a jittered exponential backoff capped at 20 s: over the 9 waits at most 111 s (about a minute
# on average) for throttling, and in pyarrow for any error; boto3 waits less after resets and 5xx
# (a 50 ms base: at most 26 s).
DEFAULT_MAX_ATTEMPTS = 10


class StorageConfig(StrictModel):
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (e.g. http://minio:9000) for every s3:// URI. Unset: "
        "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS S3. Credentials never go here: they come "
        "from the standard AWS chain (environment, ~/.aws, instance or pod role).",
    )
    max_attempts: int = Field(
        default=DEFAULT_MAX_ATTEMPTS,
        ge=1,
        le=50,
        description="Tries per S3 request, the first included (1: no retries), in the standard retry mode of "
        "both clients (boto3 and pyarrow's AWS SDK): resets, timeouts, 5xx and throttling (503 SlowDown) are "
        "retried after a jittered exponential backoff capped at 20 s.",
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Seconds one try waits for a connection to the endpoint."
    )
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Seconds one try waits for the endpoint's next bytes (an answer that stalls longer is a "
        "failed try and retried).",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        refuse_credentials_in_url(value, "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return value


def refuse_credentials_in_url(value: str | None, instead: str) -> None:
    """A URL with `user:password@` in its host part is refused, naming the variables to use `instead`."""
    if value and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
        # Its own error type, so that format_validation_error never echoes the value: it holds a secret.
        raise PydanticCustomError(CREDENTIALS_ERROR_TYPE, f"must not contain credentials; use {instead}")


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Whether a reported metric improves downwards (losses) or upwards (everything else)."""
    return "min" if metric.endswith("loss") else "max"
