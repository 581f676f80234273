"""Index manifest JSON, CURRENT pointer and the index-root lock (local and S3 roots)."""

import json
import os
import re
import time
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.manifest import (IndexManifest, IndexShard, SourceShard, check_codebooks, manifest_loc,
                                         now_iso, read_current, read_manifest, write_current, write_manifest)


def make_manifest(version="3", codebooks=None) -> IndexManifest:
    codebooks = np.ones((8, 16, 16), np.float32) if codebooks is None else codebooks
    return IndexManifest(
        model_uri="models:/sscq/3", model_version=version, codebook_checksum=fi.codebook_checksum(codebooks),
        bits=32, M=8, K=16, index_type="ivf_pq_fastscan", index_params={"nlist": 1024, "nprobe": 128},
        created_at=now_iso(), complete=True,
        sources=[SourceShard(path="s3://b/images/part-00000.parquet", size=123, etag_or_checksum='"abc"',
                             rows=10, index_shard="shard-00000.index", id_min=0, id_max=9)],
        index_shards=[IndexShard(file="shard-00000.index", rows=10, bytes=999,
                                 idmap_file="idmap-00000.parquet", idmap_bytes=55)])


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_root(moto_endpoint, monkeypatch):
    """A fresh bucket on the local S3 endpoint; returns its s3:// root URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"idx-{uuid.uuid4().hex[:12]}"
    storage.s3fs_filesystem().call_s3("create_bucket", Bucket=bucket)
    return f"s3://{bucket}/index"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return storage.resolve(str(tmp_path / "index"))
    return storage.resolve(request.getfixturevalue("s3_root"))


# --------------------------------------------------------------------------- manifest


def test_manifest_json_round_trip(root):
    m = make_manifest()
    loc = write_manifest(root, m)
    assert loc.uri.endswith("/models/3/manifest.json")
    back = read_manifest(root, "3")
    assert back == m
    assert isinstance(back.sources[0], SourceShard) and back.total_rows == 10
    assert json.loads(m.to_json())["schema_version"] == 1


def test_manifest_atomic_write_leaves_no_temp_files(root):
    write_manifest(root, make_manifest())
    m2 = make_manifest()
    m2.complete = False
    write_manifest(root, m2)  # replace
    # list raw (storage.list_files hides dot-files, which is where temp objects would be)
    parent = manifest_loc(root, "3").path.rsplit("/", 1)[0]
    names = [i.base_name for i in root.fs.get_file_info(pafs.FileSelector(parent))]
    assert names == ["manifest.json"]
    assert read_manifest(root, "3").complete is False


def test_missing_manifest_is_none(root):
    assert read_manifest(root, "7") is None


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.pop("codebook_checksum"), "codebook_checksum"),
    (lambda d: d["sources"][0].pop("rows"), "sources[0].rows"),
    (lambda d: d["index_shards"][0].pop("idmap_file"), "index_shards[0].idmap_file"),
])
def test_missing_key_is_named(mutate, key):
    data = json.loads(make_manifest().to_json())
    mutate(data)
    with pytest.raises(IndexError_, match=re.escape(f"missing key '{key}'")):
        IndexManifest.from_json(json.dumps(data), source="s3://b/idx/models/3/manifest.json")


def test_mistyped_key_is_named():
    data = json.loads(make_manifest().to_json())
    data["bits"] = "32"
    with pytest.raises(IndexError_, match=r"key 'bits' must be int, got str"):
        IndexManifest.from_json(json.dumps(data))
    data = json.loads(make_manifest().to_json())
    data["complete"] = 1
    with pytest.raises(IndexError_, match=r"key 'complete' must be bool"):
        IndexManifest.from_json(json.dumps(data))


def test_unknown_schema_version_and_bad_json_refused():
    data = json.loads(make_manifest().to_json())
    data["schema_version"] = 99
    with pytest.raises(IndexError_, match="schema_version"):
        IndexManifest.from_json(json.dumps(data))
    with pytest.raises(IndexError_, match="not valid JSON"):
        IndexManifest.from_json("{not json")


def test_check_codebooks_names_both_checksums():
    c = np.random.default_rng(0).standard_normal((8, 16, 16)).astype(np.float32)
    m = make_manifest(codebooks=c)
    check_codebooks(m, c)
    other = c + 1
    with pytest.raises(IndexError_) as err:
        check_codebooks(m, other)
    assert m.codebook_checksum in str(err.value) and fi.codebook_checksum(other) in str(err.value)


# --------------------------------------------------------------------------- CURRENT


def test_current_read_write(root):
    assert read_current(root) is None
    write_current(root, "3")
    assert read_current(root) == "3"
    write_current(root, "4")
    assert read_current(root) == "4"
    assert storage.read_bytes(root.join("CURRENT")).decode().strip() == "4"


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden"])
def test_bad_version_refused(tmp_path, bad):
    root = storage.resolve(str(tmp_path))
    with pytest.raises(IndexError_, match="cannot name an index directory"):
        write_current(root, bad)


# --------------------------------------------------------------------------- lock


def test_second_acquire_refused_with_holder(root):
    with IndexLock(root, "reindex-A", ttl_s=60):
        with pytest.raises(IndexError_, match=r"is locked by reindex-A until .*another reindex is running"):
            IndexLock(root, "reindex-B", ttl_s=60).acquire()
    # released on exit: B can take it now
    with IndexLock(root, "reindex-B", ttl_s=60):
        pass
    assert not storage.exists(root.join("LOCK"))


def test_expired_lock_taken_over_and_old_owner_cannot_release(root):
    a = IndexLock(root, "reindex-A", ttl_s=0.2).acquire()
    time.sleep(0.3)
    b = IndexLock(root, "reindex-B", ttl_s=60).acquire()  # takes over the expired lease
    with pytest.raises(IndexError_, match="held by reindex-B, not reindex-A; not released"):
        a.release()
    with pytest.raises(IndexError_, match="was lost"):
        a.refresh()
    assert json.loads(storage.read_bytes(root.join("LOCK")))["owner"] == "reindex-B"
    b.release()
    assert not storage.exists(root.join("LOCK"))


def test_refresh_extends_the_lease(root):
    lock = IndexLock(root, "reindex-A", ttl_s=0.5).acquire()
    before = json.loads(storage.read_bytes(root.join("LOCK")))["expires_at"]
    lock.ttl_s = 60
    lock.refresh()
    after = json.loads(storage.read_bytes(root.join("LOCK")))["expires_at"]
    assert after > before + 30
    time.sleep(0.6)
    with pytest.raises(IndexError_, match="locked by reindex-A"):
        IndexLock(root, "reindex-B", ttl_s=60).acquire()
    lock.release()


def test_unreadable_lock_is_treated_as_expired(tmp_path):
    root = storage.resolve(str(tmp_path))
    storage.write_bytes(root.join("LOCK"), b"garbage")
    with IndexLock(root, "reindex-A", ttl_s=60) as lock:
        assert lock.held
    assert not os.path.exists(tmp_path / "LOCK")


def test_s3_lock_create_is_a_conditional_put(s3_root):
    """The S3 endpoint refuses a second exclusive PUT, and the lock reads that as 'held'
    (so acquire relies on the store, not on a check-then-write race)."""
    from sscq_dist.indexing import lock as lock_mod

    lock = IndexLock(storage.resolve(s3_root), "reindex-A", ttl_s=60).acquire()
    s3, (bucket, key) = lock_mod._s3(lock.loc)
    with pytest.raises(OSError) as err:
        s3.call_s3("put_object", Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    assert lock_mod._classify(err.value) == "held"
    lock.release()
