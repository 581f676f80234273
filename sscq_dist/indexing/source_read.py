"""Reading one source shard for the build: each read retried on its own, never the whole shard.

A transient storage error (connection reset, timeout, throttling) while a 10,000-image
shard is being encoded costs one retried footer or row-group read, with the storage retry
policy's backoff (`storage.with_retries`), instead of re-encoding the shard from its first
row. After a failed try the file is reopened. A shard that is not valid Parquet fails at once
(pyarrow's ArrowInvalid is not a storage error).
"""

from __future__ import annotations

from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from sscq_dist import storage
from sscq_dist.failpoints import failpoint
from sscq_dist.storage import Location


class ShardReader:
    """A source shard's Parquet file, reopened after a failed read."""

    def __init__(self, loc: Location):
        self.loc = loc
        self._fh = None
        self._pf = None
        self.reads = 0  # row-group reads tried, failed ones included

    def read(self, fn: Callable[[pq.ParquetFile], object], what: str):
        def attempt():
            try:
                if self._pf is None:
                    self._fh = self.loc.fs.open_input_file(self.loc.path)
                    self._pf = pq.ParquetFile(self._fh)
                return fn(self._pf)
            except BaseException:
                self.close()
                raise
        return storage.with_retries(attempt, f"{what} {self.loc.uri}", self.loc.storage)

    def row_groups(self, columns: Callable[[pa.Schema], list[str]], batch_size: int,
                   check: Callable[[pa.Schema], None] = lambda schema: None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(row group, record batch of at most batch_size rows) over the shard, one retried read per row group.

        columns: the columns to read, given the file's schema; check: validates the schema first.
        """
        try:
            schema = self.read(lambda pf: pf.schema_arrow, "read footer of")
            check(schema)
            cols = columns(schema)
            groups = self.read(lambda pf: pf.num_row_groups, "read footer of")
            for g in range(groups):
                def one(pf, g=g):
                    self.reads += 1
                    failpoint("source.read_row_group")
                    return pf.read_row_group(g, columns=cols)
                table = self.read(one, f"read row group {g} of")
                for rb in table.to_batches(max_chunksize=batch_size):
                    yield g, rb
        finally:
            self.close()

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except Exception:  # noqa: BLE001 - a broken handle is being dropped anyway
                pass
        self._fh = self._pf = None


def read_row_groups(loc: Location, columns: Callable[[pa.Schema], list[str]], batch_size: int,
                    check: Callable[[pa.Schema], None] = lambda schema: None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """ShardReader(loc).row_groups(...): the build's way to read a source shard."""
    return ShardReader(loc).row_groups(columns, batch_size, check)
