"""Thumbnails from source image shards: one row group of one column, checked against its etag.

A result's thumbnail reference comes from its part: the source shard's uri and the etag it
had when it was indexed (the part record), and the row group and row inside it (the part
file). Per request this reader makes one HEAD (the shard's current etag: a rewritten shard
answers `ShardChanged`, never another image), reads the shard's footer once per
(shard, etag) (its last 8 bytes, then the footer itself), and reads ONE column chunk: the
`image` column of that row group. A chunk above `max_chunk_bytes` (a shard written by another
tool with one huge row group) is refused (`RowGroupTooLarge`) without being read.

No process-wide lock: every request opens its own file handle; only the byte-bounded cache
of thumbnails (PNG bytes) and footers is shared, behind a lock held for dictionary updates.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sscq_dist import storage
from sscq_dist.config import StorageConfig
from sscq_dist.errors import SchemaError, SSCQError
from sscq_dist.indexing.plan import stat_source_shard

IMAGE_COLUMN = "image"
_MAGIC = b"PAR1"


class ShardChanged(SSCQError):
    """The source shard was rewritten since it was indexed (its etag differs): HTTP 410."""


class RowGroupTooLarge(SSCQError):
    """The row group's image column chunk is above the limit: HTTP 422, nothing read."""


class ByteLRU:
    """A least-recently-used map bounded by the total size of its values (bytes)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict = OrderedDict()  # key -> (value, size)
        self._bytes = 0
        self._lock = threading.Lock()  # held for the dictionary update only, never for I/O

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key, value, size: int) -> None:
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, s) = self._items.popitem(last=False)
                self._bytes -= s


class _CountingFile:
    """Ranged reads of one file (an Arrow file or an unbuffered s3fs file), counting the bytes."""

    def __init__(self, raw):
        self.raw = raw
        self.count = 0

    def read_at(self, nbytes: int, offset: int) -> bytes:
        if isinstance(self.raw, pa.NativeFile):
            data = self.raw.read_at(nbytes, offset)
        else:
            self.raw.seek(offset)
            data = self.raw.read(nbytes)
        self.count += len(data)
        return data


@dataclass
class Footer:
    """A shard's parsed footer and its size in bytes (tail of 8 bytes included)."""

    metadata: pq.FileMetaData
    nbytes: int


@dataclass
class Thumb:
    """A thumbnail and what the request read from the source shard."""

    png: bytes
    bytes_read: int  # footer (when not cached) + one column chunk; 0 on a cache hit
    cached: bool


class ThumbnailReader:
    """(shard uri, etag, row group, row) -> a PNG thumbnail of the image in that row."""

    def __init__(self, storage_cfg: Optional[StorageConfig], max_chunk_bytes: int, cache_mb: float,
                 thumb_size: int, max_pixels: int):
        self.storage_cfg = storage_cfg
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.thumb_size = int(thumb_size)
        self.max_pixels = int(max_pixels)
        self.cache = ByteLRU(int(cache_mb * 1024 * 1024))
        self._buckets: dict[str, storage.Location] = {}  # one filesystem (one S3 client) per bucket

    def _location(self, shard: str) -> storage.Location:
        """The shard's Location; S3 shards share their bucket's filesystem (a new S3 client per
        request would cost more than the thumbnail)."""
        p = urlparse(shard)
        if p.scheme.lower() != "s3":
            return storage.resolve(shard, self.storage_cfg)
        bucket = self._buckets.get(p.netloc)
        if bucket is None:
            bucket = self._buckets.setdefault(p.netloc, storage.resolve(f"s3://{p.netloc}", self.storage_cfg))
        return bucket.join(p.path)

    def thumbnail(self, shard: str, etag: str, row_group: int, row: int) -> Thumb:
        loc = self._location(shard)
        return storage.with_retries(lambda: self._thumbnail(loc, shard, etag, int(row_group), int(row)),
                                    f"read {loc.uri}", loc.storage)

    def _thumbnail(self, loc: storage.Location, shard: str, etag: str, row_group: int, row: int) -> Thumb:
        fh, size, now = _open_with_etag(loc, shard)
        with fh:
            if now != etag:
                raise ShardChanged(f"source shard {storage.redact_uri(shard)} was rewritten after it was indexed "
                                   f"(etag {now[:40]!r}, indexed {etag[:40]!r}); reindex to see its images")
            key = ("thumb", shard, etag, row_group, row, self.thumb_size)
            png = self.cache.get(key)
            if png is not None:
                return Thumb(png, 0, True)
            f = _CountingFile(fh)
            data = self._read_image(f, shard, etag, size, row_group, row)
        png = thumbnail_png(data, self.thumb_size, self.max_pixels)
        self.cache.put(key, png, len(png))
        return Thumb(png, f.count, False)

    def _read_image(self, f: "_CountingFile", shard: str, etag: str, size: int, row_group: int, row: int) -> bytes:
        """The image bytes of (row group, row): the footer (once per shard etag) and one column chunk."""
        footer = self.cache.get(("footer", shard, etag))
        if footer is None:
            footer = read_footer(f, size, shard)
            self.cache.put(("footer", shard, etag), footer, footer.nbytes)
        md = footer.metadata
        if not 0 <= row_group < md.num_row_groups:
            raise SSCQError(f"row group {row_group} is outside source shard {storage.redact_uri(shard)} "
                            f"({md.num_row_groups} row groups)")
        rg = md.row_group(row_group)
        if not 0 <= row < rg.num_rows:
            raise SSCQError(f"row {row} is outside row group {row_group} of {storage.redact_uri(shard)} "
                            f"({rg.num_rows} rows)")
        chunk = next((rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == IMAGE_COLUMN),
                     None)
        if chunk is None:
            raise SSCQError(f"source shard {storage.redact_uri(shard)} has no '{IMAGE_COLUMN}' column")
        if chunk.total_compressed_size > self.max_chunk_bytes:
            raise RowGroupTooLarge(f"row group {row_group} of {storage.redact_uri(shard)} holds "
                                   f"{chunk.total_compressed_size} bytes of images, above serve.thumb_max_chunk_bytes="
                                   f"{self.max_chunk_bytes}; re-ingest it with smaller row groups")
        start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        raw = f.read_at(chunk.total_compressed_size, start)
        return _column_chunk_value(md, size, row_group, raw, start, row)


