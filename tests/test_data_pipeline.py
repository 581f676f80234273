"""Ray Data pipeline: S3 reads, two views, eval determinism, corrupt-row counting, schema errors."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sscq_dist.config import load_config
from sscq_dist.data.decode import decode_image
from sscq_dist.data.pipeline import (DropCounter, cached_epochs_dataset, eval_dataset, pipeline_pass, read_images,
                                     two_view_dataset)
from sscq_dist.data.schema import IMAGE_SCHEMA
from sscq_dist.errors import SchemaError
from sscq_dist.ingest import ingest, png_bytes


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/digits.yaml", ["data.decode_batch_size=64", "data.image_size=28"])


def test_two_views_from_s3(ray_local, s3_bucket, cfg):
    uri = f"s3://{s3_bucket}/digits"
    ingest("digits", uri, rows_per_shard=500, splits=["test"], progress=False)
    ds = two_view_dataset(read_images(uri + "/test", cfg), cfg)
    batches = list(ds.iter_batches(batch_size=100, batch_format="numpy"))
    n = sum(len(b["id"]) for b in batches)
    assert n == 297
    b = batches[0]
    assert b["view_a"].shape == (100, 1, 28, 28) and b["view_a"].dtype == np.float32
    assert b["view_b"].shape == b["view_a"].shape
    assert b["ok"].all()
    # Independent augmentations: the two views differ.
    assert np.abs(b["view_a"] - b["view_b"]).mean() > 0.05


def test_eval_mode_is_deterministic(ray_local, digits_dir, cfg):
    ds = eval_dataset(read_images(digits_dir + "/test", cfg), cfg)
    a = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=128, batch_format="numpy")])
    b = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=128, batch_format="numpy")])
    assert a.shape == (297, 1, 28, 28) and np.array_equal(a, b)


def test_cached_epochs_stream_serves_every_pass_with_fresh_views(ray_local, digits_dir, cfg):
    epochs = 12
    ds = cached_epochs_dataset(read_images(digits_dir + "/test", cfg), cfg, epochs, seed=3)
    batches = list(ds.iter_batches(batch_size=100, batch_format="numpy"))
    ids = np.concatenate([b["id"] for b in batches])
    # One input of epochs x blocks: every image exactly once per pass, nothing lost or doubled.
    assert len(ids) == epochs * 297
    assert np.array_equal(np.bincount(ids)[np.unique(ids)], np.full(297, epochs))
    assert batches[0]["view_a"].shape == (100, 1, 28, 28) and all(b["ok"].all() for b in batches)
    # Views are augmented per pass, not cached: one image's views differ across passes.
    views = np.concatenate([b["view_a"] for b in batches])
    first = views[ids == ids[0]]
    assert len(first) == epochs and np.abs(first[0] - first[1:]).mean() > 0.01


def _shard_with_corrupt(path, n_valid=20):
    rng = np.random.default_rng(1)
    imgs = [png_bytes(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(n_valid)]
    bad = [b"", b"not an image at all", imgs[0][: len(imgs[0]) // 2]]  # empty, junk, truncated PNG
    table = pa.Table.from_pydict({"id": list(range(n_valid + 3)), "image": imgs + bad,
                                  "uri": [None] * (n_valid + 3), "label": [[0]] * (n_valid + 3)},
                                 schema=IMAGE_SCHEMA)
    pq.write_table(table, path)


def test_corrupt_rows_are_dropped_and_counted(ray_local, tmp_path, cfg):
    d = tmp_path / "bad"
    d.mkdir()
    _shard_with_corrupt(d / "part-00000.parquet")
    stats = pipeline_pass(str(d), cfg, batch_size=8, progress=False)
    assert stats.rows == 23 and stats.dropped == 3
    counter = DropCounter()
    ds = two_view_dataset(read_images(str(d), cfg), cfg)
    kept = sum(len(counter.filter(b)["id"]) for b in ds.iter_batches(batch_size=8, batch_format="numpy"))
    assert kept == 20 and counter.dropped == 3 and sorted(counter.dropped_ids) == [20, 21, 22]


def test_schema_errors_name_file_and_column(tmp_path, cfg):
    d1 = tmp_path / "noimage"
    d1.mkdir()
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "uri": ["x"]}), d1 / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"part-00000\.parquet.*'image'"):
        read_images(str(d1), cfg)
    d2 = tmp_path / "strid"
    d2.mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), d2 / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"column 'id' has type string"):
        read_images(str(d2), cfg)
    d3 = tmp_path / "trunc"
    d3.mkdir()
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "image": [b"x"]}), d3 / "part-00000.parquet")
    data = (d3 / "part-00000.parquet").read_bytes()
    (d3 / "part-00000.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        read_images(str(d3), cfg)
    with pytest.raises(SchemaError, match="no image shards"):
        read_images(str(tmp_path / "empty"), cfg)


def _encode(im, fmt="PNG"):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_handles_modes_and_bombs():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    variants = {
        "L": rgb.convert("L"), "RGB": rgb, "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P"),
        "I;16": Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100),
    }
    for mode, im in variants.items():
        for ch in (1, 3):
            out = decode_image(_encode(im), 16, ch, 10**6)
            assert out is not None and out.shape == (ch, 16, 16) and out.dtype == np.uint8, mode
    cmyk = decode_image(_encode(rgb.convert("CMYK"), "JPEG"), 16, 3, 10**6)
    assert cmyk is not None and cmyk.shape == (3, 16, 16)
    # Declared dimensions above the pixel budget are refused before decoding.
    assert decode_image(_encode(Image.new("L", (400, 400))), 16, 1, max_pixels=10_000) is None
    assert decode_image(b"", 16, 1, 10**6) is None
