"""The bounded wait for training workers (`scaling.reschedule_timeout_s`): at the start and after a
failure, Ray Train waits for the cluster to fit the workers; imgcls never lets it wait forever.

Ray Train 2.60 has a knob for part of it: one worker-group start waits at most
`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` for its placement group, but then retries without end
(`FailureConfig.controller_failure_limit` -1), and an elastic group below `min_workers` waits without
any timeout. So each start attempt is bounded by that variable, and `ScheduleDeadline`, a callback in
Ray Train's controller, fails the run once the workers have been waiting longer than the bound; the
driver then explains, in one paragraph, what the cluster lacks (`not_scheduled_message`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ray.train.v2._internal.execution.callback import ControllerCallback

logger = logging.getLogger(__name__)

START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# One start attempt of a fixed-size group: Ray's own default. The deadline is checked between attempts.
FIXED_START_ATTEMPT_S = 60.0
# An elastic group decides its size from the reservations of Ray's autoscaling coordinator, refreshed
# every 20 s: a size decided from a view that still holds a just-lost node must give up soon and decide again.
ELASTIC_START_ATTEMPT_S = 30.0
# Controller states in which no worker group is running and one is being decided or started.
WAITING_STATES = {"INITIALIZING", "SCHEDULING", "RESCHEDULING", "RESTARTING", "RESIZING"}
# The loggers of Ray Train's controller that report a callback's error and a failed start attempt.
CONTROLLER_LOGGERS = ("ray.train.v2._internal.execution.callback_manager", "ray.train.v2._internal.execution.controller.controller")
# Ray's elastic policy re-decides in a loop without pause while too few workers fit (a core busy in
# the controller, measured here): pace it.
UNCHANGED_DECISION_PAUSE_S = 0.5


class WorkersNotScheduled(Exception):
    """Raised in the controller when the workers waited longer than the bound; carries what the
    driver needs for its message (the run fails with it, Ray Train does not retry it)."""

    def __init__(self, waited_s: float, timeout_s: float):
        super().__init__(f"training workers not scheduled for {waited_s:.0f} s (the bound is {timeout_s:g} s)")
        self.waited_s, self.timeout_s = waited_s, timeout_s

    def __reduce__(self):
        return (self.__class__, (self.waited_s, self.timeout_s))


class _WaitingTracebacks(logging.Filter):
    """Ray Train's controller logs the deadline's error, and every start attempt that timed out,
    with a traceback: the deadline's is left to the driver's one paragraph, and a timed-out attempt
    (one per FIXED_START_ATTEMPT_S while the workers wait) is one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, WorkersNotScheduled):
            return False
        if isinstance(error, WorkerGroupStartupTimeoutError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "no room in the cluster for the %d training workers yet; still waiting", (error.num_workers,), None, None
            )  # fmt: skip
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ScheduleDeadline(ControllerCallback):
    """Fails the run when no worker group has been running for `timeout_s` since the controller
    started or the last group stopped (a lost worker or node, a resize)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.waiting_since: float | None = None

    def after_controller_start(self, train_run_context) -> None:
        for name in CONTROLLER_LOGGERS:
            logging.getLogger(name).addFilter(_WaitingTracebacks())
        self.waiting_since = time.monotonic()

    def after_controller_state_update(self, previous_state, current_state) -> None:
        state = current_state._state_type.state_name
        if state not in WAITING_STATES:
            self.waiting_since = None
            return
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
        elif now - self.waiting_since > self.timeout_s:
            raise WorkersNotScheduled(now - self.waiting_since, self.timeout_s)
        if current_state is previous_state:
            time.sleep(UNCHANGED_DECISION_PAUSE_S)


def start_attempt_seconds(timeout_s: float, elastic: bool) -> float:
    return min(timeout_s, ELASTIC_START_ATTEMPT_S if elastic else FIXED_START_ATTEMPT_S)


@contextmanager
def worker_group_start_timeout(seconds: float) -> Iterator[None]:
    """Ray Train reads the start timeout from the environment and passes it from the driver to its
    controller when the run starts: set it for the run, and put back what was there."""
    earlier = os.environ.get(START_TIMEOUT_VARIABLE)
    os.environ[START_TIMEOUT_VARIABLE] = f"{seconds:g}"
    try:
        yield
    finally:
        if earlier is None:
            os.environ.pop(START_TIMEOUT_VARIABLE, None)
        else:
            os.environ[START_TIMEOUT_VARIABLE] = earlier


def find_not_scheduled(error: BaseException) -> WorkersNotScheduled | None:
    """The deadline's error inside Ray Train's ControllerError, if that is why the run failed."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WorkersNotScheduled):
            return error
        error = getattr(error, "controller_failure", None) or error.__cause__
    return None


def _bundle(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"


def not_scheduled_message(error: WorkersNotScheduled, plan, checkpoints_uri: str, known_nodes: set[str]) -> str:
    """One paragraph: what the workers need, what the cluster has now (Ray's own view, including
    the nodes of `known_nodes` that are gone), and what to do."""
    from imgcls.platform.ray_runtime import cluster_state

    needed = _bundle(plan.resources_per_worker())
    if plan.elastic:
        wanted = (
            f"at least scaling.min_workers={plan.fewest_workers} of the {plan.num_workers} training workers ({needed} each)"
        )
    else:
        wanted = f"the {plan.num_workers} training workers ({plan.num_workers} x {needed})"
    try:
        now = cluster_state(known_nodes)
    except Exception as failure:  # the explanation must never hide the failure itself
        now = f"the cluster's state could not be read ({type(failure).__name__}: {failure})"
    return (
        f"Training stopped: {wanted} could not be scheduled for {error.waited_s:.0f} s "
        f"(scaling.reschedule_timeout_s={error.timeout_s:g}); {now}. The checkpoints stay in {checkpoints_uri}: "
        "run the same command again to resume from the latest once the cluster has room for the workers"
        + ("." if plan.elastic else ", or set scaling.min_workers to continue with fewer workers.")
    )
