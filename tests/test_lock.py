"""The index-root lock: one writer per root, lease expiry, takeover, fencing (local and S3 roots)."""

import json
import os
import threading
import time
import uuid

import pytest

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.lock import IndexLock


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
    assert not storage.exists(root.join("lock"))


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
    assert not storage.exists(root.join("lock"))


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
        assert lock.held
    assert not os.path.exists(tmp_path / "lock")


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
    os.remove(tmp_path / "root" / "lock")
    os.rmdir(tmp_path / "root")
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
    assert c.fence > b.fence
    assert json.loads(storage.read_bytes(root.join("lock")))["fence"] == c.fence
    c.release()
