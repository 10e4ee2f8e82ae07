"""Never a silent hang: a pipeline that delivers nothing for `timeout_s` is stopped with a message.

A Ray Data pipeline whose cluster lost a node can wait forever for resources that are gone (Ray
retries lost tasks without limit and waits for room for its planned actors). `StallWatch.watch`
wraps the stream of results: a watcher thread measures how long the consumer has been waiting for
the next item, and after `timeout_s` interrupts the wait in the main thread (a signal delivered to
it, so that even a blocking `ray.get` returns), closes the stream (Ray Data stops its executor) and
raises `JobStalledError` with what was waiting for what. Time the consumer spends on an item
(writing, committing) is not a stall of the pipeline.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from imgcls.errors import JobStalledError

logger = logging.getLogger(__name__)

Item = TypeVar("Item")

# Seconds the diagnosis of a stall may take (it asks Ray's GCS about nodes and resources): a cluster
# too broken to answer must not turn the stall into a hang of its own.
DIAGNOSIS_SECONDS = 15.0
WAKE_SIGNAL = signal.SIGUSR1


class _NoProgress(BaseException):
    """Raised in the main thread by the watcher's signal. A BaseException, like KeyboardInterrupt,
    so that no library's `except Exception` swallows it on its way out."""


class StallWatch:
    """`watch(items)` yields `items` and raises JobStalledError after `timeout_s` seconds without one.

    `describe()` says what the pipeline was waiting for (called once, on a stall, with a time bound)."""

    def __init__(self, timeout_s: float, what: str, describe: Callable[[], str] | None = None) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.describe = describe
        self.items_seen = 0
        self._waiting_since: float | None = None
        self._stalled = threading.Event()
        self._done = threading.Event()
        self._diagnosis = ""

    def watch(self, items: Iterable[Item]) -> Iterator[Item]:
        if threading.current_thread() is not threading.main_thread():
            yield from self._watch_through_queue(iter(items))
            return
        iterator = iter(items)
        previous = signal.signal(WAKE_SIGNAL, self._on_signal)
        watcher = threading.Thread(target=self._watch_for_main, name="imgcls-stall-watch", daemon=True)
        watcher.start()
        try:
            while True:
                self._waiting_since = time.monotonic()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                except _NoProgress:
                    self._close(iterator)
                    raise self._error() from None
                finally:
                    self._waiting_since = None
                self.items_seen += 1
                yield item
        finally:
            self._done.set()
            watcher.join(timeout=5)
            signal.signal(WAKE_SIGNAL, previous)

    def _on_signal(self, signum, frame) -> None:
        # Only while the main thread waits on the stream: a late signal must not hit other code.
        if self._stalled.is_set() and self._waiting_since is not None:
            raise _NoProgress()

    def _watch_for_main(self) -> None:
        main = threading.main_thread()
        while not self._done.wait(timeout=min(1.0, self.timeout_s / 4)):
            waiting_since = self._waiting_since
            if waiting_since is None or time.monotonic() - waiting_since < self.timeout_s:
                continue
            self._diagnosis = self._diagnose()
            self._stalled.set()
            # Repeated until the main thread takes it: a signal that arrives between two checks of a
            # C extension's loop could be absorbed once.
            while not self._done.is_set() and self._waiting_since is not None:
                signal.pthread_kill(main.ident, WAKE_SIGNAL)
                if self._done.wait(timeout=2.0):
                    return
            return

    def _watch_through_queue(self, iterator: Iterator[Item]) -> Iterator[Item]:
        """Outside the main thread no signal can reach the consumer: the stream is read by a thread
        of its own and handed over through a queue that the consumer waits on with the limit."""
        handover: queue.Queue = queue.Queue(maxsize=1)
        finished = object()

        def produce() -> None:
            try:
                for item in iterator:
                    handover.put((item, None))
                handover.put((finished, None))
            except BaseException as error:  # handed to the consumer, which raises it
                handover.put((None, error))

        threading.Thread(target=produce, name="imgcls-stall-watch-reader", daemon=True).start()
        while True:
            try:
                item, error = handover.get(timeout=self.timeout_s)
            except queue.Empty:
                self._diagnosis = self._diagnose()
                raise self._error() from None
            if error is not None:
                raise error
            if item is finished:
                return
            self.items_seen += 1
            yield item

    def _diagnose(self) -> str:
        if self.describe is None:
            return ""
        answer: list[str] = []

        def ask() -> None:
            try:
                answer.append(self.describe())
            except Exception as error:  # a diagnosis must never hide the stall itself
                answer.append(f"(the cluster's state could not be read: {type(error).__name__}: {error})")

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(timeout=DIAGNOSIS_SECONDS)
        return answer[0] if answer else f"(the cluster did not answer within {DIAGNOSIS_SECONDS:g} s)"

    def _error(self) -> JobStalledError:
        message = f"no progress for {self.timeout_s:g} s {self.what} ({self.items_seen} batches had arrived)"
        if self._diagnosis:
            message += f": {self._diagnosis}"
        logger.error("%s", message)
        return JobStalledError(message + ". Committed work is kept; a rerun continues from there.")

    @staticmethod
    def _close(iterator: Iterator) -> None:
        close = getattr(iterator, "close", None)
        if close is None:
            return
        try:
            close()  # Ray Data shuts its executor down when its iterator is closed
        except BaseException as error:  # noqa: BLE001 - the stall is the error to report
            logger.debug("closing the stalled stream: %s", error)
