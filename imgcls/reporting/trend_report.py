"""The trend report of a predictions output: from its run records, figures of the runs over time, a
contact sheet of the latest reviewed run's least certain images, and report.md tying them together."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from imgcls.errors import DataError, UserError, clip
from imgcls.platform import storage
from imgcls.platform.output_runs import RUNS
from imgcls.reporting import contact_sheet, trend_plots
from imgcls.reporting.run_history import ReportedRun, read_runs

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
IMAGES_PER_NIGHT = "images_per_night.png"
CLASS_SHARES = "class_shares.png"
SCORES_AND_UNKNOWNS = "scores_and_unknowns.png"
DRIFT = "drift.png"
ERROR_SHARE = "error_share.png"
CONTACT_SHEET = "contact_sheet.png"
# The review file's place under an output, tried when the URI the record names cannot be read.
REVIEW_FOLDER = "_review"
# Rows of the table of last runs, and runs named in the note on runs without monitoring.
LAST_RUNS_SHOWN = 20
NOTED_RUNS_SHOWN = 20
NOT_DRAWN = "No run has a {section} section yet (runs of an imgcls before monitoring), so this figure is not drawn."


@dataclass
class TrendReport:
    """What was written: the report's URI, the runs it covers, and the URI of each figure."""

    report_uri: str
    runs: int
    figures: list[str] = field(default_factory=list)


@dataclass
class Figure:
    file: str
    title: str
    png: bytes | None  # None: no run has what it shows
    note: str = ""


def _nightly_counts(runs: list[ReportedRun]) -> tuple[list[date], list[int], list[int], list[int]]:
    classified: dict[date, int] = defaultdict(int)
    errored: dict[date, int] = defaultdict(int)
    unfinished: dict[date, int] = defaultdict(int)
    for run in runs:
        night = run.started.date()
        if run.record.classified is not None:
            classified[night] += run.record.classified
            errored[night] += run.record.errored or 0
        else:
            unfinished[night] += run.committed_rows
    nights = sorted(set(classified) | set(unfinished))
    return nights, [classified[n] for n in nights], [errored[n] for n in nights], [unfinished[n] for n in nights]


def _images_figure(runs: list[ReportedRun]) -> Figure:
    return Figure(IMAGES_PER_NIGHT, "Images per night", trend_plots.images_per_night(*_nightly_counts(runs)),
                  "Images each night's runs classified (UTC date of their start); grey: rows committed by runs "
                  "that did not finish.")  # fmt: skip


def _class_shares_figure(monitored: list[ReportedRun]) -> Figure:
    if not monitored:
        return Figure(CLASS_SHARES, "Class shares", None, NOT_DRAWN.format(section="monitoring"))
    png = trend_plots.class_shares([run.started for run in monitored], [run.monitoring.class_shares for run in monitored])
    return Figure(CLASS_SHARES, "Class shares", png, f"Share of each run's readable images per top-1 label (at most "
                  f"{trend_plots.MAX_CLASSES_SHOWN} classes drawn, the rest summed).")  # fmt: skip


def _scores_figure(monitored: list[ReportedRun]) -> Figure:
    if not monitored:
        return Figure(SCORES_AND_UNKNOWNS, "Scores and unknowns", None, NOT_DRAWN.format(section="monitoring"))
    scores = [run.monitoring.score for run in monitored]
    png = trend_plots.scores_and_unknowns(
        [run.started for run in monitored], [score.mean for score in scores], [score.p25 for score in scores],
        [score.p75 for score in scores], [run.monitoring.below_min_score_share for run in monitored],
    )  # fmt: skip
    return Figure(SCORES_AND_UNKNOWNS, "Scores and unknowns", png, "Mean top score per run (shaded: its p25-p75) "
                  "and the share of images whose top score was below min_score, labelled unknown.")  # fmt: skip


