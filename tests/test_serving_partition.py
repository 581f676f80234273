"""Partitions: parts merged exactly into one index, byte-balanced plans, canonical answers that
do not depend on how the parts are split, and per-row lookups that hold no uri strings."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from sscq_dist import storage
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.formats import (PartEntry, SourceShard, open_current, read_snapshot, write_current,
                                        write_snapshot)
from sscq_dist.serving.searcher import Searcher, merge_topk
from sscq_dist.serving.partition import load_partition
from sscq_dist.serving.planner import partition_bytes, plan_moves, plan_partitions
from test_search import codebooks, dataset, empty_index, read_parts_of, write_root

KINDS = ["pq_fastscan", "ivf_pq_fastscan"]


def tied_dataset(c, n, seed=2):
    """Embeddings exactly on codewords, few distinct codes: many rows share every distance."""
    rng = np.random.default_rng(seed)
    m = c.shape[0]
    codes = rng.integers(0, 2, size=(n, m), dtype=np.uint8)
    x = c[np.arange(m)[None, :], codes].reshape(n, -1)
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    return np.ascontiguousarray(x, np.float32), ids, [f"u{i}" for i in ids]


def published(tmp_path, kind, c, data, n_shards):
    """(root, snapshot) of `data` = (x, ids, uris) written as n_shards parts."""
    root = write_root(str(tmp_path / "i"), kind, c, *data, n_shards=n_shards)
    return root, open_current(root)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_index_stores_exactly_the_parts_codes_and_searches_like_one_index(tmp_path, kind):
    c = codebooks()
    x, ids, uris = dataset(c, 5003)
    root, snap = published(tmp_path, kind, c, (x, ids, uris), 7)
    part = load_partition(root, snap, snap.parts)
    want = {}
    for i, codes in read_parts_of(root, snap):
        want.update(zip(i.tolist(), map(bytes, codes)))
    got_ids, got_codes = fi.index_codes(part.index)
    assert len(got_ids) == len(want) == 5003
    assert dict(zip(got_ids.tolist(), map(bytes, got_codes))) == want  # no row lost, added twice or re-encoded
    # One index built by FAISS's own add over all rows gives the same distances for every query.
    one = fi.deserialize(fi.serialize(empty_index(kind, c, x)))
    fi.add(one, x, ids)
    queries, _ = fi.synthetic_embeddings(c, 50, 0.5, np.random.default_rng(9))
    for q in queries:  # one query per call, as the service searches
        d_one, _ = one.search(q[None], 10)
        hits = part.search(q[None], 10)
        np.testing.assert_array_equal(hits.distances, d_one)


@pytest.mark.parametrize("kind", KINDS)
def test_partitions_merged_equal_one_partition_even_with_ties(tmp_path, kind):
    c = codebooks()
    x, ids, uris = tied_dataset(c, 3000)
    root, snap = published(tmp_path, kind, c, (x, ids, uris), 9)
    whole = load_partition(root, snap, snap.parts, nprobe=32)
    plan = plan_partitions(snap.parts, 3)
    parts = [load_partition(root, snap, ps, number=i, of=3, nprobe=32) for i, ps in enumerate(plan)]
    assert sum(p.ntotal for p in parts) == 3000
    rng = np.random.default_rng(4)
    queries = x[rng.choice(3000, 40)] + rng.standard_normal((40, x.shape[1])).astype(np.float32) * 0.01
    for q in queries:
        one = whole.search(q[None], 10)
        hits = [p.search(q[None], 10) for p in parts]
        d, i = merge_topk([h.distances for h in hits], [h.ids for h in hits], 10)
        np.testing.assert_array_equal(i, one.ids)
        np.testing.assert_array_equal(d, one.distances)
        # Ties are real here (the query sits on a shared code) and broken by id.
        row_d, row_i = one.distances[0], one.ids[0]
        assert all((row_d[a], row_i[a]) < (row_d[a + 1], row_i[a + 1]) for a in range(9))
    assert any(len(set(whole.search(q[None], 10).distances[0].tolist())) < 10 for q in queries)


def test_plan_is_stable_under_appends_and_partition_growth():
    def entry(name, size):
        return PartEntry(part=name, source=SourceShard(name, 1, "e"), rows=1, indexed=1, dropped=0, id_min=0,
                         id_max=0, index_file=f"parts/{name}.parquet", index_bytes=size)

    parts = [entry(f"part-{i:05d}-{i * 7919:016x}", 100 + i % 7) for i in range(3000)]
    plan = plan_partitions(parts, 8)
    assert sorted(e.part for ps in plan for e in ps) == sorted(e.part for e in parts)  # each part exactly once
    assert plan == plan_partitions(list(reversed(parts)), 8)  # input order does not matter
    assert all(ps == sorted(ps, key=lambda e: e.part) for ps in plan)
    where = {e.part: p for p, ps in enumerate(plan) for e in ps}
    # Appending a part (or removing one) moves no other part.
    grown = plan_partitions(parts + [entry("part-99999-ffffffffffffffff", 100)], 8)
    assert {e.part: p for p, ps in enumerate(grown) for e in ps if e.part in where} == where
    shrunk = plan_partitions(parts[1:], 8)
    assert all(where[e.part] == p for p, ps in enumerate(shrunk) for e in ps)
    # One more partition: only parts that go to the new one move, about 1/9 of them.
    nine = {e.part: p for p, ps in enumerate(plan_partitions(parts, 9)) for e in ps}
    moved = [n for n in where if nine[n] != where[n]]
    assert all(nine[n] == 8 for n in moved)
    assert abs(len(moved) / len(parts) - 1 / 9) < 0.02, len(moved)
    loads = partition_bytes(plan)
    assert max(loads) / (sum(loads) / 8) < 1.1, loads  # statistically even at this size
    with pytest.raises(ValueError, match="num_partitions"):
        plan_partitions(parts, 0)


def test_simulated_plan_at_100k_parts_meets_the_move_bounds():
    names = [f"part-{i:06d}-{(i * 2654435761) % 2 ** 64:016x}" for i in range(100_001)]
    append = plan_moves(names, 8, 8, appended=1)
    assert append["moved"] == 0
    grow = plan_moves(names[:100_000], 8, 9)
    assert 0 < grow["moved_fraction"] <= 1 / 9 + 0.01, grow
    assert grow["max_over_mean"] < 1.03, grow


@pytest.mark.parametrize("kind", KINDS)
def test_lookups_locate_ids_and_read_uris_per_row(tmp_path, kind):
    c = codebooks()
    x, ids, uris = dataset(c, 2000)
    root, snap = published(tmp_path, kind, c, (x, ids, uris), 4)
    part = load_partition(root, snap, snap.parts, cache_dir=str(tmp_path / "cache"))
    pos = part.positions_of(ids)
    assert (pos >= 0).all() and len(set(pos.tolist())) == 2000
    np.testing.assert_array_equal(part.ids[pos], ids)
    assert (part.positions_of(np.array([-5, 10**13, 7])) == -1).all()
    infos = part.row_info(pos)
    assert [i.uri for i in infos] == uris
    # write_root: shard s holds rows 0..n_s-1 of row group 0 of source "src/part-0000s.parquet" (etag "x").
    bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(2000), 4)])
    for j, info in zip(range(2000), infos):
        s = int(np.searchsorted(bounds, j, side="right")) - 1
        assert (info.shard, info.etag, info.row_group, info.row) == (f"src/part-{s:05d}.parquet", "x", 0, j - bounds[s])
    # Row metadata lives in memory-mapped files, not in the heap: per row only ids, codes and the id order.
    for lk in part.lookups:
        assert lk.table.column("uri").type == pa.large_string()
    mem = part.resident_bytes()
    per_row = (mem["codes"] + mem["labels"] + mem["ids"] + mem["order"]) / mem["rows"]
    code = snap.M // 2
    expect = code + 8 + 4 + (8 if kind == "ivf_pq_fastscan" else 0)
    assert expect <= per_row <= expect + 4, per_row  # + fast-scan block padding


def test_searcher_is_one_partition_and_keeps_its_surface(tmp_path):
    c = codebooks()
    x, ids, uris = dataset(c, 1500)
    write_root(str(tmp_path / "i"), "pq_fastscan", c, x, ids, uris, n_shards=5)
    s = Searcher.open(str(tmp_path / "i"))
    assert len(s.parts) == 1 and s.ntotal == 1500 and s.dim == 128
    all_ids = np.concatenate([fi.index_codes(p)[0] for p in s.parts])
    assert sorted(all_ids.tolist()) == sorted(ids.tolist())
    res = s.search(x[:20], 5)
    assert res.uris == s.lookup_uris(res.ids)
    # A batch answers what single queries answer (modulo float rounding of the batched tables).
    single = np.concatenate([s.search(x[j:j + 1], 5).ids for j in range(20)])
    assert (single[:, 0] == res.ids[:, 0]).mean() >= 0.95
    assert storage.exists(storage.resolve(str(tmp_path / "i")).join("CURRENT"))


def test_holder_loads_new_snapshot_beside_old_and_releases_it_after_grace(tmp_path):
    from sscq_dist.serving.holder import NotReady, SnapshotHolder

    c = codebooks()
    x, ids, uris = dataset(c, 1200)
    root = write_root(str(tmp_path / "i"), "pq_fastscan", c, x, ids, uris, n_shards=3, generation=1)
    holder = SnapshotHolder(root, 1, 2, None, None, retain_previous_s=3600)
    assert holder.load_current() == "5/00000001"
    first = holder.get("5/00000001", lambda n: None)
    x2, ids2, uris2 = dataset(c, 600, seed=5)
    write_root(str(tmp_path / "i"), "pq_fastscan", c, x2, ids2, uris2, n_shards=2, generation=2)
    assert holder.load_current() == "5/00000002"
    # Both serve side by side: requests pinned to the old name still get the old partition.
    assert holder.get("5/00000001", lambda n: None) is first
    assert holder.get("5/00000002", lambda n: None).snapshot.generation == 2
    assert holder.status().held == ["5/00000001", "5/00000002"]
    holder.retain_previous_s = 0.0
    assert holder.evict() == ["5/00000001"] and holder.status().held == ["5/00000002"]
    asked = []
    with pytest.raises(NotReady, match="does not hold snapshot 5/00000001 yet"):
        holder.get("5/00000001", asked.append)
    assert asked == ["5/00000001"]  # a request for a released name starts loading it again
    mine = plan_partitions(first.snapshot.parts, 2)[1]
    assert 0 < first.ntotal == sum(p.indexed for p in mine) < 1200 and first.index is not None  # 2/2 of gen 1, usable
    with pytest.raises(Exception, match="does not exist"):
        holder.load("5/00000009")
    with pytest.raises(NotReady, match="cannot load snapshot 5/00000009"):
        holder.get("5/00000009", asked.append)


def generations(tmp_path, kind, n_parts, rows, second):
    """A root whose generation 1 lists all parts but the last and generation 2 the parts
    `second` picks (a slice of all n_parts); CURRENT names generation 1."""
    c = codebooks()
    x, ids, uris = dataset(c, rows)
    root = write_root(str(tmp_path / "i"), kind, c, x, ids, uris, n_shards=n_parts, generation=9)
    every = read_snapshot(root, "5/00000009")
    write_snapshot(root, dataclasses.replace(every, generation=1, parts=every.parts[:-1]))
    write_snapshot(root, dataclasses.replace(every, generation=2, parts=every.parts[second]))
    write_current(root, "5/00000001")
    return root, x


@pytest.fixture
def storage_reads(monkeypatch):
    """Uris read from storage (storage.read_bytes, called through unchanged)."""
    reads = []
    real = storage.read_bytes

    def counting(loc):
        reads.append(loc.uri)
        return real(loc)

    monkeypatch.setattr(storage, "read_bytes", counting)
    return reads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("second", [slice(None), slice(1, None)], ids=["append", "append-and-drop"])
def test_a_new_generation_reads_only_the_parts_it_does_not_hold(tmp_path, kind, second, storage_reads):
    root, x = generations(tmp_path, kind, 6, 3000, second)
    old_snap, new_snap = read_snapshot(root, "5/00000001"), read_snapshot(root, "5/00000002")
    old = load_partition(root, old_snap, old_snap.parts, nprobe=32)
    rng = np.random.default_rng(3)
    queries = x[rng.choice(3000, 20)] + rng.standard_normal((20, x.shape[1])).astype(np.float32) * 0.01
    before = [old.search(q[None], 10) for q in queries]
    storage_reads.clear()
    new = load_partition(root, new_snap, new_snap.parts, nprobe=32, previous=old)
    appended = new_snap.parts[-1]
    # Only the appended part's one file: not the held parts, not trained.index (the held
    # partition's emptied index is the template).
    assert storage_reads == [storage.resolve(root.uri).join("models", "5", appended.index_file).uri]
    assert (new.kept_parts, new.read_parts) == (len(new_snap.parts) - 1, 1)
    # The same partition as a load from scratch: codes, ids, positions, lookups, answers.
    fresh = load_partition(root, new_snap, new_snap.parts, nprobe=32)
    got, want = fi.index_codes(new.index), fi.index_codes(fresh.index)
    assert dict(zip(got[0].tolist(), map(bytes, got[1]))) == dict(zip(want[0].tolist(), map(bytes, want[1])))
    np.testing.assert_array_equal(new.ids, fresh.ids)
    assert [i.uri for i in new.row_info(np.arange(new.ntotal))] == \
        [i.uri for i in fresh.row_info(np.arange(fresh.ntotal))]
    for q in queries:
        a, b = new.search(q[None], 10), fresh.search(q[None], 10)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)
        np.testing.assert_array_equal(a.positions, b.positions)
    # The old generation is untouched: it answers as before and holds none of the new part's rows.
    for q, b in zip(queries, before):
        a = old.search(q[None], 10)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)
    new_ids = fresh.ids[fresh.offsets[-2]:]
    assert (old.positions_of(new_ids) == -1).all() and (new.positions_of(new_ids) >= 0).all()
    assert old.ntotal == sum(e.indexed for e in old_snap.parts)


def test_parts_of_another_model_version_are_read_again(tmp_path, storage_reads):
    root, _ = generations(tmp_path, "pq_fastscan", 3, 900, slice(None))
    old_snap, new_snap = read_snapshot(root, "5/00000001"), read_snapshot(root, "5/00000002")
    old = load_partition(root, old_snap, old_snap.parts)
    other = dataclasses.replace(new_snap, codebook_checksum="sha256:" + "1" * 64)
    storage_reads.clear()
    new = load_partition(root, other, other.parts, previous=old)
    assert (new.kept_parts, new.read_parts) == (0, 3) and len(storage_reads) == 1 + 3  # trained.index + parts
