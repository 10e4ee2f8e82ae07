"""A stream of Arrow tables cut into chunks of at most N rows or T seconds, for chunked commits."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import pyarrow as pa


class ChunkedTables:
    """`next_chunk()` yields the stream's tables until the chunk holds `max_rows` rows (a table is cut
    at the boundary; its rest opens the next chunk) or `max_seconds` have passed since the chunk
    began. `exhausted` turns true once the stream has ended. Every row lands in exactly one chunk."""

    def __init__(self, tables: Iterable[pa.Table], max_rows: int, max_seconds: float) -> None:
        if max_rows <= 0:
            raise ValueError("max_rows must be positive")
        self._tables = iter(tables)
        self._carried: pa.Table | None = None
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.exhausted = False

    def next_chunk(self) -> Iterator[pa.Table]:
        rows = 0
        began = time.monotonic()
        while rows < self.max_rows and time.monotonic() - began < self.max_seconds:
            table = self._next_table()
            if table is None:
                return
            take = min(table.num_rows, self.max_rows - rows)
            if take < table.num_rows:
                self._carried = table.slice(take)
                table = table.slice(0, take)
            rows += take
            yield table

    def _next_table(self) -> pa.Table | None:
        if self._carried is not None:
            table, self._carried = self._carried, None
            return table
        for table in self._tables:
            if table.num_rows:
                return table
        self.exhausted = True
        return None
