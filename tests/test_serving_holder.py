"""A partition replica's snapshots: single-flight loads, swaps that read only new parts, and a
cache folder bounded in bytes that keeps what held snapshots use."""

import os
import threading

import pytest

from sscq_dist.serving.cache import cache_path, prune_cache
from sscq_dist.serving.holder import SnapshotHolder
from sscq_dist.serving.partition import load_partition
from sscq_dist.indexing.formats import write_current
from test_serving_partition import generations, storage_reads  # noqa: F401,F811 (a fixture)


def until(condition, timeout=30.0):
    """Wait until condition() holds, woken every few ms (the state is read, not guessed by a sleep)."""
    tick = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if condition():
            return True
        tick.wait(0.005)
    return condition()


class GatedLoader:
    """The real load_partition, whose first call signals `started` and waits for `release`
    (then raises `first_error` when given); `calls` names every snapshot it was asked for."""

    def __init__(self, first_error=None):
        self.started, self.release, self.calls, self.first_error = threading.Event(), threading.Event(), [], first_error

    def __call__(self, root, snap, parts, i, n, cache, nprobe, previous):
        self.calls.append(snap.name)
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(30)
            if self.first_error is not None:
                raise self.first_error
        return load_partition(root, snap, parts, i, n, cache, nprobe, previous=previous)


def test_two_requests_for_one_snapshot_share_one_load(tmp_path):
    root, _ = generations(tmp_path, "pq_fastscan", 3, 900, slice(None))
    gated = GatedLoader()
    started, release, loads = gated.started, gated.release, gated.calls
    holder = SnapshotHolder(root, 0, 1, None, None, retain_previous_s=60, loader=gated)
    got = {}
    first = threading.Thread(target=lambda: got.setdefault("first", holder.load("5/00000001")))
    second = threading.Thread(target=lambda: got.setdefault("second", holder.load("5/00000001")))
    first.start()
    assert started.wait(30)  # the first load is in flight ...
    second.start()
    assert until(lambda: holder.status().waiting == {"5/00000001": 1})  # ... and the second request waits on it
    assert holder.status().loading == ["5/00000001"]
    release.set()
    first.join(30), second.join(30)
    assert loads == ["5/00000001"]
    assert got["first"] is got["second"] and got["first"].ntotal == 600
    assert holder.status().waiting == {} and holder.status().held == ["5/00000001"]


def test_a_failed_load_fails_its_waiters_and_is_retried_later(tmp_path):
    root, _ = generations(tmp_path, "pq_fastscan", 3, 900, slice(None))
    failing_once = GatedLoader(OSError("storage went away"))
    started, release, calls = failing_once.started, failing_once.release, failing_once.calls
    holder = SnapshotHolder(root, 0, 1, None, None, retain_previous_s=60, loader=failing_once)
    errors = []

    def load():
        try:
            holder.load("5/00000001")
        except OSError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=load) for _ in range(2)]
    threads[0].start()
    assert started.wait(30)
    threads[1].start()
    assert until(lambda: holder.status().waiting == {"5/00000001": 1})
    release.set()
    [t.join(30) for t in threads]
    assert errors == ["storage went away"] * 2 and calls == ["5/00000001"]
    assert "storage went away" in holder.status().last_error
    assert holder.load("5/00000001").ntotal == 600 and len(calls) == 2


@pytest.mark.parametrize("partitions", [1, 2])
def test_swap_to_an_appended_snapshot_reads_only_the_new_part(tmp_path, storage_reads, partitions):  # noqa: F811
    root, _ = generations(tmp_path, "ivf_pq_fastscan", 8, 2400, slice(None))
    holders = [SnapshotHolder(root, i, partitions, None, None, retain_previous_s=60) for i in range(partitions)]
    for h in holders:
        assert h.load_current() == "5/00000001"
    old = [h.get("5/00000001", lambda n: None) for h in holders]
    write_current(root, "5/00000002")
    storage_reads.clear()
    for h in holders:
        assert h.load_current() == "5/00000002"
    new = [h.get("5/00000002", lambda n: None) for h in holders]
    part_reads = [u for u in storage_reads if "/parts/" in u]
    appended = new[0].snapshot.parts[-1]
    assert sorted(u.rsplit("/", 2)[-2:] for u in part_reads) == sorted(
        [appended.index_file.split("/")])
    assert sum(p.read_parts for p in new) == 1 and sum(p.kept_parts for p in new) == 7
    # Each partition's old generation still serves, unchanged, beside the new one.
    assert [p.ntotal for p in old] == [h.get("5/00000001", lambda n: None).ntotal for h in holders]
    assert sum(p.ntotal for p in new) == 2400 and sum(p.ntotal for p in old) == 2400 - appended.indexed


def test_prune_cache_drops_least_recently_used_files_but_never_those_in_use(tmp_path):
    files = {}
    for age, name in enumerate(["newest", "in-use-old", "middle", "oldest"]):
        path = cache_path(str(tmp_path), "5", name, 100)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
        files[name] = path
    temp = os.path.join(str(tmp_path), "5", ".part-download")
    with open(temp, "wb") as f:
        f.write(b"x" * 1000)  # a download in progress: never counted, never removed
    result = prune_cache(str(tmp_path), 250, {files["in-use-old"]})
    assert sorted(n for n, p in files.items() if os.path.exists(p)) == ["in-use-old", "newest"]
    assert (result.kept_bytes, result.removed_files, result.over_budget) == (200, 2, False)
    assert os.path.exists(temp)
    assert prune_cache(str(tmp_path), 0, {files["in-use-old"]}).over_budget  # what is in use stays
    assert [n for n, p in files.items() if os.path.exists(p)] == ["in-use-old"]


def test_holder_bounds_its_cache_to_what_held_snapshots_use(tmp_path):
    # Generation 2 drops part 0 and appends part 3: once generation 1 is released, the
    # cache keeps exactly generation 2's files (a bound of 0 bytes keeps only what is in use).
    root, _ = generations(tmp_path, "pq_fastscan", 4, 1200, slice(1, None))
    cache = str(tmp_path / "cache")
    holder = SnapshotHolder(root, 0, 1, cache, None, retain_previous_s=3600, cache_max_bytes=0)

    def cached():
        return {os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs}

    holder.load_current()
    gen1 = holder.get("5/00000001", lambda n: None).cache_files()
    assert cached() == gen1 and len(gen1) == 3 * 2  # part file and lookup of 3 parts
    write_current(root, "5/00000002")
    holder.load_current()
    gen2 = holder.get("5/00000002", lambda n: None).cache_files()
    assert cached() == gen1 | gen2 and len(gen1 | gen2) == 4 * 2  # both held: nothing of either goes
    holder.retain_previous_s = 0.0
    assert holder.evict() == ["5/00000001"]
    assert cached() == gen2 and not any("part-00000" in f for f in cached())
    # A larger bound keeps released files too, least recently used out first.
    holder.cache_max_bytes = 10**9
    assert holder.prune_cache().removed_files == 0
