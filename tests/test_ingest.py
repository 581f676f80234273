"""Ingest: digits to local and s3://, Fashion-MNIST IDX, folders, re-shard; stable ids; refusal."""

import gzip
import io
import os
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sscq_dist.data.schema import IMAGE_SCHEMA
from sscq_dist.errors import SSCQError, StorageError
from sscq_dist.ingest import FASHION_MNIST_DIR, ingest
from sscq_dist.storage import resolve


def _read_all(uri):
    loc = resolve(uri)
    files = sorted(i.path for i in loc.fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(loc.path))
                   if i.base_name.endswith(".parquet"))
    tables = []
    for f in files:
        with loc.fs.open_input_file(f) as fh:
            tables.append(pq.read_table(fh))
    return tables


def _check_digits(tables_train, tables_test):
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = [t for t in tables_train + tables_test]
    for t in rows:
        assert t.schema.equals(IMAGE_SCHEMA, check_metadata=False)
    ids = np.concatenate([t.column("id").to_numpy() for t in rows])
    labels = [lab[0] for t in rows for lab in t.column("label").to_pylist()]
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797
    assert labels == [int(d.target[i]) for i in ids]
    assert sum(t.num_rows for t in tables_test) == 297
    # The stored PNG decodes back to the source pixels (scaled 0-16 -> 0-255).
    t0 = rows[0]
    img = np.asarray(Image.open(io.BytesIO(t0.column("image")[0].as_py())))
    i0 = t0.column("id")[0].as_py()
    assert np.array_equal(img, np.clip(d.images[i0] * (255 / 16), 0, 255).astype(np.uint8))


def test_digits_local(tmp_path):
    out = ingest("digits", str(tmp_path / "d"), rows_per_shard=400, progress=False)
    assert [s.rows for s in out] == [1500, 297] and out[0].shards == 4
    _check_digits(_read_all(str(tmp_path / "d" / "train")), _read_all(str(tmp_path / "d" / "test")))


def test_digits_s3(s3_bucket):
    uri = f"s3://{s3_bucket}/digits"
    ingest("digits", uri, rows_per_shard=1000, progress=False)
    _check_digits(_read_all(uri + "/train"), _read_all(uri + "/test"))


def test_ids_stable_and_refuse_nonempty_dest(tmp_path):
    ingest("digits", str(tmp_path / "d"), rows_per_shard=700, progress=False)
    first = [t.column("id").to_pylist() for t in _read_all(str(tmp_path / "d" / "train"))]
    with pytest.raises(StorageError, match="--overwrite"):
        ingest("digits", str(tmp_path / "d"), progress=False)
    # Overwrite with fewer shards removes the stale ones, ids unchanged.
    ingest("digits", str(tmp_path / "d"), rows_per_shard=5000, overwrite=True, progress=False)
    again = _read_all(str(tmp_path / "d" / "train"))
    assert len(again) == 1
    assert again[0].column("id").to_pylist() == sum(first, [])


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_small(tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    out = ingest("fashion_mnist", str(tmp_path / "out"), rows_per_shard=16, source_path=str(src), progress=False)
    assert [s.rows for s in out] == [30, 12] and out[0].shards == 2
    test_ids = _read_all(str(tmp_path / "out" / "test"))[0].column("id").to_pylist()
    assert test_ids == list(range(60_000, 60_012))
    labels = np.frombuffer(gzip.open(src / "t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
    assert [x[0] for x in _read_all(str(tmp_path / "out" / "test"))[0].column("label").to_pylist()] == labels.tolist()


def test_fashion_mnist_bad_idx(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x03junk"))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x01"))
    with pytest.raises(SSCQError, match="train-images"):
        ingest("fashion_mnist", str(tmp_path / "o"), source_path=str(tmp_path), splits=["train"], progress=False)


@pytest.mark.skipif(not os.path.exists(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files(tmp_path):
    out = ingest("fashion_mnist", str(tmp_path / "fm"), rows_per_shard=20_000, splits=["test"], progress=False)
    assert out[0].rows == 10_000 and out[0].shards == 1


def test_folder_and_reshard(tmp_path):
    src = tmp_path / "imgs"
    for label in (3, 7):
        (src / str(label)).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((10, 12, 3), i * 20 + label, np.uint8)).save(src / str(label) / f"{i}.png")
    out = ingest("folder", str(tmp_path / "f"), rows_per_shard=4, source_path=str(src), progress=False)
    assert out[0].rows == 10 and out[0].shards == 3
    t = _read_all(str(tmp_path / "f"))
    labels = sorted(x[0] for tb in t for x in tb.column("label").to_pylist())
    assert labels == [3] * 5 + [7] * 5
    ids1 = sorted(i for tb in t for i in tb.column("id").to_pylist())
    ingest("folder", str(tmp_path / "f"), rows_per_shard=4, source_path=str(src), overwrite=True, progress=False)
    assert sorted(i for tb in _read_all(str(tmp_path / "f")) for i in tb.column("id").to_pylist()) == ids1
    out = ingest("parquet", str(tmp_path / "r"), rows_per_shard=10, source_path=str(tmp_path / "f"), progress=False)
    assert out[0].shards == 1
    assert sorted(_read_all(str(tmp_path / "r"))[0].column("id").to_pylist()) == ids1


def test_shards_are_cut_into_row_groups_by_rows_or_image_bytes(tmp_path):
    """A thumbnail reads one row group: ingest cuts them at data.row_group_rows rows or
    data.row_group_bytes image bytes, whichever comes first (config fields)."""
    from sscq_dist.config import load_config

    cfg = load_config(None, ["data.row_group_rows=300"])
    ingest("digits", str(tmp_path / "rows"), rows_per_shard=1000, splits=["all"], progress=False, data_cfg=cfg.data)
    md = pq.ParquetFile(tmp_path / "rows" / "all" / "part-00000.parquet").metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [300, 300, 300, 100]
    cfg = load_config(None, ["data.row_group_bytes=20000"])
    ingest("digits", str(tmp_path / "bytes"), rows_per_shard=1000, splits=["all"], progress=False, data_cfg=cfg.data)
    pf = pq.ParquetFile(tmp_path / "bytes" / "all" / "part-00000.parquet")
    sizes = [sum(map(len, pf.read_row_group(g, columns=["image"]).column("image").to_pylist()))
             for g in range(pf.metadata.num_row_groups)]
    assert pf.metadata.num_rows == 1000 and len(sizes) > 3 and max(sizes) <= 20000 and min(sizes[:-1]) > 19000
    # The defaults: 1,024 rows (tiny digits never reach 8 MB).
    ingest("digits", str(tmp_path / "default"), rows_per_shard=5000, splits=["all"], progress=False)
    md = pq.ParquetFile(tmp_path / "default" / "all" / "part-00000.parquet").metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [1024, 773]
