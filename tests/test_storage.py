"""Storage: local, file:// and s3:// (moto server) through one API; atomic writes; scheme allow-list."""

import os
import time

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


@pytest.fixture
def hung_endpoint(s3_server):
    """An S3 endpoint URL that accepts connections and never answers (test AWS env set)."""
    from fault_helpers import HungEndpoint

    exists(resolve("s3://warm-up/x"))  # botocore loads its models once per process (about a second)
    ep = HungEndpoint()
    yield ep
    ep.close()


def test_one_retry_policy_owns_every_attempt(hung_endpoint):
    """Each storage attempt is one HTTP try: botocore's and s3fs's retry loops do not nest
    inside storage.max_attempts (they once turned one hung call into minutes)."""
    from sscq_dist.config import StorageConfig

    cfg = StorageConfig(endpoint_url=hung_endpoint.url, max_attempts=3, retry_backoff_s=0.05,
                        connect_timeout_s=0.25, read_timeout_s=0.25, deadline_s=30)
    loc = resolve("s3://bucket/data/part-00000.parquet", cfg)
    # stat, GET, PUT, and a file opened on the filesystem itself, as Ray Data's read tasks do
    for call in (exists, read_bytes, lambda l: atomic_write_bytes(l, b"shard"), lambda l: l.fs.open_input_file(l.path)):
        before = hung_endpoint.connections
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="unreachable after 3 attempts") as e:
            call(loc)
        assert hung_endpoint.connections - before == 3, str(e.value)
        assert "s3://bucket/data/" in str(e.value)
        assert time.monotonic() - t0 < 30, str(e.value)  # within storage.deadline_s


@pytest.mark.parametrize("read_timeout_s, attempts", [(300, 4), (0.4, 50)], ids=["one-long-try", "many-tries"])
def test_deadline_bounds_a_call_on_a_hung_endpoint(hung_endpoint, read_timeout_s, attempts):
    """storage.deadline_s ends a call whether one try alone would outlast it (its timeout is
    cut to the deadline) or many short tries would (no retry starts that could not end in time)."""
    from sscq_dist.config import StorageConfig

    cfg = StorageConfig(endpoint_url=hung_endpoint.url, max_attempts=attempts, retry_backoff_s=0.05,
                        connect_timeout_s=0.4, read_timeout_s=read_timeout_s, deadline_s=2.5)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        list_files(resolve("s3://bucket/data", cfg))
    took = time.monotonic() - t0
    assert took <= 2.5 + 10, took  # + slack for a loaded CI machine; one try alone takes 300 s, 50 take 20+
    msg = str(e.value)
    assert "s3://bucket/data" in msg and "within storage.deadline_s=2.5s" in msg and "\n" not in msg, msg
    assert hung_endpoint.connections < attempts, hung_endpoint.connections


def test_redact_uri_drops_passwords():
    assert redact_uri("s3://user:pw@bucket/x") == "s3://bucket/x"
    assert "pw" not in redact_uri("http://u:pw@host:5000/")
