"""The report job: the trend report of a predictions output (figures of its runs over time, the
latest reviewed run's least certain images, report.md), read from its run records; no Ray, no model."""

from __future__ import annotations

import logging
import time

from pydantic import BaseModel, Field

from imgcls.config import DEFAULT_REPORT_FOLDER, ReportConfig
from imgcls.platform import storage

logger = logging.getLogger(__name__)


class ReportSummary(BaseModel):
    report_uri: str = Field(description="URI of report.md.")
    runs: int = Field(description="Run records the report covers.")
    figures: list[str] = Field(description="URIs of the PNG figures written (the contact sheet last, if any).")
    seconds: float


def run(config: ReportConfig) -> ReportSummary:
    """Write the trend report of `config.output`; raises UserError (DataError, StorageError) for what
    the user can fix: no run records there, a bucket that cannot be read or written."""
    from imgcls.reporting.trend_report import write_trend_report

    started = time.perf_counter()
    storage.configure(config.storage)
    endpoint_url = config.storage.endpoint_url
    output = storage.resolve(config.output, endpoint_url)
    if config.report_dir is not None:
        report_folder = storage.resolve(config.report_dir, endpoint_url)
    else:
        report_folder = output.join(DEFAULT_REPORT_FOLDER)
    report = write_trend_report(output, report_folder, config.contact_sheet_images, endpoint_url)
    summary = ReportSummary(report_uri=report.report_uri, runs=report.runs, figures=report.figures,
                            seconds=round(time.perf_counter() - started, 3))  # fmt: skip
    logger.info("trend report of %d run(s), %d figure(s), %.1f s: %s", summary.runs, len(summary.figures),
                summary.seconds, summary.report_uri)  # fmt: skip
    return summary
