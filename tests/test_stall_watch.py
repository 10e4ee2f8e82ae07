"""The stall watch: a stream that delivers nothing for its limit is stopped with a message, wherever
it blocks (a sleep, a lock wait in C), in the main thread or another; time spent on an item is no stall."""

import threading
import time

import pytest

from imgcls.errors import JobStalledError
from imgcls.platform.stall_watch import StallWatch


def stream_that_blocks(after: int, block):
    yield from range(after)
    block()
    yield "never"


@pytest.mark.parametrize(
    "block",
    [lambda: time.sleep(3600), lambda: threading.Event().wait()],
    ids=["sleeping", "waiting-on-a-lock"],
)
def test_a_stream_that_stops_delivering_raises_with_the_diagnosis(block):
    watch = StallWatch(1.0, "from the test stream", describe=lambda: "the pool needs 1 CPU; the cluster has 0")
    received = []
    started = time.monotonic()
    with pytest.raises(JobStalledError) as raised:
        for item in watch.watch(stream_that_blocks(3, block)):
            received.append(item)
    assert received == [0, 1, 2]
    assert time.monotonic() - started < 30
    message = str(raised.value)
    assert "no progress for 1 s from the test stream" in message and "the cluster has 0" in message
    assert "3 batches had arrived" in message


def test_the_consumers_own_time_is_not_a_stall_and_the_watch_ends_cleanly():
    watch = StallWatch(0.5, "from a slow consumer")
    received = []
    for item in watch.watch(range(3)):
        time.sleep(1.0)  # twice the limit per item, spent by the consumer, not by the stream
        received.append(item)
    assert received == [0, 1, 2]
    time.sleep(1.0)  # no late signal once the stream has ended
    assert watch.items_seen == 3


def test_a_stall_in_another_thread_is_caught_through_the_queue():
    outcome: list[BaseException | list] = []

    def consume() -> None:
        try:
            outcome.append(list(StallWatch(1.0, "off the main thread").watch(stream_that_blocks(2, lambda: time.sleep(3600)))))
        except JobStalledError as error:
            outcome.append(error)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and isinstance(outcome[0], JobStalledError)


def test_a_hanging_diagnosis_does_not_hang_the_stall(monkeypatch):
    import imgcls.platform.stall_watch as stall_watch

    monkeypatch.setattr(stall_watch, "DIAGNOSIS_SECONDS", 1.0)
    watch = StallWatch(0.5, "from the test stream", describe=lambda: time.sleep(3600) or "")
    with pytest.raises(JobStalledError, match="did not answer"):
        list(watch.watch(stream_that_blocks(0, lambda: time.sleep(3600))))


def test_errors_of_the_stream_pass_through_unchanged():
    def failing():
        yield 1
        raise ValueError("broken image batch")

    with pytest.raises(ValueError, match="broken image batch"):
        list(StallWatch(5.0, "x").watch(failing()))
