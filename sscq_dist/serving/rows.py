"""Read single rows of source image shards: labels for results, image bytes for thumbnails.

Nothing per row is held for the whole collection: a result's (shard uri, row) comes from the
id map, and this reader fetches only the row group that holds it, with a small LRU cache of
open shard footers and decoded row-group columns (results of one query often share a shard).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sscq_dist import storage
from sscq_dist.config import StorageConfig
from sscq_dist.errors import SSCQError


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = max(1, size)

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class ShardRowReader:
    """(shard uri, row number) -> a column value, reading one row group per miss."""

    def __init__(self, storage_cfg: Optional[StorageConfig] = None, cache_row_groups: int = 64,
                 cache_files: int = 32):
        self.storage_cfg = storage_cfg
        self._files = _LRU(cache_files)
        self._groups = _LRU(cache_row_groups)
        self._lock = threading.Lock()  # pyarrow file handles are not shared across threads safely

    def _file(self, shard: str) -> tuple[pq.ParquetFile, list[int]]:
        def _open():
            loc = storage.resolve(shard, self.storage_cfg)
            try:
                fh = storage.with_retries(lambda: loc.fs.open_input_file(loc.path), f"open {loc.uri}", loc.storage)
            except FileNotFoundError:
                raise storage.NotFound(f"source shard not found: {loc.uri}") from None
            pf = pq.ParquetFile(fh)
            starts, n = [], 0
            for g in range(pf.metadata.num_row_groups):
                starts.append(n)
                n += pf.metadata.row_group(g).num_rows
            return pf, starts + [n]
        return self._files.get_or(shard, _open)

    def value(self, shard: str, row: int, column: str):
        """The row's value in `column` (None when the shard has no such column)."""
        with self._lock:
            pf, starts = self._file(shard)
            if row < 0 or row >= starts[-1]:
                raise SSCQError(f"row {row} is outside source shard {storage.redact_uri(shard)} ({starts[-1]} rows)")
            if column not in pf.schema_arrow.names:
                return None
            g = max(i for i in range(len(starts) - 1) if starts[i] <= row)
            arr: pa.ChunkedArray = self._groups.get_or(
                (shard, g, column), lambda: pf.read_row_group(g, columns=[column]).column(column))
            return arr[row - starts[g]].as_py()


def thumbnail_png(data: bytes, max_side: int, max_pixels: int) -> bytes:
    """Encoded image bytes -> a PNG no larger than max_side on its long side (never upscaled)."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > max_pixels:
            raise SSCQError(f"stored image is {im.size[0]}x{im.size[1]} pixels, above the decode limit")
        im.thumbnail((max_side, max_side))
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        out = io.BytesIO()
        im.save(out, format="PNG")
        return out.getvalue()
    except SSCQError:
        raise
    except Exception as exc:
        raise SSCQError(f"stored image does not decode ({type(exc).__name__})") from None
