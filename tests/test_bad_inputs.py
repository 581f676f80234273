"""Bad inputs (SPEC sections 3 and 8): every one is a counted skip or one clear error line.

Images that do not decode (corrupt, empty, not an image, decompression bombs) are skipped
and counted by the Ray pipeline and by reindex, while grey/RGBA/palette/CMYK/16-bit images
in the same shard are encoded. Broken shards, empty datasets, invalid configs and missing
models stop the jobs with exit code 2 and a single `error:` line, never a traceback.
The manifest-from-another-model case is tests/test_reindex.py::test_checksum_mismatch_and_lock_refusal.
"""

import io
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_cfg
from fault_helpers import (DIGITS_YAML, assert_one_error_line, image_bytes, job_env, random_model_dir,
                           run_job)
from sscq_dist.config import load_config
from sscq_dist.data.schema import IMAGE_SCHEMA
from sscq_dist.errors import ConfigError, SSCQError
from sscq_dist.ingest import png_bytes

# A real decompression bomb: 8000 x 8000 grey pixels (64 M, above data.max_image_pixels'
# default of 50 M) in about 60 KB of PNG.
BOMB_SIDE = 8000
# A header that only declares a 100000 x 100000 image.
HUGE_SIDE = 100_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, idat: bytes) -> bytes:
    """A PNG (8-bit grey) whose IHDR declares width x height, with the given compressed IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def decompression_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid all-black side x side PNG: tiny on disk, side*side bytes once decoded."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return png_with_header(side, side, idat)


def mixed_images() -> tuple[dict, dict]:
    """(good, bad): name -> encoded bytes. Good ones cover every mode the decoder converts."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)))
    pal_t = rgb.convert("P")
    pal_t.info["transparency"] = 0
    good = {
        "grey": image_bytes(rgb.convert("L")),
        "rgb": image_bytes(rgb),
        "rgba": image_bytes(rgba),
        "grey_alpha": image_bytes(rgb.convert("LA")),
        "palette": image_bytes(rgb.convert("P")),
        "palette_transparent": image_bytes(pal_t),
        "bilevel": image_bytes(rgb.convert("1")),
        "cmyk_jpeg": image_bytes(rgb.convert("CMYK"), "JPEG"),
        "grey16": image_bytes(Image.fromarray((np.arange(120, dtype=np.uint16).reshape(12, 10) * 500))),
        "gif": image_bytes(rgb.convert("P"), "GIF"),
    }
    png = good["rgb"]
    bad = {
        "empty": b"",
        "not_an_image": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n",
        "truncated": png[: len(png) // 2],
        "corrupt_pixels": png_with_header(10, 12, os.urandom(200)),
        "huge_header": png_with_header(HUGE_SIDE, HUGE_SIDE, zlib.compress(b"\x00" * 1000)),
        "bomb": decompression_bomb(),
    }
    return good, bad


def write_shard(path, ids, images, uris=None) -> None:
    t = pa.Table.from_pydict({"id": list(ids), "image": list(images), "uri": uris or [None] * len(ids),
                              "label": [None] * len(ids)}, schema=IMAGE_SCHEMA)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(t, path)


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory):
    """One shard: good images (ids 0..) and undecodable ones (ids 100..)."""
    good, bad = mixed_images()
    d = tmp_path_factory.mktemp("mixed")
    ids = list(range(len(good))) + [100 + i for i in range(len(bad))]
    names = list(good) + list(bad)
    write_shard(str(d / "part-00000.parquet"), ids, list(good.values()) + list(bad.values()),
                [f"test:{n}" for n in names])
    return {"dir": str(d), "good_ids": list(range(len(good))), "bad_ids": ids[len(good):],
            "good": good, "bad": bad}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(str(tmp_path_factory.mktemp("model") / "m"), 0)


def test_decoder_skips_bad_bytes_and_converts_every_mode(mixed_shard):
    from sscq_dist.data.decode import decode_image

    cfg = load_config(DIGITS_YAML)
    # The bomb really is one: a valid header Pillow accepts, beyond the pixel budget.
    assert Image.open(io.BytesIO(mixed_shard["bad"]["bomb"])).size == (BOMB_SIDE, BOMB_SIDE)
    assert BOMB_SIDE ** 2 > cfg.data.max_image_pixels
    for channels in (1, 3):
        for name, data in mixed_shard["good"].items():
            out = decode_image(data, 8, channels, cfg.data.max_image_pixels)
            assert out is not None and out.shape == (channels, 8, 8) and out.dtype == np.uint8, name
        for name, data in mixed_shard["bad"].items():
            assert decode_image(data, 8, channels, cfg.data.max_image_pixels) is None, name