def _drift_figure(runs: list[ReportedRun]) -> Figure:
    tested = [run for run in runs if run.drift is not None]
    if not tested:
        return Figure(DRIFT, "Drift", None, NOT_DRAWN.format(section="drift"))
    png = trend_plots.drift_scores([run.started for run in tested], [run.drift.status for run in tested],
                                   [run.drift.score for run in tested], [run.drift.threshold for run in tested])  # fmt: skip
    note = "Drift score per run against its threshold (dashed): a run above it was flagged."
    reasons: dict[str, int] = defaultdict(int)
    for run in tested:
        if run.drift.score is None:
            reasons[run.drift.status.replace("_", " ")] += 1
    if reasons:
        note += (f" {sum(reasons.values())} run(s) not tested, drawn as hollow markers at zero: "
                 + ", ".join(f"{reason} ({count})" for reason, count in sorted(reasons.items())) + ".")  # fmt: skip
    return Figure(DRIFT, "Drift", png, note)


def _error_share_figure(runs: list[ReportedRun]) -> Figure:
    counted = [run for run in runs if run.errored_share is not None]
    if not counted:
        return Figure(ERROR_SHARE, "Unreadable images", None, "No run has finished with counts yet, so this figure is not drawn.")
    png = trend_plots.error_shares([run.started for run in counted], [run.errored_share for run in counted])
    return Figure(ERROR_SHARE, "Unreadable images", png, "Share of each finished run's images that could not be read or decoded.")


def build_figures(runs: list[ReportedRun]) -> list[Figure]:
    """Each figure of the report, drawn from the runs that have what it shows."""
    monitored = [run for run in runs if run.monitoring is not None]
    return [_images_figure(runs), _class_shares_figure(monitored), _scores_figure(monitored), _drift_figure(runs),
            _error_share_figure(runs)]  # fmt: skip


def latest_review(runs: list[ReportedRun], output: storage.Location, limit: int,
                  endpoint_url: str | None) -> tuple[ReportedRun, list[dict]] | None:  # fmt: skip
    """The latest run whose review file can be read and has rows, with its first `limit` rows by rank."""
    for run in reversed(runs):
        if run.review is None:
            continue
        locations = [output.join(REVIEW_FOLDER, f"{run.record.run_id}.parquet")]
        try:
            locations.insert(0, storage.resolve(run.review.file, endpoint_url))
        except UserError:  # a URI of no scheme imgcls reads: the output's own copy may still be there
            pass
        unique = list({location.uri: location for location in locations}.values())
        rows = contact_sheet.read_review_rows(unique, limit)
        if rows:
            return run, rows
        if rows is None:
            logger.warning("run %s: its review file %s cannot be read; trying the run before", clip(run.record.run_id),
                           clip(run.review.file))  # fmt: skip
    return None


