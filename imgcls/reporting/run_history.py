"""The run records of a predictions output, read for reporting: each record that validates, with its
monitoring, drift and review sections where it has them, in the order the runs started."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from imgcls.errors import clip
from imgcls.monitoring.summaries import DriftReport, ReviewRecord, RunMonitoring
from imgcls.platform import storage
from imgcls.platform.output_runs import RUNS, RunRecord

logger = logging.getLogger(__name__)

# Bytes of one run record read at most: a record with thousands of chunks is a few MB; anything far
# larger is not one of ours.
MAX_RECORD_BYTES = 64 * 1024 * 1024

Section = TypeVar("Section", bound=BaseModel)


@dataclass(frozen=True)
class ReportedRun:
    """One run as the report sees it. `started` is the run's start in UTC, without a time zone."""

    record: RunRecord
    started: datetime
    monitoring: RunMonitoring | None
    drift: DriftReport | None
    review: ReviewRecord | None

    @property
    def errored_share(self) -> float | None:
        """Share of the run's images that could not be read: the monitoring section's, else from the
        record's counts (runs written before monitoring); None for a run that did not finish."""
        if self.monitoring is not None:
            return self.monitoring.errored_share
        classified, errored = self.record.classified, self.record.errored
        if classified is None or errored is None or classified + errored == 0:
            return None
        return errored / (classified + errored)

    @property
    def committed_rows(self) -> int:
        """Rows the run committed (readable and errored images alike)."""
        return sum(chunk.rows for chunk in self.record.chunks)


SECTIONS = {"monitoring": RunMonitoring, "drift": DriftReport, "review": ReviewRecord}


def run_section(run_id: str, name: str, value: object, model: type[Section]) -> Section | None:
    """A record's section `name` as `model`, or None when it has none or it does not validate (said
    once: the rest of the run still counts in the report)."""
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError as error:
        logger.warning("run %s: its %s section is left out: %s", clip(run_id), name, clip(str(error), 300))
        return None


def started_utc(started: str) -> datetime:
    """A record's `started` (ISO 8601) in UTC, naive; a time without a zone is taken as UTC."""
    moment = datetime.fromisoformat(started)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def read_runs(output: storage.Location) -> tuple[list[ReportedRun], int]:
    """Every run record under `output/_runs/`, in the order the runs started, and how many files
    there were left out (unreadable, not JSON, not a run record: each with a warning)."""
    folder = output.join(RUNS)
    names = sorted(name for name in storage.iter_files(folder) if "/" not in name and name.endswith(".json"))
    runs: list[ReportedRun] = []
    for name in names:
        location = folder.join(name)
        try:
            values = json.loads(storage.read_object(location, MAX_RECORD_BYTES))
            # The sections on their own: one that does not validate leaves the rest of the run in.
            sections = {name: values.pop(name, None) for name in SECTIONS} if isinstance(values, dict) else {}
            record = RunRecord.model_validate(values)
            started = started_utc(record.started)
        except (OSError, ValueError) as error:  # ValidationError is a ValueError, and so is bad JSON
            reason = " ".join(str(error).split()) or type(error).__name__
            logger.warning("left %s out of the report: not a run record imgcls can read (%s)", location.uri, clip(reason, 300))
            continue
        found = {name: run_section(record.run_id, name, sections[name], model) for name, model in SECTIONS.items()}
        runs.append(ReportedRun(record=record, started=started, **found))
    runs.sort(key=lambda run: (run.started, run.record.run_id))
    return runs, len(names) - len(runs)