def test_ray_pipeline_counts_undecodable_rows(mixed_shard, ray_local):
    """Through Ray Data (decode to the uint8 training stream): bad rows dropped by id and counted."""
    from sscq_dist.data.pipeline import DropCounter, decoded_images, pipeline_pass

    cfg = load_config(DIGITS_YAML, ["data.decode_batch_size=4"])
    stats = pipeline_pass(mixed_shard["dir"], cfg, batch_size=4, progress=False)
    n_bad = len(mixed_shard["bad_ids"])
    assert stats.rows == len(mixed_shard["good_ids"]) + n_bad and stats.dropped == n_bad
    counter = DropCounter()
    kept = []
    ds, _ = decoded_images(mixed_shard["dir"], cfg)
    for b in counter.iterate(ds.iter_batches(batch_size=4, batch_format="numpy")):
        assert b["image"].dtype == np.uint8 and b["image"].shape[1:] == (8, 8, 1)
        kept.extend(b["id"].tolist())
    assert sorted(kept) == mixed_shard["good_ids"]
    assert sorted(counter.dropped_ids) == mixed_shard["bad_ids"]


def test_reindex_encodes_good_rows_and_counts_bad_ones(mixed_shard, model_dir, tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.reindex_job import REINDEX_EXPERIMENT, run_reindex
    from sscq_dist.serving.searcher import Searcher

    cfg = make_cfg(tmp_path, str(tmp_path), "index.encode_batch_size=4")
    root = str(tmp_path / "index")
    summary, _ = run_reindex(mixed_shard["dir"], root, model_dir, cfg)
    n_bad = len(mixed_shard["bad_ids"])
    assert summary.dropped_rows == n_bad and summary.total_rows == len(mixed_shard["good_ids"])
    s = Searcher.open(root, cfg.storage)
    ids = np.concatenate([fi.index_codes(sh)[0] for sh in s.parts])
    assert sorted(ids.tolist()) == mixed_shard["good_ids"]
    client = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(REINDEX_EXPERIMENT)
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.metrics["dropped_images"] == n_bad


# ----------------------------------------------------------------------------- broken shards


def _ok_table(ids):
    return pa.Table.from_pydict({"id": list(ids), "image": [png_bytes(np.full((8, 8), i % 255, np.uint8)) for i in ids],
                                 "uri": [None] * len(ids), "label": [None] * len(ids)}, schema=IMAGE_SCHEMA)


def _make_bad_source(kind: str, d) -> list[str]:
    """Write a broken source under d; returns what the error line must name."""
    p0 = d / "part-00000.parquet"
    d.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        pq.write_table(_ok_table(range(20)), p0)
        data = p0.read_bytes()
        p0.write_bytes(data[: len(data) // 2])
        return [str(p0), "not a readable Parquet file"]
    if kind == "id_as_string":
        pq.write_table(pa.table({"id": ["a", "b"], "image": [b"x", b"y"]}), p0)
        return [str(p0), "column 'id'", "string", "int64"]
    if kind == "image_as_int":
        pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "image": pa.array([1, 2], pa.int64())}), p0)
        return [str(p0), "column 'image'", "binary"]
    if kind == "missing_image":
        pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "uri": ["a", "b"]}), p0)
        return [str(p0), "missing column 'image'"]
    if kind == "no_shards":
        (d / "README.txt").write_text("no parquet here")
        return ["no image shards", str(d)]
    if kind == "duplicate_id":
        pq.write_table(_ok_table(range(0, 30)), p0)
        pq.write_table(_ok_table([30, 31, 7, 32]), d / "part-00001.parquet")
        return ["id 7"]
    raise AssertionError(kind)


BAD_SOURCES = ["truncated", "id_as_string", "image_as_int", "missing_image", "no_shards", "duplicate_id"]


@pytest.mark.parametrize("kind", BAD_SOURCES)
def test_bad_source_ingest_cli_one_error_line(kind, tmp_path):
    needles = _make_bad_source(kind, tmp_path / "src")
    out = run_job("ingest.py", "--source", "parquet", "--source-path", str(tmp_path / "src"),
                  "--dest", str(tmp_path / "dest"), "--no-progress")
    assert_one_error_line(out, *needles)
    # Nothing readable as a complete dataset was produced.
    if kind != "duplicate_id":
        assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


