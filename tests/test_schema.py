"""The image-shard contract checks (sscq_dist/data/schema.py): a shard that cannot be used is
one error naming the file and the real cause: not found, permission denied, storage
unreachable, or bytes that are not Parquet."""

import pytest

from fault_helpers import DenyingEndpoint
from sscq_dist.config import StorageConfig
from sscq_dist.data.schema import validate_shards
from sscq_dist.errors import SchemaError, StorageError
from sscq_dist.storage import resolve


def test_missing_shard_is_not_found(tmp_path):
    uri = str(tmp_path / "part-00000.parquet")
    with pytest.raises(StorageError, match="not found") as e:
        validate_shards(resolve(uri))
    assert uri in str(e.value) and "Parquet" not in str(e.value)


def test_bytes_that_are_not_parquet(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"PK\x03\x04 a zip file, not Parquet")
    with pytest.raises(SchemaError, match="not a readable Parquet file") as e:
        validate_shards(resolve(str(tmp_path)))
    assert str(tmp_path / "part-00000.parquet") in str(e.value)


@pytest.mark.parametrize("uri", ["s3://bucket/images/part-00000.parquet", "s3://bucket/images"])
def test_access_denied_is_permission_denied(s3_server, uri):
    ep = DenyingEndpoint()
    try:
        with pytest.raises(StorageError, match="permission denied") as e:
            validate_shards(resolve(uri, StorageConfig(endpoint_url=ep.url)))
    finally:
        ep.close()
    assert uri in str(e.value) and "Parquet" not in str(e.value)


def test_unreachable_endpoint_is_unreachable(s3_server):
    from fault_helpers import free_port

    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=2, retry_backoff_s=0.01)
    with pytest.raises(StorageError, match="unreachable after 2 attempts") as e:
        validate_shards(resolve("s3://bucket/images/part-00000.parquet", cfg))
    assert "s3://bucket/images/part-00000.parquet" in str(e.value)