def _open_with_etag(loc: storage.Location, shard: str):
    """(open file, size, current etag) with one HEAD. On S3 the file is unbuffered (s3fs would
    read ahead a 50 MB block from the chunk's start) and its own HEAD gives the etag."""
    try:
        if loc.is_s3:
            fh = loc.fs.handler.fs.open(loc.path, mode="rb", cache_type="none")
            return fh, int(fh.size), str(fh.details.get("ETag", "")).strip('"')
        now = stat_source_shard(loc)
        return loc.fs.open_input_file(loc.path), now.size, now.etag
    except (FileNotFoundError, SchemaError):
        raise storage.NotFound(f"source shard not found: {storage.redact_uri(shard)}") from None


def read_footer(f: _CountingFile, size: int, where: str) -> Footer:
    """Read exactly a Parquet file's footer: its last 8 bytes (length + magic), then the footer."""
    tail = f.read_at(8, size - 8) if size >= 12 else b""
    if len(tail) != 8 or tail[4:] != _MAGIC:
        raise SSCQError(f"source shard {storage.redact_uri(where)}: not a Parquet file")
    n = int.from_bytes(tail[:4], "little")
    if n + 12 > size:
        raise SSCQError(f"source shard {storage.redact_uri(where)}: footer length {n} exceeds the file")
    body = f.read_at(n, size - 8 - n)
    # A minimal file (magic, footer, tail) parses with pyarrow's own reader; offsets stay the shard's.
    md = pq.read_metadata(pa.BufferReader(_MAGIC + body + tail))
    return Footer(md, n + 8)


class _ChunkWindow(io.RawIOBase):
    """The shard as pyarrow sees it, holding only [start, start + len(raw)): one column chunk.

    Given the cached footer, pyarrow reads only that chunk; a read anywhere else is a bug
    (it would mean a second source read) and fails loudly.
    """

    def __init__(self, raw: bytes, start: int, size: int):
        super().__init__()
        self.raw, self.start, self.size, self.pos = raw, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else n
        lo = self.pos - self.start
        if lo < 0 or lo + n > len(self.raw):
            raise OSError(f"read of [{self.pos}, {self.pos + n}) outside the column chunk")
        self.pos += n
        return self.raw[lo:lo + n]


def _column_chunk_value(md: pq.FileMetaData, size: int, row_group: int, raw: bytes, start: int, row: int):
    """Decode the image of `row` from one column chunk's bytes with pyarrow's own reader."""
    src = pa.PythonFile(_ChunkWindow(raw, start, size), mode="r")
    pf = pq.ParquetFile(src, metadata=md)
    col = pf.read_row_group(row_group, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN)
    return col[row].as_py()


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
