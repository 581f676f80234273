"""Whole datasets only: ingest marks a prefix while it writes and records it when complete;
training and reindex refuse what a killed ingest left, verify the record, and accept
Parquet from elsewhere with one warning (sscq_dist/data/dataset_record.py)."""

import hashlib
import json
import logging
import os

import pyarrow.parquet as pq
import pytest

from conftest import make_cfg
from fault_helpers import job_env, kill_group, random_model_dir, run_job, start_job, wait_for
from sscq_dist.data.dataset_record import MARKER, RECORD, check_dataset
from sscq_dist.data.schema import validate_shards
from sscq_dist.errors import DatasetError
from sscq_dist.ingest import ingest
from sscq_dist.storage import resolve


def _parts(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith("part-"))


def test_ingest_records_every_shard_with_size_rows_and_checksum(tmp_path):
    ingest("digits", str(tmp_path / "d"), rows_per_shard=400, splits=["train"], progress=False)
    d = tmp_path / "d" / "train"
    assert MARKER not in os.listdir(d)
    rec = json.loads((d / RECORD).read_text())
    assert [s["name"] for s in rec["shards"]] == _parts(d) and rec["rows"] == 1500
    for s in rec["shards"]:
        data = (d / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        assert s["rows"] == pq.read_metadata(d / s["name"]).num_rows
    assert rec["bytes"] == sum(s["bytes"] for s in rec["shards"]) and "digits" in rec["source"]
    assert check_dataset(resolve(str(d))).rows == 1500


def _assert_refused(exc_info, prefix) -> None:
    msg = str(exc_info.value)
    assert str(prefix) in msg and "being written" in msg and "--overwrite" in msg and "\n" not in msg, msg


def test_killed_ingest_is_refused_until_rerun_with_overwrite(tmp_path):
    """SIGKILL a real ingest after its 3rd shard: training refuses the prefix, naming the fix;
    the rerun with --overwrite completes it."""
    from sscq_dist.train.driver import run_training

    dest = tmp_path / "d"
    args = ["--source", "digits", "--splits", "train", "--dest", str(dest), "--rows-per-shard", "10", "--no-progress"]
    proc = start_job("ingest.py", *args, log_path=str(tmp_path / "ingest.log"))
    try:
        wait_for(lambda: (dest / "train").is_dir() and len(_parts(dest / "train")) >= 3 or proc.poll() is not None,
                 120, "three shards")
    finally:
        kill_group(proc)
    train = dest / "train"
    assert proc.returncode != 0 and MARKER in os.listdir(train) and RECORD not in os.listdir(train)
    assert 3 <= len(_parts(train)) < 150
    with pytest.raises(DatasetError) as e:
        run_training(make_cfg(tmp_path, str(dest)))
    _assert_refused(e, train)
    again = run_job("ingest.py", *args, "--overwrite", env=job_env())
    assert again.returncode == 0, again.stderr[-2000:]
    assert MARKER not in os.listdir(train) and check_dataset(resolve(str(train))).rows == 1500
    assert len(_parts(train)) == 150


def test_reindex_refuses_an_unfinished_dataset(tmp_path, ray_local):
    """What a dead ingest leaves (its marker still there, as the test above shows) is never indexed."""
    from sscq_dist.indexing.formats import read_current
    from sscq_dist.indexing.reindex import reindex

    ingest("digits", str(tmp_path / "d"), rows_per_shard=500, splits=["train"], progress=False)
    train = tmp_path / "d" / "train"
    (train / MARKER).write_text('{"started": "2026-01-01T00:00:00Z"}')
    cfg = make_cfg(tmp_path, str(tmp_path / "d"))
    with pytest.raises(DatasetError) as e:
        reindex(str(train), str(tmp_path / "index"), random_model_dir(str(tmp_path / "m")), cfg, progress=False)
    _assert_refused(e, train)
    assert read_current(resolve(str(tmp_path / "index"))) is None


def test_overwrite_removes_shards_the_new_record_does_not_list(tmp_path):
    d = tmp_path / "d"
    ingest("digits", str(d), rows_per_shard=100, splits=["train"], progress=False)
    assert len(_parts(d / "train")) == 15
    ingest("digits", str(d), rows_per_shard=400, splits=["train"], overwrite=True, progress=False)
    rec = check_dataset(resolve(str(d / "train")))
    assert _parts(d / "train") == [s.name for s in rec.shards] and len(rec.shards) == 4 and rec.rows == 1500
    assert sum(f.metadata.num_rows for f in map(pq.ParquetFile, sorted((d / "train").glob("part-*")))) == 1500


def test_record_is_verified_without_reading_shards(tmp_path):
    """Sizes come from the listing: a shard replaced by same-size bytes passes this cheap
    check (no shard is read); one of another size, or a missing one, is refused."""
    ingest("digits", str(tmp_path / "d"), rows_per_shard=500, splits=["train"], progress=False)
    train = tmp_path / "d" / "train"
    loc = resolve(str(train))
    first = train / "part-00000.parquet"
    size = first.stat().st_size
    first.write_bytes(b"\0" * size)
    assert check_dataset(loc).rows == 1500
    # A caller that has listed the prefix already (reindex's plan) passes {name: size}: no LIST.
    listed = {p.name: p.stat().st_size for p in train.iterdir()}
    assert check_dataset(loc, listed).rows == 1500
    with pytest.raises(DatasetError, match="part-00001.parquet is listed in the dataset record but missing"):
        check_dataset(loc, {n: b for n, b in listed.items() if n != "part-00001.parquet"})
    first.write_bytes(b"\0" * (size - 1))
    with pytest.raises(DatasetError, match=f"part-00000.parquet holds {size - 1} bytes"):
        check_dataset(loc)
    first.unlink()
    with pytest.raises(DatasetError, match="part-00000.parquet is listed in the dataset record but missing"):
        validate_shards(loc)


def test_parquet_from_elsewhere_is_accepted_with_one_warning(tmp_path, caplog):
    """No marker, no record: accepted as it is, one warning per prefix however often it is read;
    shards added beside a record are used too, with one warning."""
    ingest("digits", str(tmp_path / "d"), rows_per_shard=500, splits=["train"], progress=False)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("part-00000.parquet", "part-00001.parquet"):
        (other / name).write_bytes((tmp_path / "d" / "train" / name).read_bytes())
    caplog.set_level(logging.WARNING, logger="sscq_dist.data.dataset_record")
    for _ in range(3):
        assert check_dataset(resolve(str(other))) is None and len(validate_shards(resolve(str(other)))) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(other) in warnings[0] and "no dataset record" in warnings[0], warnings
    extra = tmp_path / "d" / "train" / "part-00099.parquet"
    extra.write_bytes((other / "part-00000.parquet").read_bytes())
    assert len(validate_shards(resolve(str(tmp_path / "d" / "train")))) == 4
    assert "part-00099.parquet" in caplog.records[-1].getMessage() and len(caplog.records) == 2
