"""Commits of an index root: compare-and-swap CURRENT, stale fences, GC with reader leases.

No Ray here: snapshots name small part files written by the test; the S3 root is moto's
server (conftest `s3_bucket`). Races are ordered by files (failpoint `pause_once(DIR)`), not sleeps.
"""

import os
import threading
import time

import pytest

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.formats import (PartEntry, SourceShard, part_files, part_name, read_current, read_snapshot,
                                        version_loc)
from sscq_dist.indexing.leases import ReaderLease
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.publish import GcPolicy, collect_garbage, new_snapshot, publish_snapshot

from fault_helpers import Pause


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return storage.resolve(str(tmp_path / "index"))
    return storage.resolve(f"s3://{request.getfixturevalue('s3_bucket')}/index")


def part(root, i: int, write: bool = True) -> PartEntry:
    """A part entry whose two files exist under version 3 (so GC has something to keep or delete)."""
    src = SourceShard(f"s3://src/images/part-{i:05d}.parquet", 1000 + i, f"etag{i}")
    name = part_name(src.uri, src.etag)
    index_file, record = part_files(name)
    if write:
        vloc = version_loc(root, "3")
        for f in (index_file, record):
            storage.atomic_write_bytes(vloc.join(f), b"x" * 100)
    return PartEntry(part=name, source=src, rows=10, indexed=10, dropped=0, id_min=10 * i, id_max=10 * i + 9,
                     index_file=index_file, index_bytes=100)


def snap(gen: int, parts: list, previous, lock):
    return new_snapshot(gen, parts, model_uri="models:/sscq/3", version="3", codebook_checksum="sha256:" + "0" * 64,
                        bits=32, M=8, K=16, index_type="pq_fastscan", index_params={}, coarse_checksum="",
                        previous=previous, lock=lock)


def commit(root, gen: int, parts: list, lock, base=None):
    current = read_current(root)
    s = snap(gen, parts, current, lock)
    publish_snapshot(root, s, current, lock, base=base, manifest_max_parts=4)
    return s


# --------------------------------------------------------------------------- compare-and-swap CURRENT


@pytest.mark.parametrize("first", [True, False], ids=["first-flip", "later-flip"])
def test_two_writers_race_the_flip_and_exactly_one_wins(s3_bucket, tmp_path, monkeypatch, first):
    """Writer A passes its fencing check and stops right before its conditional PUT of CURRENT;
    writer B takes the lock over and flips; A's PUT (If-None-Match: * on the first flip, If-Match
    on CURRENT's etag later) gets 412 and A stops naming the conflict. CURRENT names B's snapshot."""
    root = storage.resolve(f"s3://{s3_bucket}/index")
    a = IndexLock(root, "writer-A", 60).acquire()
    base = None if first else commit(root, 1, [part(root, 0)], a)
    gate = Pause(tmp_path / "fp", "publish.before_current_cas", once=True)
    monkeypatch.setenv("SSCQ_FAILPOINTS", gate.spec)
    expected = read_current(root)
    snap_a = snap(2, [part(root, 0), part(root, 1)], expected, a)
    outcome = {}

    def writer_a():
        try:
            publish_snapshot(root, snap_a, expected, a, base=base)
            outcome["A"] = "published"
        except IndexError_ as exc:
            outcome["A"] = str(exc)
    t = threading.Thread(target=writer_a)
    t.start()
    gate.reached(60, alive=t.is_alive)
    b = IndexLock(root, "writer-B", 60).acquire(force=True)
    snap_b = snap(3, [part(root, 0), part(root, 2)], expected, b)
    publish_snapshot(root, snap_b, expected, b, base=base)  # passes the claimed failpoint
    gate.release()
    t.join(60)
    assert outcome["A"].startswith(f"lost the race to flip s3://{s3_bucket}/index/CURRENT to 3/00000002: another "
                                   "writer committed first"), outcome
    assert "412" in outcome["A"] and "3/00000003" in outcome["A"]  # names the conflict and the winner
    assert read_current(root) == "3/00000003"
    b.release()


def test_a_stale_fence_is_refused_at_publish(root):
    """A forced takeover gives the new writer fence n+1; the old writer's publish stops before
    it writes anything, naming the new holder and both fences."""
    a = IndexLock(root, "writer-A", 60).acquire()
    commit(root, 1, [part(root, 0)], a)
    b = IndexLock(root, "writer-B", 60).acquire(force=True)
    late = snap(2, [part(root, 0), part(root, 1)], "3/00000001", a)
    with pytest.raises(IndexError_, match=rf"^lost the index lock to writer-B \(fence {b.fence} > ours {a.fence}\); "
                                          "stopped without publishing$"):
        publish_snapshot(root, late, "3/00000001", a)
    assert read_current(root) == "3/00000001"
    assert not storage.exists(version_loc(root, "3").join("snapshots", "00000002.json"))
    commit(root, 2, [part(root, 0), part(root, 2)], b)  # the new holder publishes
    assert read_snapshot(root, "3/00000002").fence == b.fence
    b.release()


