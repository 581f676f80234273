"""The index-root lock: one writer per root, lease expiry, takeover, fencing (local and S3 roots)."""

import json
import time
import uuid

import pytest

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.lock import IndexLock


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


# --------------------------------------------------------------------------- lease


def test_second_acquire_refused_with_holder(root):
    with IndexLock(root, "reindex-A", ttl_s=60):
        with pytest.raises(IndexError_, match=r"is locked by reindex-A until .*another reindex is running"):
            IndexLock(root, "reindex-B", ttl_s=60).acquire()
    # released on exit: B can take it now
    with IndexLock(root, "reindex-B", ttl_s=60):
        pass
    assert _released(root)


def test_expired_lock_taken_over_and_old_owner_cannot_release(root):
    a = IndexLock(root, "reindex-A", ttl_s=0.2).acquire()
    time.sleep(0.3)
    b = IndexLock(root, "reindex-B", ttl_s=60).acquire()  # takes over the expired lease
    with pytest.raises(IndexError_, match="held by reindex-B, not reindex-A; not released"):
        a.release()
    with pytest.raises(IndexError_, match="was lost"):
        a.refresh()
    assert json.loads(storage.read_bytes(root.join("lock")))["owner"] == "reindex-B"
    b.release()
    assert _released(root)


def test_refresh_extends_the_lease(root):
    lock = IndexLock(root, "reindex-A", ttl_s=0.5).acquire()
    before = json.loads(storage.read_bytes(root.join("lock")))["expires_at"]
    lock.ttl_s = 60
    lock.refresh()
    after = json.loads(storage.read_bytes(root.join("lock")))["expires_at"]
    assert after > before + 30
    time.sleep(0.6)
    with pytest.raises(IndexError_, match="locked by reindex-A"):
        IndexLock(root, "reindex-B", ttl_s=60).acquire()
    lock.release()


def test_unreadable_lock_is_treated_as_expired(tmp_path):
    root = storage.resolve(str(tmp_path))
    storage.write_bytes(root.join("lock"), b"garbage")
    with IndexLock(root, "reindex-A", ttl_s=60) as lock:
        assert lock.held and lock.fence == 1  # the unreadable lock's counter is lost: it restarts
    assert _released(root)


def _released(root) -> bool:
    """Release keeps the lock object (its fence counter must survive) and marks it released."""
    data = json.loads(storage.read_bytes(root.join("lock")))
    return data["released"] is True and data["expires_at"] == 0


def test_s3_lock_create_is_a_conditional_put(s3_root):
    """The S3 endpoint refuses a second exclusive PUT and a PUT on a stale etag, and both read
    as a conflict (so acquire relies on the store, not on a check-then-write race)."""
    from sscq_dist.indexing import conditional

    lock = IndexLock(storage.resolve(s3_root), "reindex-A", ttl_s=60).acquire()
    s3, bucket, key = conditional._s3(lock.loc)
    with pytest.raises(OSError) as err:
        s3.call_s3("put_object", Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    assert conditional.classify(err.value) == "conflict"
    with pytest.raises(OSError) as err:
        s3.call_s3("put_object", Bucket=bucket, Key=key, Body=b"{}", IfMatch='"0123456789abcdef0123456789abcdef"')
    assert conditional.classify(err.value) == "conflict"
    lock.release()


def test_forced_takeover_leaves_the_old_writer_a_stale_fence(root):
    """A live lease forcibly taken over: the fence grows by one, and the old holder's fencing
    check names the new holder and both fences."""
    a = IndexLock(root, "reindex-A", ttl_s=60).acquire()
    b = IndexLock(root, "reindex-B", ttl_s=60).acquire(force=True)
    assert b.fence == a.fence + 1
    with pytest.raises(IndexError_, match=rf"^lost the index lock to reindex-B \(fence {b.fence} > ours {a.fence}\); "
                                          r"stopped without publishing$"):
        a.ensure_held()
    b.release()


# --------------------------------------------------------------------------- fencing


def _take_over(root, owner: str) -> None:
    """What a forced takeover leaves behind: another owner's lease in the lock object."""
    storage.atomic_write_bytes(root.join("lock"), json.dumps(
        {"owner": owner, "token": uuid.uuid4().hex, "fence": 1, "expires_at": time.time() + 60}).encode())


def test_ensure_held_refuses_after_a_takeover(root):
    lock = IndexLock(root, "reindex-A", ttl_s=60).acquire()
    lock.ensure_held()  # ours: passes
    _take_over(root, "operator-override")
    with pytest.raises(IndexError_, match="^lost the index lock to operator-override; stopped without publishing$"):
        lock.ensure_held()
    with pytest.raises(IndexError_, match="lost the index lock to operator-override"):
        lock.raise_if_lost()  # remembered: the build loop stops too


def test_ensure_held_refuses_an_expired_lease(tmp_path):
    root = storage.resolve(str(tmp_path))
    lock = IndexLock(root, "reindex-A", ttl_s=0.2).acquire()  # no heartbeat: the lease lapses
    time.sleep(0.3)
    with pytest.raises(IndexError_, match="lost the index lock to nobody .*expired"):
        lock.ensure_held()


def test_heartbeat_finds_the_takeover_and_stops_the_writer(tmp_path):
    root = storage.resolve(str(tmp_path))
    with IndexLock(root, "reindex-A", ttl_s=0.6) as lock:  # heartbeat every 0.2 s
        _take_over(root, "reindex-B")
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                lock.raise_if_lost()
            except IndexError_ as exc:
                assert "lost the index lock to reindex-B" in str(exc)
                break
            time.sleep(0.05)
        else:
            pytest.fail("the heartbeat never noticed the takeover")
        with pytest.raises(IndexError_):
            lock.ensure_held()
    # leaving the block neither raises nor deletes the new holder's lease
    assert json.loads(storage.read_bytes(root.join("lock")))["owner"] == "reindex-B"


def test_heartbeat_that_cannot_reach_storage_stops_the_writer(tmp_path):
    root = storage.resolve(str(tmp_path / "root"))
    lock = IndexLock(root, "reindex-A", ttl_s=0.6).acquire()
    lock.start_heartbeat()
    import shutil

    shutil.rmtree(tmp_path / "root")  # the lock and its guard file
    (tmp_path / "root").write_text("not a directory")  # every lease write now fails
    deadline = time.time() + 5
    while not lock._lost.is_set() and time.time() < deadline:
        time.sleep(0.05)
    lock._stop.set()
    with pytest.raises(IndexError_, match="lost the index lock to nobody"):
        lock.raise_if_lost()


def test_fencing_tokens_grow_across_acquisitions(root):
    a = IndexLock(root, "reindex-A", ttl_s=0.2).acquire()
    time.sleep(0.3)
    b = IndexLock(root, "reindex-B", ttl_s=60).acquire()  # takeover
    assert b.fence > a.fence
    b.release()
    c = IndexLock(root, "reindex-C", ttl_s=60).acquire()  # after a release: still larger
    assert a.fence == 1 and b.fence == 2 and c.fence == 3  # a counter, not a clock
    assert json.loads(storage.read_bytes(root.join("lock")))["fence"] == c.fence
    c.release()
