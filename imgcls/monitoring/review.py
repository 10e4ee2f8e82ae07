"""The review queue: a run's N least certain images, kept while the run goes (bounded), written to
`<output>/_review/<run_id>.parquet` and, when asked, copied into a folder a person labels (a folder
per predicted class, so the labeller only moves the wrong ones; labelled, it is more training data)."""

from __future__ import annotations

import hashlib
import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from imgcls.errors import StorageError
from imgcls.platform import storage

logger = logging.getLogger(__name__)

REVIEW_FOLDER = "_review"
REVIEW_COLUMNS = ("path", "label", "score", "margin", "entropy", "top_k_labels", "top_k_scores", "labels", "model_version")
# Least certain first. Single-label models: the smallest margin between the two likeliest classes;
# multi-label models, whose classes are independent: the highest mean binary entropy. Ties: the
# other measure, then the path, so the queue is the same whatever order the rows came in.
SORT_KEYS = {
    "margin": [("margin", "ascending"), ("entropy", "descending"), ("path", "ascending")],
    "entropy": [("entropy", "descending"), ("margin", "ascending"), ("path", "ascending")],
}


class ReviewQueue:
    def __init__(self, size: int, ranked_by: str = "margin") -> None:
        self.size = size
        self.ranked_by = ranked_by
        self.kept: pa.Table | None = None

    def offer(self, rows: pa.Table) -> None:
        """Readable prediction rows; only the `size` least certain of all offered are kept."""
        candidates = rows.select(list(REVIEW_COLUMNS))
        combined = candidates if self.kept is None else pa.concat_tables([self.kept, candidates])
        order = pc.sort_indices(combined, sort_keys=SORT_KEYS[self.ranked_by])[: self.size]
        self.kept = combined.take(order)

    def table(self) -> pa.Table:
        kept = self.kept if self.kept is not None else pa.table({name: [] for name in REVIEW_COLUMNS})
        return kept.add_column(0, "rank", pa.array(range(1, kept.num_rows + 1), pa.int32()))


def review_location(output: storage.Location, run_id: str) -> storage.Location:
    return output.join(REVIEW_FOLDER, f"{run_id}.parquet")


def write_review(output: storage.Location, run_id: str, table: pa.Table) -> str:
    location = review_location(output, run_id)
    storage.write_parquet_atomic(location, table)
    return location.uri


def _copy_name(path: str) -> str:
    # The path's own digest first: two images of the same file name from different folders (or runs)
    # never meet, and a rerun names the same image the same, so it is not copied twice.
    digest = hashlib.blake2b(path.encode(), digest_size=4).hexdigest()
    return f"{digest}-{posixpath.basename(path.rstrip('/')) or 'image'}"


def copy_for_labelling(table: pa.Table, folder_uri: str, endpoint_url: str | None, max_bytes: int) -> tuple[int, int]:
    """Copy each reviewed image to `folder_uri/<predicted label>/<digest>-<file name>`. An image
    already there is left as it is (never overwritten), as is one that cannot be read any more.
    Returns (copied, skipped)."""
    folder = storage.resolve(folder_uri, endpoint_url)
    copied = skipped = 0
    for path, label in zip(table.column("path").to_pylist(), table.column("label").to_pylist()):
        target = folder.join(label or "unknown", _copy_name(path))
        try:
            if storage.exists(target):
                skipped += 1
                continue
            source = storage.resolve(path, endpoint_url)
            data = storage.read_local_file(source.path, max_bytes) if source.is_local else storage.read_object(source, max_bytes)
            storage.write_bytes_atomic(target, data)
            copied += 1
        except (OSError, StorageError) as error:
            logger.warning("review: could not copy %s to %s: %s", path, target.uri, str(error)[:200])
            skipped += 1
    return copied, skipped