# --------------------------------------------------------------------------- garbage collection


def test_a_leased_generation_survives_gc_while_an_unleased_older_one_goes(root):
    lock = IndexLock(root, "writer", 60).acquire()
    g1 = commit(root, 1, [part(root, i) for i in (0, 1, 2)], lock)
    g2 = commit(root, 2, [part(root, i) for i in (1, 2, 3, 8, 9)], lock, base=g1)
    g3 = commit(root, 3, [part(root, i) for i in (2, 3, 4)], lock, base=g2)
    commit(root, 4, [part(root, i) for i in (3, 4, 5)], lock, base=g3)
    lease = ReaderLease(root, "replica-on-g1", ttl_s=600)
    lease.renew(["3/00000001"])
    dead = ReaderLease(root, "dead-replica-on-g2", ttl_s=0.5)  # a replica that stopped renewing
    dead.renew(["3/00000002"])
    vloc = version_loc(root, "3")
    policy = GcPolicy(keep_generations=2, grace_s=0)
    s = collect_garbage(root, policy, lock, now=time.time() + 1)  # the dead lease has lapsed by then
    assert s.retained == ["3/00000001", "3/00000003", "3/00000004"] and s.leased == {"3/00000001": "replica-on-g1"}
    assert s.expired_leases == 1 and not storage.exists(dead.loc)  # an expired lease keeps nothing and goes
    assert not storage.exists(vloc.join("snapshots", "00000002.json"))  # unleased, beyond keep_generations
    for i in (8, 9):  # only generation 2 named them
        assert not storage.exists(vloc.join(part(root, i, write=False).index_file))
    assert storage.exists(vloc.join(part(root, 0, write=False).index_file))  # generation 1's, leased
    assert len(read_snapshot(root, "3/00000001").parts) == 3  # still readable, manifests and all
    if root.is_s3:  # batched: one DeleteObjects per kind of file, not one request per object
        assert s.delete_requests < s.deleted_files
    lease.release()
    s = collect_garbage(root, policy, lock)
    assert s.retained == ["3/00000003", "3/00000004"] and s.leased == {}
    assert not storage.exists(vloc.join(part(root, 0, write=False).index_file))
    assert s.manifests_read == len({m.file for g in ("3/00000003", "3/00000004")
                                    for m in read_snapshot(root, g).manifests})  # each manifest read once
    lock.release()


def test_gc_cli_collects_and_a_failure_after_publish_is_only_a_warning(tmp_path):
    from sscq_dist.config import load_config
    from sscq_dist.indexing.reindex import gc_after_publish

    root = storage.resolve(str(tmp_path / "index"))
    lock = IndexLock(root, "writer", 60).acquire()
    g1 = commit(root, 1, [part(root, 0)], lock)
    commit(root, 2, [part(root, 1)], lock, base=g1)
    cfg = load_config(None, ["index.gc_grace_s=0", "index.gc_keep_generations=1"])
    gc, warning = gc_after_publish(root, cfg, "someone")  # the writer still holds the lock
    assert gc is None and "garbage collection failed after the publish" in warning and "locked by writer" in warning
    lock.release()
    gc, warning = gc_after_publish(root, cfg, "someone")
    assert warning == "" and gc.retained == ["3/00000002"] and gc.deleted_snapshots == 1


def test_gc_command_line(tmp_path):
    """`jobs/gc.py --index-root` (what `sscq gc` runs): one summary line and exit 0; a locked root
    is one error line naming the holder."""
    from conftest import REPO
    from fault_helpers import assert_one_error_line, run_job

    root = storage.resolve(str(tmp_path / "index"))
    lock = IndexLock(root, "writer", 60).acquire()
    g1 = commit(root, 1, [part(root, 0)], lock)
    commit(root, 2, [part(root, 1)], lock, base=g1)
    args = ("--index-root", root.uri, "--config", os.path.join(REPO, "configs", "digits.yaml"),
            f"tracking.output_dir={tmp_path}/out", "index.gc_grace_s=0", "index.gc_keep_generations=1")
    assert_one_error_line(run_job("gc.py", *args, cwd=str(tmp_path)), "locked by writer")
    lock.release()
    out = run_job("gc.py", *args, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gc: kept 1 snapshots (0 leased by readers); deleted 1 snapshots" in out.stdout, out.stdout
    assert not storage.exists(version_loc(root, "3").join(part(root, 0, write=False).index_file))
