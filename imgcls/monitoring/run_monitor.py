"""A bulk run's monitoring, in the job's process: it reads the monitoring columns off each batch of
prediction rows on their way to Parquet (`watch`), keeps bounded summaries (histograms on the
reference's bins, a sample for quantiles, embedding sums, the review candidates), and at the end
gives the run record's `monitoring` and `drift` sections."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgcls.inference.predictor import MONITOR_PREFIX
from imgcls.monitoring import drift
from imgcls.monitoring.observations import IMAGE_STATISTICS, MODEL_STATISTICS
from imgcls.monitoring.profile import ProfileArrays, ReferenceProfile
from imgcls.monitoring.review import ReviewQueue
from imgcls.monitoring.summaries import DriftReport, Quantiles, RunMonitoring, bin_counts

# Images kept (a uniform reservoir sample) for the run's quantiles: exact for runs up to this size,
# bounded memory for any run.
QUANTILE_SAMPLE = 200_000
SCALARS = (*MODEL_STATISTICS, *IMAGE_STATISTICS)


class RunMonitor:
    def __init__(
        self,
        class_names: list[str],
        reference: tuple[ReferenceProfile, ProfileArrays | None] | None,
        min_score: float | None,
        review_size: int = 0,
        ranked_by: str = "margin",
        min_images: int = drift.DEFAULT_MIN_IMAGES,
        false_alarm_rate: float = drift.DEFAULT_FALSE_ALARM_RATE,
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.class_names = class_names
        self.profile, self.arrays = reference if reference is not None else (None, None)
        self.min_score = min_score
        self.min_images = min_images
        self.false_alarm_rate = false_alarm_rate
        self.review = ReviewQueue(review_size, ranked_by) if review_size else None
        self.readable = 0
        self.errored = 0
        self.below_min_score = 0
        self.class_counts = np.zeros(len(class_names), dtype=np.int64)
        self.histograms = {name: None for name in SCALARS}
        self.samples: dict[str, np.ndarray] = {name: np.zeros(0) for name in SCALARS}
        self.embedding_sum: np.ndarray | None = None
        self.embedding_outer: np.ndarray | None = None
        self.seconds = 0.0
        self._generator = np.random.default_rng(seed)

    def watch(self, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        """The tables, observed, without their monitoring columns."""
        for table in tables:
            started = time.perf_counter()
            self.observe(table)
            hidden = [name for name in table.column_names if name.startswith(MONITOR_PREFIX)]
            table = table.drop_columns(hidden) if hidden else table
            self.seconds += time.perf_counter() - started
            yield table

    def observe(self, table: pa.Table) -> None:
        readable = pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)
        self.errored += int(len(readable) - readable.sum())
        if not readable.any():
            return
        rows = table.filter(pa.array(readable))
        if self.review is not None:
            self.review.offer(rows)
        if not self.enabled or MONITOR_PREFIX + "top_class" not in table.column_names:
            return
        self.readable += rows.num_rows
        top_class = rows.column(MONITOR_PREFIX + "top_class").to_numpy()
        self.class_counts += np.bincount(top_class, minlength=len(self.class_names))
        values = {name: rows.column(name if name in MODEL_STATISTICS else MONITOR_PREFIX + name).to_numpy().astype(np.float64)
                  for name in SCALARS}  # fmt: skip
        if self.profile is not None:
            for name in SCALARS:
                counts = bin_counts(values[name], self.profile.scalars[name].edges)
                self.histograms[name] = counts if self.histograms[name] is None else self.histograms[name] + counts
        if self.min_score is not None:
            self.below_min_score += int(np.count_nonzero(values["score"] < self.min_score))
        self._sample(values, rows.num_rows)
        embedding_name = MONITOR_PREFIX + "embedding"
        if embedding_name in rows.column_names:
            column = rows.column(embedding_name).combine_chunks()
            embedding = column.values.to_numpy().reshape(len(column), -1).astype(np.float64)
            if self.embedding_sum is None:
                self.embedding_sum = np.zeros(embedding.shape[1])
                self.embedding_outer = np.zeros((embedding.shape[1], embedding.shape[1]))
            self.embedding_sum += embedding.sum(axis=0)
            self.embedding_outer += embedding.T @ embedding

    def _sample(self, values: dict[str, np.ndarray], count: int) -> None:
        """Reservoir sampling (algorithm R, a batch at a time) of every scalar, the same rows for all."""
        kept = len(self.samples["score"])
        seen_before = self.readable - count
        room = max(0, QUANTILE_SAMPLE - kept)
        take = min(room, count)
        if take:
            for name in SCALARS:
                self.samples[name] = np.concatenate([self.samples[name], values[name][:take]])
        if take == count:
            return
        positions = seen_before + np.arange(take, count)
        slots = (self._generator.random(len(positions)) * (positions + 1)).astype(np.int64)
        replace = slots < QUANTILE_SAMPLE
        for name in SCALARS:
            self.samples[name][slots[replace]] = values[name][take:][replace]

    def monitoring(self) -> RunMonitoring | None:
        if not self.enabled:
            return None
        images = self.readable
        total = images + self.errored
        below = None
        if self.min_score is not None and images:
            below = round(self.below_min_score / images, 6)
        return RunMonitoring(
            images=images,
            errored=self.errored,
            errored_share=round(self.errored / total, 6) if total else 0.0,
            class_shares={name: round(float(count / images), 6) if images else 0.0
                          for name, count in zip(self.class_names, self.class_counts)},  # fmt: skip
            min_score=self.min_score,
            below_min_score_share=below,
            score=Quantiles.of(self.samples["score"]),
            margin=Quantiles.of(self.samples["margin"]),
            entropy=Quantiles.of(self.samples["entropy"]),
            image_statistics={name: Quantiles.of(self.samples[name]) for name in IMAGE_STATISTICS},
            seconds=round(self.seconds, 3),
        )

    def drift(self) -> DriftReport | None:
        if not self.enabled:
            return None
        started = time.perf_counter()
        histograms = {"class": self.class_counts, **{name: counts for name, counts in self.histograms.items() if counts is not None}}
        sums = None if self.embedding_sum is None else (self.embedding_sum, self.embedding_outer)
        report = drift.compare(self.profile, self.arrays, histograms, self.readable, sums, self.min_images, self.false_alarm_rate)
        self.seconds += time.perf_counter() - started
        return report
