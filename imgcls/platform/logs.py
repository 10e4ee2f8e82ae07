"""One logging format for drivers and Ray workers."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(handler, "_imgcls", False) for handler in root.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._imgcls = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("imgcls").setLevel(level)


def configure_worker_logging() -> None:
    """In a Ray worker (a training worker, a Tune trial): Ray already forwards worker log records to
    the driver when the worker has a handler; only add ours when it has none."""
    if logging.getLogger().handlers:
        logging.getLogger("imgcls").setLevel(logging.INFO)
    else:
        configure_logging()
