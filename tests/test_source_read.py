"""A transient read error during a part build retries that read, not the whole shard."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sscq_dist.config import StorageConfig
from sscq_dist.failpoints import ENV
from sscq_dist.indexing.source_read import ShardReader
from sscq_dist.storage import resolve


def test_a_transient_error_retries_one_row_group_read(tmp_path, monkeypatch):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": pa.array(np.arange(40), pa.int64()), "image": [b"x"] * 40}), path,
                   row_group_size=10)
    loc = resolve(str(path), StorageConfig(retry_backoff_s=0.01))
    monkeypatch.setenv(ENV, f"source.read_row_group=oserror_once({tmp_path / 'fired'})")
    reader = ShardReader(loc)
    got = list(reader.row_groups(lambda schema: ["id"], batch_size=4))
    assert (tmp_path / "fired").exists()  # the error was injected (on the first row-group read)
    assert reader.reads == 5  # four row groups, one of them read twice: not the whole shard again
    ids = np.concatenate([rb.column("id").to_numpy() for _, rb in got])
    assert ids.tolist() == list(range(40))  # every row once, in order
    assert [g for g, _ in got] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3  # batches of <= 4 rows per group
