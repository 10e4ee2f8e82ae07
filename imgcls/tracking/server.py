"""Reaching an MLflow tracking server: the one client factory of this package (MLflow's request
retries bounded), and the check at a job's start that the server answers."""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from imgcls.errors import UserError, clip

logger = logging.getLogger(__name__)

# Seconds the start waits for the server's /health answer: a server that is up answers in milliseconds.
SERVER_CHECK_TIMEOUT_S = 5


# MLflow retries a failed request 7 times with doubling waits and a 120 s timeout: minutes before a
# call fails, which a training's epoch loop must never wait. Bounded here, a refused connection fails
# in about 3 s and a server that stopped answering in about a minute, once (then tracking stops).
# An operator's own values of these variables win.
BOUNDED_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # MLflow prints the run's URL to stdout when a run ends; the job logs it itself at the start.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class _RetryLinesDropped(logging.Filter):
    """urllib3 logs a warning for each retry of an MLflow request; the failure itself is said once."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Retrying") and "/mlflow" in message)


def require_mlflow(uri: str) -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise UserError(
            f"Tracking is on (tracking.mlflow_uri or MLFLOW_TRACKING_URI is {clip(uri)}), but MLflow is not "
            "installed: pip install 'imgcls[tracking]', or unset both to train without tracking."
        )


def create_client(uri: str):
    """An `MlflowClient` of the server at `uri`, its requests' retries bounded for this process."""
    require_mlflow(uri)
    for name, value in BOUNDED_REQUESTS.items():
        os.environ.setdefault(name, value)
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(existing, _RetryLinesDropped) for existing in pool_logger.filters):
        pool_logger.addFilter(_RetryLinesDropped())
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_server(uri: str) -> None:
    """UserError (exit 2) naming `uri` unless an HTTP tracking server answers its /health within
    SERVER_CHECK_TIMEOUT_S. Other URIs (a local `file:` or database store) are checked by their
    first client call."""
    require_mlflow(uri)
    reason = unreachable_reason(uri)
    if reason is not None:
        raise UserError(
            f"The MLflow tracking server {clip(uri)} does not answer ({reason}) within {SERVER_CHECK_TIMEOUT_S} s. "
            "Start it or fix tracking.mlflow_uri (or MLFLOW_TRACKING_URI); unset both to train without tracking."
        )


def unreachable_reason(uri: str) -> str | None:
    """Why the HTTP server at `uri` does not answer /health (refused, timed out, unknown host), or
    None when it answers with any status (whether it lets a job in, the first real call says)."""
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    # The userinfo stays out of the request and of every message (MLflow reads credentials elsewhere).
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=SERVER_CHECK_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as error:
        return clip(str(getattr(error, "reason", None) or error))
