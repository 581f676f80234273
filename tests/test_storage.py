"""Storage: local, file:// and s3:// (moto server) through one API; atomic writes; scheme allow-list."""

import os

import pytest

from sscq_dist.errors import StorageError
from sscq_dist.storage import (atomic_write_bytes, exists, list_files, read_bytes, redact_uri, resolve,
                               validate_uri)


def test_local_and_file_uri_are_the_same_place(tmp_path):
    loc = resolve(str(tmp_path / "a" / "meta.json"))
    atomic_write_bytes(loc, b'{"v": 1}')
    assert read_bytes(resolve(f"file://{tmp_path}/a/meta.json")) == b'{"v": 1}'
    atomic_write_bytes(loc, b'{"v": 2}')
    assert read_bytes(loc) == b'{"v": 2}'
    # No temporary object stays behind.
    assert os.listdir(tmp_path / "a") == ["meta.json"]


def test_s3_roundtrip_through_endpoint(s3_bucket):
    root = resolve(f"s3://{s3_bucket}/prefix")
    atomic_write_bytes(root.join("CURRENT"), b"3")
    atomic_write_bytes(root.join("x.parquet"), b"data")
    assert read_bytes(root.join("CURRENT")) == b"3"
    assert exists(root.join("CURRENT")) and not exists(root.join("nope"))
    assert [i.base_name for i in list_files(root)] == ["CURRENT", "x.parquet"]
    assert [i.base_name for i in list_files(root, ".parquet")] == ["x.parquet"]


@pytest.mark.parametrize("uri", ["http://example.com/x", "gs://bucket/x", "ftp://h/x", "", "s3://"])
def test_scheme_allow_list(uri):
    with pytest.raises(StorageError):
        validate_uri(uri)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        read_bytes(resolve(str(tmp_path / "missing")))


def test_unreachable_endpoint_fails_after_bounded_retries(monkeypatch):
    from sscq_dist.config import StorageConfig

    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=2, retry_backoff_s=0.01)
    with pytest.raises(StorageError, match="unreachable"):
        from sscq_dist.storage import with_retries
        loc = resolve("s3://bucket/x", cfg)
        with_retries(lambda: loc.fs.get_file_info(loc.path), "stat s3://bucket/x", cfg)


def test_redact_uri_drops_passwords():
    assert redact_uri("s3://user:pw@bucket/x") == "s3://bucket/x"
    assert "pw" not in redact_uri("http://u:pw@host:5000/")
