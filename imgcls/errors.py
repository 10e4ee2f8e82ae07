"""Errors a user can cause and fix: the CLI turns them into exit code 2 and one paragraph, no traceback.

Also the two helpers every such message uses on what the user gave: `shorten` (a value is never echoed
at length: a hostile or mistaken input can be megabytes) and `redact` (a password in a URL never is).
Standard library only, so that any module can import this one.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Characters of one input value that a message shows at most.
SHOWN_VALUE_LIMIT = 200

# The userinfo of a URL (`scheme://user:password@`): everything between `://` and the last `@` of the
# authority, which ends at `/`, `?`, `#` or whitespace. Greedy, so a password holding an unencoded `@`
# is masked whole.
# The scheme's length is bounded: unbounded, a long run of letters made the search quadratic (a
# 100,000-character value took 40 s to mask).
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]{0,31}://)[^/?#\s]*@")


class UserError(Exception):
    """A problem with the user's input (config, paths, data) rather than a bug in imgcls."""


class JobFailedError(Exception):
    """The job could not finish for a reason outside its input: the cluster lost what the run needed,
    or made no progress for the stall limit. The CLI exits 1 with this one paragraph (no traceback);
    what was committed before stays, and a rerun continues from there."""


class JobStalledError(JobFailedError):
    """No image completed for the stall limit (`stall_timeout_s`)."""


class DriftDetectedError(Exception):
    """A bulk run that finished and committed its rows, but whose images do not look like the model's
    validation images (with --fail-on-drift): exit 3, so a schedule can alert."""


class ConfigError(UserError):
    """The configuration file or a `--set` override is invalid."""


class DataError(UserError):
    """The data set is missing, empty or unusable."""


class ResourcePlanError(UserError):
    """The requested workers and CPUs cannot run on this Ray cluster."""


def redact(text: str) -> str:
    """`text` with the userinfo of every URL masked: `scheme://user:password@host` -> `scheme://***@host`."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def clip(text: str, limit: int = SHOWN_VALUE_LIMIT) -> str:
    """Plain `text` for a message (no quotes added): credentials in URLs masked, then cut to `limit`
    characters, saying how long it was when cut."""
    text = redact(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def shorten(value: object, limit: int = SHOWN_VALUE_LIMIT) -> str:
    """`repr(value)` for a message: credentials in URLs masked, and at most `limit` characters, with an
    ellipsis and the original length when cut. Masking comes first, so a cut can never leave part of a
    password behind with the `@` that marks it cut off."""
    text = redact(repr(value))
    if len(text) <= limit:
        return text
    length = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit]}… ({length:,} characters)"


class StorageError(UserError):
    """A bucket, endpoint or folder that cannot be reached, read or written: the user's to fix."""


class OutputBusyError(UserError):
    """Another run holds the output's lease."""


class ExportError(UserError):
    """The model cannot be exported as asked: a layer the format cannot express, an export that does not
    reproduce the model, or the export extra (`pip install imgcls[export]`) not installed."""


# How a traceback's last line names one of our errors, e.g. "imgcls.errors.UserError: No model.keras ...".
_ERROR_LINE = re.compile(r"^imgcls\.errors\.(\w+): (.+)$", re.MULTILINE)


def user_error_in(error: BaseException | str) -> UserError | JobFailedError | None:
    """The user's error inside a Ray error (or its text), if that is what it is. A Ray task, actor or
    Tune trial that failed on a user error reaches the driver wrapped in Ray's own exception, which
    keeps only the text of the traceback; recover the message, so the job exits 2 with one paragraph
    instead of 1 with Ray's stack. Ray Train hands over its workers' exceptions themselves (its
    message holds only a snippet of their tracebacks, cut in the middle when long)."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        if isinstance(failure, UserError):
            return failure
    for name, message in reversed(_ERROR_LINE.findall(str(error))):
        kind = getattr(sys.modules[__name__], name, None)
        if isinstance(kind, type) and issubclass(kind, (UserError, JobFailedError)):
            return kind(message)
    return None


@contextmanager
def user_errors_from_ray() -> Iterator[None]:
    """A user error raised inside a Ray task, actor or Ray Train worker comes out of this block as
    itself (see `user_error_in`); every other error passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        raise user_error from None