@pytest.mark.parametrize("kind", BAD_SOURCES)
def test_bad_source_reindex_refuses(kind, tmp_path, model_dir, ray_local):
    from sscq_dist.indexing.formats import read_current
    from sscq_dist.indexing.reindex import reindex
    from sscq_dist.storage import resolve

    needles = _make_bad_source(kind, tmp_path / "src")
    cfg = make_cfg(tmp_path, str(tmp_path), "index.encode_batch_size=8")
    root = str(tmp_path / "index")
    with pytest.raises(SSCQError) as e:
        reindex(str(tmp_path / "src"), root, model_dir, cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles if kind != "duplicate_id" else ["id 7", "is in both"]:
        assert n in msg, msg
    assert read_current(resolve(root)) is None  # nothing is served from a refused build


def test_bad_shard_reindex_cli_one_error_line(tmp_path, model_dir, ray_local):
    needles = _make_bad_source("truncated", tmp_path / "src")
    out = run_job("reindex.py", "--images", str(tmp_path / "src"), "--index-root", str(tmp_path / "index"),
                  "--model", model_dir, "--config", DIGITS_YAML,
                  f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.output_dir={tmp_path}/out",
                  env=job_env(ray_local), cwd=str(tmp_path))
    assert_one_error_line(out, *needles)


# ----------------------------------------------------------------------------- empty datasets


def test_empty_datasets(tmp_path, model_dir, ray_local):
    """No shards, or only 0-row shards: ingest and training refuse; reindex of a 0-row shard
    beside real ones counts it as 0 rows and serves the rest."""
    from sscq_dist.indexing.reindex import reindex
    from sscq_dist.ingest import ingest
    from sscq_dist.train.driver import run_training

    empty = tmp_path / "empty"
    write_shard(str(empty / "part-00000.parquet"), [], [])
    with pytest.raises(SSCQError, match="no images"):
        ingest("parquet", str(tmp_path / "o"), source_path=str(empty), progress=False)
    cfg = make_cfg(tmp_path, str(tmp_path), f"data.train_uri={empty}")
    with pytest.raises(SSCQError, match="0 rows"):
        run_training(cfg)
    cfg = make_cfg(tmp_path, str(tmp_path), f"data.train_uri={tmp_path}/nothing")
    with pytest.raises(SSCQError, match="no image shards"):
        run_training(cfg)
    # A 0-row shard among real ones.
    mixed = tmp_path / "with_empty"
    mixed.mkdir()
    pq.write_table(_ok_table(range(10)), mixed / "part-00000.parquet")
    write_shard(str(mixed / "part-00001.parquet"), [], [])
    cfg = make_cfg(tmp_path, str(tmp_path), "index.encode_batch_size=8")
    s = reindex(str(mixed), str(tmp_path / "idx"), model_dir, cfg, progress=False)
    assert s.total_rows == 10 and s.flipped
    again = reindex(str(mixed), str(tmp_path / "idx"), model_dir, cfg, progress=False)
    assert again.nothing_to_do, "a 0-row shard must not be re-encoded on every run"
    # Only empty shards: refused rather than serving an empty index.
    with pytest.raises(SSCQError, match="no rows|0 rows|no images"):
        reindex(str(empty), str(tmp_path / "idx-empty"), model_dir, cfg, progress=False)


# ----------------------------------------------------------------------------- configs


BAD_CONFIGS = {
    "unknown_key": ("model:\n  bits: 32\n  colour: blue\n", ["config key 'model.colour': unknown key"]),
    "unknown_section": ("trainer:\n  epochs: 3\n", ["config key 'trainer': unknown key"]),
    "wrong_type": ("train:\n  epochs: three\n", ["train.epochs", "expected an integer"]),
    "bool_for_int": ("train:\n  num_workers: true\n", ["train.num_workers", "expected an integer"]),
    "bits": ("model:\n  bits: 24\n", ["model.bits", "(16, 32, 64)", "24"]),
    "not_a_mapping": ("- just\n- a list\n", ["expected a mapping"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_invalid_config_one_error_naming_the_key(name, tmp_path):
    text, needles = BAD_CONFIGS[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert all(n in str(e.value) for n in needles), str(e.value)
    # The same file given to a job: one error line, nothing written.
    out = run_job("ingest.py", "--source", "digits", "--dest", str(tmp_path / "d"), "--config", str(path))
    assert_one_error_line(out, *needles)
    assert not (tmp_path / "d").exists()


def test_train_cli_refuses_invalid_overrides(tmp_path):
    """Overrides are checked before anything starts: no run storage, no MLflow store."""
    out = run_job("train.py", "--config", DIGITS_YAML, "model.bits=24", "train.epochs=1", cwd=str(tmp_path))
    assert_one_error_line(out, "model.bits", "24")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns.db").exists()


# ----------------------------------------------------------------------------- models


def test_missing_model_uri_reindex_and_evaluate(tmp_path, digits_dir, ray_local):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--config", DIGITS_YAML, f"tracking.tracking_uri={db}", f"tracking.output_dir={tmp_path}/out",
              f"data.train_uri={digits_dir}/train", f"data.queries_uri={digits_dir}/test"]
    env = job_env(ray_local)
    out = run_job("reindex.py", "--images", f"{digits_dir}/test", "--index-root", str(tmp_path / "index"),
                  "--model", "models:/no-such-model/3", *common, env=env, cwd=str(tmp_path))
    assert_one_error_line(out, "models:/no-such-model/3")
    assert not (tmp_path / "index" / "CURRENT").exists()
    out = run_job("evaluate.py", "--model", "models:/no-such-model@champion", *common, env=env, cwd=str(tmp_path))
    assert_one_error_line(out, "models:/no-such-model@champion")
    out = run_job("reindex.py", "--images", f"{digits_dir}/test", "--index-root", str(tmp_path / "index"),
                  "--model", str(tmp_path / "not-a-model-dir"), *common, env=env, cwd=str(tmp_path))
    assert_one_error_line(out, "not-a-model-dir")
