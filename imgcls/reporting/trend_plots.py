"""The trend report's figures as PNG bytes, one value per run (or per night) against time: images per
night, class shares, scores and unknowns, the drift score against its threshold, the error share."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from imgcls.reporting.plots import png_bytes, pyplot

# Classes drawn one line each in the class-share figure (those of the largest mean share); the rest
# are summed into one line, so that a model of hundreds of classes still gives a readable figure.
MAX_CLASSES_SHOWN = 8
OTHER_CLASSES = "other classes"
FIGURE_SIZE = (9, 4)


def _time_axis(axis, times: list[datetime], label: str = "run start (UTC)", least_padding=timedelta(hours=12)) -> None:
    """Dates on the x axis, spanning the points with some room: matplotlib's own limits for a
    single point span years."""
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator()
    axis.xaxis.set_major_locator(locator)
    axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if times:
        padding = max((max(times) - min(times)) * 0.05, least_padding)
        axis.set_xlim(min(times) - padding, max(times) + padding)
    axis.set_xlabel(label)
    axis.grid(alpha=0.3)


def _legend_beside(axis) -> None:
    """The legend right of the plot, where it hides no point (none for a plot without labelled lines)."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")


def _share_axis(axis, label: str) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axis.set_ylabel(label)


def images_per_night(nights: list[date], classified: list[int], errored: list[int], unfinished: list[int]) -> bytes:
    """Bars per UTC night: readable and unreadable images of finished runs, stacked with the rows
    committed by runs that did not finish (failed, abandoned, still running)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    moments = [datetime(night.year, night.month, night.day) for night in nights]
    width = timedelta(hours=18)
    axis.bar(moments, classified, width=width, color="tab:blue", label="classified")
    axis.bar(moments, errored, width=width, bottom=classified, color="tab:red", label="unreadable")
    below = [first + second for first, second in zip(classified, errored)]
    if any(unfinished):
        axis.bar(moments, unfinished, width=width, bottom=below, color="tab:grey", label="committed by unfinished runs")
    _time_axis(axis, moments, "night (UTC date of the run's start)", least_padding=timedelta(days=1))
    axis.set_ylabel("images")
    axis.set_title("images per night")
    _legend_beside(axis)
    return png_bytes(figure)


def shown_classes(shares: list[dict[str, float]]) -> list[str]:
    """The classes of the largest mean share over the runs, at most MAX_CLASSES_SHOWN, in that order."""
    totals: dict[str, float] = {}
    for run_shares in shares:
        for name, share in run_shares.items():
            totals[name] = totals.get(name, 0.0) + share
    return sorted(totals, key=lambda name: (-totals[name], name))[:MAX_CLASSES_SHOWN]


def class_shares(times: list[datetime], shares: list[dict[str, float]]) -> bytes:
    """One line per class: its share of each run's readable images (the smaller classes summed)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    names = shown_classes(shares)
    for name in names:
        axis.plot(times, [run_shares.get(name, 0.0) for run_shares in shares], marker="o", label=name)
    other = [sum(share for name, share in run_shares.items() if name not in names) for run_shares in shares]
    if any(value > 0 for value in other):
        axis.plot(times, other, marker="o", color="tab:grey", linestyle="--", label=OTHER_CLASSES)
    _time_axis(axis, times)
    _share_axis(axis, "share of the run's images")
    axis.set_ylim(bottom=0)
    axis.set_title("class shares per run (top-1 label)")
    _legend_beside(axis)
    return png_bytes(figure)


def scores_and_unknowns(times: list[datetime], mean_scores: list[float | None], lower_quartiles: list[float | None],
                        upper_quartiles: list[float | None], unknown_shares: list[float | None]) -> bytes:  # fmt: skip
    """The mean top score per run with its middle half shaded, and the share of images whose top
    score was below min_score (labelled unknown; runs without min_score have none)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    scored = [(moment, mean, low, high) for moment, mean, low, high in zip(times, mean_scores, lower_quartiles, upper_quartiles)
              if mean is not None]  # fmt: skip
    if scored:
        moments, means, lows, highs = zip(*scored)
        axis.plot(moments, means, marker="o", color="tab:blue", label="mean top score")
        if all(value is not None for value in lows + highs):
            axis.fill_between(moments, lows, highs, color="tab:blue", alpha=0.15, label="top score p25-p75")
    unknown = [(moment, share) for moment, share in zip(times, unknown_shares) if share is not None]
    if unknown:
        axis.plot(*zip(*unknown), marker="s", color="tab:orange", label="share below min_score (unknown)")
    _time_axis(axis, times)
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("score / share")
    axis.set_title("model confidence per run")
    _legend_beside(axis)
    return png_bytes(figure)


# How runs the drift test did not score are drawn: hollow markers on the axis floor.
UNTESTED_MARKERS = {"insufficient_images": ("o", "too few images (not tested)"),
                    "no_reference": ("s", "no reference profile (not tested)")}  # fmt: skip


def drift_scores(times: list[datetime], statuses: list[str], scores: list[float | None], thresholds: list[float]) -> bytes:
    """The drift score per tested run (filled; red where drift was detected) against its threshold
    (the dashed line); untested runs as hollow markers at zero."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    tested = [(moment, score, status) for moment, score, status in zip(times, scores, statuses) if score is not None]
    if tested:
        axis.plot([moment for moment, _, _ in tested], [score for _, score, _ in tested], color="tab:grey", linewidth=1)
        for status, colour, label in (("drift", "tab:red", "drift detected"), ("ok", "tab:blue", "no drift")):
            points = [(moment, score) for moment, score, kind in tested if (kind == "drift") == (status == "drift")]
            if points:
                axis.plot(*zip(*points), linestyle="none", marker="o", color=colour, label=label)
    if len(set(thresholds)) <= 1:
        axis.axhline(thresholds[0] if thresholds else 1.0, color="tab:red", linestyle="--", label="threshold")
    else:
        axis.step(times, thresholds, where="mid", color="tab:red", linestyle="--", label="threshold")
    for status, (marker, label) in UNTESTED_MARKERS.items():
        moments = [moment for moment, kind, score in zip(times, statuses, scores) if kind == status and score is None]
        if moments:
            axis.plot(moments, [0.0] * len(moments), linestyle="none", marker=marker, markersize=9,
                      markerfacecolor="none", markeredgecolor="black", clip_on=False, label=label)  # fmt: skip
    _time_axis(axis, times)
    top = max([score for _, score, _ in tested] + thresholds + [1.0])
    axis.set_ylim(-0.04 * top, 1.1 * top)
    axis.set_ylabel("drift score (largest signal / its threshold)")
    axis.set_title("drift against the model's reference profile")
    _legend_beside(axis)
    return png_bytes(figure)


def error_shares(times: list[datetime], shares: list[float]) -> bytes:
    """The share of each run's images that could not be read or decoded."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    axis.plot(times, shares, marker="o", color="tab:red")
    _time_axis(axis, times)
    _share_axis(axis, "share of the run's images")
    axis.set_ylim(bottom=0, top=max([*shares, 0.01]) * 1.15)
    axis.set_title("unreadable images per run")
    return png_bytes(figure)