def _cell(value: object) -> str:
    """A value for a Markdown table cell: pipes escaped, one line."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _drift_cell(run: ReportedRun) -> str:
    drift = run.drift
    if drift is None:
        return "—"
    if drift.score is None:
        return drift.status.replace("_", " ")
    status = "**drift**" if drift.detected else drift.status
    return f"{status} {drift.score:.2f}"


def _started(run: ReportedRun) -> str:
    return run.started.strftime("%Y-%m-%d %H:%M")


def _without_monitoring_reason(run: ReportedRun) -> str:
    if run.record.status != "succeeded":
        reason = f"the run did not finish ({run.record.status})"
        return reason + (f": {clip(run.record.error, 200)}" if run.record.error else "")
    return "written by an imgcls before monitoring"


def report_markdown(output_uri: str, runs: list[ReportedRun], figures: list[Figure], skipped_records: int,
                    sheet: tuple[ReportedRun, list[contact_sheet.SheetImage]] | None, sheet_note: str,
                    written: datetime) -> str:  # fmt: skip
    monitored = sum(run.monitoring is not None for run in runs)
    lines = [
        f"# Trend report: {_cell(output_uri)}",
        "",
        f"{len(runs)} run(s) from {_started(runs[0])} to {_started(runs[-1])} UTC, {monitored} with monitoring; "
        f"written {written.strftime('%Y-%m-%d %H:%M')} UTC by `imgcls report`.",
    ]
    if skipped_records:
        lines.append(f"{skipped_records} file(s) under {RUNS}/ are not run records imgcls can read and are left out "
                     "(the job's warnings name them).")  # fmt: skip
    lines += [
        "",
        f"## Last runs{f' (the latest {LAST_RUNS_SHOWN})' if len(runs) > LAST_RUNS_SHOWN else ''}",
        "",
        "| run | started (UTC) | status | images classified | errored share | mean score | drift |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in reversed(runs[-LAST_RUNS_SHOWN:]):
        record = run.record
        classified = "—" if record.classified is None else f"{record.classified:,}"
        mean_score = run.monitoring.score.mean if run.monitoring is not None else None
        lines.append(
            f"| {_cell(record.run_id)} | {_started(run)} | {_cell(record.status)} | {classified} | "
            f"{_share(run.errored_share)} | {'—' if mean_score is None else f'{mean_score:.3f}'} | {_drift_cell(run)} |"
        )
    for figure in figures:
        lines += ["", f"## {figure.title}", ""]
        if figure.png is not None:
            lines += [f"![{figure.title.lower()}]({figure.file})", ""]
        lines.append(figure.note)
    lines += ["", "## Least certain images", ""]
    if sheet is None:
        lines.append(sheet_note)
    else:
        run, images = sheet
        lines += [
            f"The {len(images)} least certain image(s) of run {_cell(run.record.run_id)} (ranked by "
            f"{run.review.ranked_by}; {run.review.rows} in its review file {_cell(run.review.file)}):",
            "",
            f"![contact sheet]({CONTACT_SHEET})",
            "",
            "| rank | label | margin | image |",
            "| --- | --- | --- | --- |",
        ]
        for image in images:
            margin = "—" if image.margin is None else f"{image.margin:.3f}"
            shown = _cell(clip(image.path, 160)) + (" (unreadable)" if image.thumbnail is None else "")
            lines.append(f"| {image.rank} | {_cell(image.label or '—')} | {margin} | {shown} |")
    without = [run for run in runs if run.monitoring is None]
    if without:
        lines += ["", "## Runs without monitoring", ""]
        for run in reversed(without[-NOTED_RUNS_SHOWN:]):
            lines.append(f"- {_cell(run.record.run_id)} ({_started(run)} UTC): {_cell(_without_monitoring_reason(run))}")
        if len(without) > NOTED_RUNS_SHOWN:
            lines.append(f"- and {len(without) - NOTED_RUNS_SHOWN} earlier run(s)")
    return "\n".join(lines) + "\n"


def write_trend_report(output: storage.Location, report_folder: storage.Location, contact_sheet_images: int,
                       endpoint_url: str | None) -> TrendReport:  # fmt: skip
    """Read the output's run records and write the figures, the contact sheet and report.md (last,
    so that the report never names a figure not yet written) to `report_folder`."""
    runs, skipped = read_runs(output)
    if not runs:
        found = f" ({skipped} file(s) there are not run records imgcls can read)" if skipped else ""
        raise DataError(
            f"No run records under {output.join(RUNS).uri}{found}: the report reads what `imgcls predict` wrote "
            "there. Check that --output names a predictions output that has had at least one run."
        )
    logger.info("%d run record(s) of %s, %d of them with monitoring", len(runs), output.uri,
                sum(run.monitoring is not None for run in runs))  # fmt: skip
    report = TrendReport(report_uri=report_folder.join(REPORT_FILE).uri, runs=len(runs))
    figures = build_figures(runs)
    for figure in figures:
        if figure.png is not None:
            storage.write_bytes_atomic(report_folder.join(figure.file), figure.png)
            report.figures.append(report_folder.join(figure.file).uri)
    sheet = None
    sheet_note = "No run has a readable review file (`imgcls predict --review N`), so there is no contact sheet."
    if not contact_sheet_images:
        sheet_note = "The contact sheet is turned off (contact_sheet_images=0)."
    reviewed = latest_review(runs, output, contact_sheet_images, endpoint_url) if contact_sheet_images else None
    if reviewed is not None:
        run, rows = reviewed
        images = contact_sheet.sheet_images(rows, endpoint_url)
        title = f"run {clip(run.record.run_id, 60)}: the {len(images)} least certain image(s)"
        storage.write_bytes_atomic(report_folder.join(CONTACT_SHEET), contact_sheet.contact_sheet_png(images, title))
        report.figures.append(report_folder.join(CONTACT_SHEET).uri)
        sheet = (run, images)
    markdown = report_markdown(output.uri, runs, figures, skipped, sheet, sheet_note, datetime.now(timezone.utc))
    storage.write_text_atomic(report_folder.join(REPORT_FILE), markdown)
    return report
