"""One logging format for drivers and Ray workers, and what a person does not need to read.

By default a job prints imgcls's own lines (the plan, data found and skipped, one line per epoch,
checkpoints, the artifact, the summary) and real warnings. TensorFlow's native start-up chatter,
Ray's INFO lines, Ray Train's per-report lines and warnings that are false on imgcls's normal path
stay out; `--verbose` (or `IMGCLS_LOG_LEVEL=DEBUG`) brings all of it back. Ray keeps its own logs
in its session folder either way.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVEL_VARIABLE = "IMGCLS_LOG_LEVEL"

# Warnings that are false on imgcls's normal path, by logger: token auth is on by imgcls's choice,
# and the resource plan keeps CPUs for Ray Data on purpose (a real stall is reported by imgcls itself).
FALSE_ALARMS = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    "ray.data.dataset": "The Dataset job will hang unless more CPUs",
}
# TensorFlow's native (C++) start-up lines on a machine without a GPU: written to the process's
# stderr before any log level applies.
NATIVE_CHATTER = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc|"
    r"cpu_feature_guard\.cc|To enable the following instructions|rebuild TensorFlow with the appropriate|"
    r"oneDNN custom operations|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|"
    r"TF-TRT Warning|cuInit|dso_loader\.cc|port\.cc:\d+\] oneDNN"
)


def verbose() -> bool:
    return os.environ.get(LOG_LEVEL_VARIABLE, "").strip().upper() == "DEBUG"


def set_verbose(on: bool) -> None:
    """`--verbose`: for this process and, through the environment, every process it starts."""
    if on:
        os.environ[LOG_LEVEL_VARIABLE] = "DEBUG"


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the stream of the moment the
    handler was made: a CLI run inside a longer process (a test's captured stderr, later closed)
    must not leave a handler behind that writes to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # Always the current sys.stderr.


class _FalseAlarmFilter(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def configure_logging(level: int | None = None) -> None:
    """imgcls's handler on the root logger, at INFO (DEBUG when verbose), third parties quieted."""
    level = level if level is not None else (logging.DEBUG if verbose() else logging.INFO)
    root = logging.getLogger()
    if not any(getattr(handler, "_imgcls", False) for handler in root.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._imgcls = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("imgcls").setLevel(level)
    quiet_third_parties()


def configure_worker_logging() -> None:
    """In a Ray worker (a training worker, a Tune trial): Ray already forwards worker log records to
    the driver when the worker has a handler; only add ours when it has none."""
    if logging.getLogger().handlers:
        logging.getLogger("imgcls").setLevel(logging.DEBUG if verbose() else logging.INFO)
        quiet_third_parties()
    else:
        configure_logging()


class _ConsoleFilter(logging.Filter):
    """On a console handler: third parties' records below WARNING stay out (their log files under
    Ray's session folder keep them), and so do the false alarms."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Some of Ray's loggers are named by their file's path, not their module.
        third_party = record.name.startswith(THIRD_PARTY_PREFIXES) or f"{os.sep}ray{os.sep}" in record.name
        if third_party and record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        return not any(text in message for text in FALSE_ALARMS.values()) and "Progress bars disabled" not in message


THIRD_PARTY_PREFIXES = ("ray", "tensorflow", "absl", "h5py", "urllib3", "botocore", "filelock")


def quiet_third_parties() -> None:
    """Idempotent; call again after a library set up its own handlers (Ray Data does on import)."""
    if verbose():
        return
    for name in ("tensorflow", "absl", "h5py", "urllib3", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("", "ray", "ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            file_handler = isinstance(handler, logging.FileHandler) or "File" in type(handler).__name__
            if not file_handler and not any(isinstance(existing, _ConsoleFilter) for existing in handler.filters):
                handler.addFilter(_ConsoleFilter())
    for name, text in FALSE_ALARMS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _FalseAlarmFilter) for existing in logger.filters):
            logger.addFilter(_FalseAlarmFilter(text))


@contextmanager
def native_chatter_filtered() -> Iterator[None]:
    """While TensorFlow starts (its import, the first device probe), hold this process's stderr (file
    descriptor 2, where native code writes) and pass on every line but TensorFlow's start-up chatter.
    Output from other threads meanwhile is delayed, not lost. Verbose: nothing is held."""
    if verbose():
        yield
        return
    held_text: list[str] = []
    try:
        with _stderr_held(held_text):
            yield
    finally:
        kept = [line for line in "".join(held_text).splitlines(keepends=True) if not NATIVE_CHATTER.search(line)]
        if kept:
            os.write(2, "".join(kept).encode())


@contextmanager
def _stderr_held(held_text: list[str]) -> Iterator[None]:
    """File descriptor 2 redirected to a temporary file meanwhile; what was written there is appended
    to `held_text` once the descriptor is back, however the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            held_text.append(held.read().decode(errors="replace"))


def worker_environment() -> dict[str, str]:
    """Environment for Ray workers and actors: the same verbosity, TensorFlow's C++ log level."""
    return {
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0" if verbose() else "2"),
        LOG_LEVEL_VARIABLE: os.environ.get(LOG_LEVEL_VARIABLE, ""),
    }


@contextmanager
def native_output_held() -> Iterator[list[str]]:
    """For a converter that writes pages of its own diagnostics to the process's stderr (TensorFlow's
    MLIR dumps, tf2onnx's warnings): hold file descriptor 2 meanwhile and drop what was written; the
    caller's list receives the text, so a failure can still be explained. Nothing of imgcls's own may
    be logged inside. Verbose: nothing is held."""
    held_text: list[str] = []
    if verbose():
        yield held_text
        return
    with _stderr_held(held_text):
        yield held_text
