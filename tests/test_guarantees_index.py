"""Index-root guarantees made to fail when broken: a stale writer is refused at publish.

A writer passes its lease checks, then stalls (a `pause` failpoint right before it flips
CURRENT, as a GC pause or a lost VM would); its lease lapses, another writer takes the root
over. Released, the stale writer must stop naming the new holder and leave CURRENT alone.
Real IndexLock and publish code on a local root; no Ray.
"""

from __future__ import annotations

import threading
import time

import pytest

from fault_helpers import Pause, wait_for
from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.formats import Snapshot, read_current
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.publish import publish_snapshot

STALL_TTL_S = 1.0  # the stale writer's lease: it runs out while the writer is held at the pause


def _snapshot(gen: int, lock: IndexLock, previous=None) -> Snapshot:
    return Snapshot(generation=gen, model_uri="models:/sscq/1", model_version="1", codebook_checksum="cb",
                    bits=32, M=8, K=16, index_type="pq_fastscan", index_params={}, coarse_checksum="",
                    created_at="2026-12-04T00:00:00+00:00", previous=previous, writer=lock.owner, fence=lock.fence)


def _stale_publish(root, tmp_path, monkeypatch):
    """Writer A publishes generation 1 and stops right before its CURRENT flip, its lease lapsed.
    Returns (thread, [A's exception], release)."""
    a = IndexLock(root, "writer-A", ttl_s=STALL_TTL_S).acquire()  # no heartbeat: a stalled process
    pause = Pause(tmp_path / "fp", "reindex.before_current")
    monkeypatch.setenv("SSCQ_FAILPOINTS", pause.spec)
    raised: list = []

    def run():
        try:
            publish_snapshot(root, _snapshot(1, a), None, a)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    pause.reached(timeout=60, alive=t.is_alive)
    monkeypatch.delenv("SSCQ_FAILPOINTS")
    wait_for(lambda: time.time() > a.expires_at, 30, "writer A's lease to lapse")
    return t, raised, pause.release


def _finish(t, raised) -> IndexError_:
    t.join(timeout=60)
    assert not t.is_alive() and len(raised) == 1 and isinstance(raised[0], IndexError_), raised
    return raised[0]


@pytest.fixture
def root(tmp_path):
    return storage.resolve(str(tmp_path / "index"))


def test_stale_writer_is_refused_after_the_new_holder_published(root, tmp_path, monkeypatch):
    t, raised, release = _stale_publish(root, tmp_path, monkeypatch)
    b = IndexLock(root, "writer-B", ttl_s=60).acquire()  # takes the lapsed lease over
    published = publish_snapshot(root, _snapshot(2, b), None, b)
    release()
    err = _finish(t, raised)
    assert str(err).startswith("lost the index lock to writer-B") and "stopped without publishing" in str(err)
    assert read_current(root) == published.name
    b.release()


def test_stale_writer_is_refused_while_the_new_holder_builds(root, tmp_path, monkeypatch):
    """CURRENT has not moved (the new holder is still building), so only the lease check stands
    between the stale writer and the flip."""
    t, raised, release = _stale_publish(root, tmp_path, monkeypatch)
    b = IndexLock(root, "writer-B", ttl_s=60).acquire()
    release()
    err = _finish(t, raised)
    assert str(err).startswith("lost the index lock to writer-B")
    assert read_current(root) is None
    b.release()
