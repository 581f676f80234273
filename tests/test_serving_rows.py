"""Thumbnails read one row group of one column of the source shard, checked against its etag:
exact bytes read, 410 on a rewritten shard, 422 on an oversized row group, a bounded cache."""

import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fault_helpers import record_s3_requests
from sscq_dist import storage
from sscq_dist.errors import SSCQError
from sscq_dist.indexing.plan import stat_source_shard
from sscq_dist.ingest import table_bytes
from sscq_dist.serving.rows import ByteLRU, RowGroupTooLarge, ShardChanged, ThumbnailReader


def noise_png(seed: int, side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path, n=3000, seed=0, row_group_rows=1000):
    imgs = [noise_png(seed * 100_000 + i) for i in range(n)]
    table = pa.table({"id": pa.array(np.arange(n), pa.int64()), "image": pa.array(imgs, pa.binary()),
                      "uri": [f"img/{i}.png" for i in range(n)], "label": pa.array([[i % 10] for i in range(n)],
                                                                                     pa.list_(pa.int32()))})
    storage.atomic_write_bytes(storage.resolve(str(path)), table_bytes(table, row_group_rows, 8 << 20))
    return imgs


def reader(**kw):
    args = {"storage_cfg": None, "max_chunk_bytes": 64 << 20, "cache_mb": 8, "thumb_size": 64, "max_pixels": 10**7}
    return ThumbnailReader(**{**args, **kw})


def test_a_thumbnail_reads_one_row_group_of_one_column_and_the_footer(tmp_path):
    path = tmp_path / "part-00000.parquet"
    imgs = write_shard(path)
    shard = stat_source_shard(storage.resolve(str(path)))
    md = pq.ParquetFile(str(path)).metadata
    assert md.num_row_groups == 3
    r = reader()
    th = r.thumbnail(str(path), shard.etag, 1, 17)
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(th.png))), np.array(Image.open(io.BytesIO(imgs[1017]))))
    image_chunk = md.row_group(1).column(1)
    assert image_chunk.path_in_schema == "image"
    footer = int.from_bytes(path.read_bytes()[-8:-4], "little") + 8
    # Exactly the footer and the image column chunk of row group 1: nothing else of the shard.
    assert th.bytes_read == footer + image_chunk.total_compressed_size < os.path.getsize(path) / 2
    # The footer is cached per (shard, etag): the next row group costs its chunk only.
    th2 = r.thumbnail(str(path), shard.etag, 2, 0)
    assert th2.bytes_read == md.row_group(2).column(1).total_compressed_size
    again = r.thumbnail(str(path), shard.etag, 1, 17)
    assert again.cached and again.bytes_read == 0 and again.png == th.png


def test_a_rewritten_shard_is_refused_not_served_with_another_image(tmp_path):
    path = tmp_path / "part-00000.parquet"
    write_shard(path, n=50)
    etag = stat_source_shard(storage.resolve(str(path))).etag
    r = reader()
    first = r.thumbnail(str(path), etag, 0, 3)
    time.sleep(0.01)
    write_shard(path, n=50, seed=1)  # same name and row count, other images
    with pytest.raises(ShardChanged, match="rewritten after it was indexed"):
        r.thumbnail(str(path), etag, 0, 3)  # even though the old thumbnail is cached
    new = r.thumbnail(str(path), stat_source_shard(storage.resolve(str(path))).etag, 0, 3)
    assert new.png != first.png
    os.unlink(path)
    with pytest.raises(storage.NotFound, match="source shard not found"):
        r.thumbnail(str(path), etag, 0, 3)


def test_an_oversized_row_group_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "part-00000.parquet"
    imgs = [noise_png(i) for i in range(400)]
    pq.write_table(pa.table({"id": np.arange(400), "image": pa.array(imgs, pa.binary())}), path)  # one row group
    etag = stat_source_shard(storage.resolve(str(path))).etag
    limit = sum(map(len, imgs)) // 2
    r = reader(max_chunk_bytes=limit)
    with pytest.raises(RowGroupTooLarge, match=f"above serve.thumb_max_chunk_bytes={limit}"):
        r.thumbnail(str(path), etag, 0, 5)
    assert r.cache.nbytes == int.from_bytes(path.read_bytes()[-8:-4], "little") + 8  # only the footer was read
    with pytest.raises(SSCQError, match="row 400 is outside row group 0"):
        reader().thumbnail(str(path), etag, 0, 400)


def test_the_cache_is_bounded_in_bytes():
    lru = ByteLRU(100)
    for i in range(10):
        lru.put(i, b"x" * 30, 30)
    assert lru.nbytes == 90 and lru.get(9) is not None and lru.get(0) is None
    lru.put("big", b"x" * 101, 101)  # larger than the whole cache: not kept
    assert lru.get("big") is None and lru.nbytes == 90


def test_on_s3_a_thumbnail_requests_exactly_the_footer_and_one_chunk(s3_bucket, monkeypatch):
    """Counted at the S3 client: the ranges GetObject asks for are the tail, the footer and the
    image chunk of one row group (no read-ahead block), plus one HEAD for the etag check."""
    uri = f"s3://{s3_bucket}/src/part-00000.parquet"
    imgs = write_shard(uri, n=2500)
    requests = record_s3_requests(monkeypatch, lambda params: params.get("Range"))
    loc = storage.resolve(uri)
    shard = stat_source_shard(loc)
    with loc.fs.open_input_file(loc.path) as fh:
        md = pq.ParquetFile(fh).metadata
    footer = int.from_bytes(storage.read_bytes(loc)[-8:-4], "little") + 8
    requests.clear()
    th = reader().thumbnail(uri, shard.etag, 1, 3)
    assert np.array_equal(np.array(Image.open(io.BytesIO(th.png))), np.array(Image.open(io.BytesIO(imgs[1000 + 3]))))  # groups of 1,000
    gets = [r for name, r in requests if name == "GetObject"]
    fetched = sum(int(hi) - int(lo) + 1 for lo, hi in (r.split("=")[1].split("-") for r in gets))
    assert fetched == th.bytes_read == footer + md.row_group(1).column(1).total_compressed_size, (requests, fetched)
    assert [name for name, _ in requests if name != "GetObject"] == ["HeadObject"], requests
