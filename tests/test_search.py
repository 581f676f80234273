"""Search over lean index parts: merge equals one index and the per-part FAISS indices of the
previous design; Searcher opens snapshots on local and S3 roots; roots written in an older
layout are refused with the rebuild message."""

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest

from sscq_dist import storage
from sscq_dist.errors import IndexError_, StorageError
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.formats import (PART_META_SCHEMA, TRAINED_FILE, PartRows, Snapshot, SourceShard, now_iso,
                                        parse_part, part_bytes, part_files, sha256_hex, snapshot_loc, version_loc,
                                        read_snapshot, write_current, write_part, write_snapshot)
from sscq_dist.serving.searcher import Searcher, merge_topk
from sscq_dist.records import to_plain

M = 8


def codebooks(seed=0):
    return np.random.default_rng(seed).standard_normal((M, 16, 16)).astype(np.float32)


def dataset(c, n, seed=1):
    rng = np.random.default_rng(seed)
    x, _ = fi.synthetic_embeddings(c, n, 0.5, rng)
    ids = rng.choice(10**12, size=n, replace=False).astype(np.int64)
    uris = [f"s3://images/{i}.png" if i % 5 else None for i in ids]  # some rows have no uri
    return x, ids, uris


def empty_index(kind, c, x, nprobe=8):
    if kind == "pq_fastscan":
        return fi.build_pq_fastscan(c)
    sample = fi.reservoir_sample([x], 2000, seed=0)
    return fi.build_ivf_pq_fastscan(c, sample, nlist=32, nprobe=nprobe, seed=0)


def shard_indices(kind, c, x, ids, n_shards):
    """The previous design: one trained empty index, copied per shard, each a whole FAISS index."""
    template = fi.serialize(empty_index(kind, c, x))
    parts = np.array_split(np.arange(len(x)), n_shards)
    shards = []
    for p in parts:
        index = fi.deserialize(template)
        fi.add(index, x[p], ids[p])
        shards.append(index)
    return shards, parts


def write_root(root_uri, kind, c, x, ids, uris, n_shards=3, version="5", generation=1, labels=None):
    """A snapshot the way a reindex publishes it: trained.index once, lean parts (codes assigned
    by FAISS with it), then the snapshot, then CURRENT. labels: one list (or None) per row."""
    root = storage.resolve(root_uri)
    vloc = version_loc(root, version)
    trained_bytes = fi.serialize(empty_index(kind, c, x))
    storage.atomic_write_bytes(vloc.join(TRAINED_FILE), trained_bytes)
    trained = fi.deserialize(trained_bytes)
    entries = []
    for s, p in enumerate(np.array_split(np.arange(len(x)), n_shards)):
        codes, lists = fi.encode(trained, x[p])
        meta = pa.table({"label": [labels[i] for i in p] if labels is not None else [None] * len(p),
                         "uri": [uris[i] for i in p], "row_group": np.zeros(len(p), np.int32),
                         "row": np.arange(len(p), dtype=np.int32)}, schema=PART_META_SCHEMA)
        rec = write_part(vloc, f"part-{s:05d}-0123456789abcdef", SourceShard(f"src/part-{s:05d}.parquet", 1, "x"),
                         PartRows(ids[p], codes, lists, meta), len(p), model_version=version,
                         codebook_checksum=fi.codebook_checksum(c), index_type=kind,
                         coarse_checksum=sha256_hex(trained_bytes))
        entries.append(rec.entry())
    snap = Snapshot(generation=generation, model_uri="models:/sscq/5", model_version=version,
                    codebook_checksum=fi.codebook_checksum(c), bits=4 * M, M=M, K=16, index_type=kind,
                    index_params={}, coarse_checksum=sha256_hex(trained_bytes), created_at=now_iso(), previous=None,
                    writer="test", fence=1, parts=entries)
    write_snapshot(root, snap)
    write_current(root, snap.name)
    return root


def read_parts_of(root, snap):
    """(ids, codes (n, M)) of every part a snapshot lists, read as stored."""
    vloc = version_loc(root, snap.model_version)
    out = []
    for p in snap.parts:
        rows = parse_part(storage.read_bytes(vloc.join(p.index_file)), p.index_file,
                          ivf=snap.index_type == "ivf_pq_fastscan")
        out.append((rows.ids, fi.unpack_codes(rows.codes, snap.M)))
    return out


def write_legacy_root(root_uri, c, x, ids, uris, version="5", complete=True):
    """The pre-snapshot layout: models/<v>/manifest.json, shard-NNNNN.index, idmap-NNNNN.parquet (id, uri),
    CURRENT holding the bare version."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = storage.resolve(root_uri)
    vloc = version_loc(root, version)
    shards, parts = shard_indices("pq_fastscan", c, x, ids, 2)
    sources, index_shards = [], []
    for s, (index, p) in enumerate(zip(shards, parts)):
        data = fi.serialize(index)
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": pa.array(ids[p], pa.int64()), "uri": pa.array([uris[i] for i in p], pa.string())}), buf)
        storage.atomic_write_bytes(vloc.join(f"shard-{s:05d}.index"), data)
        storage.atomic_write_bytes(vloc.join(f"idmap-{s:05d}.parquet"), buf.getvalue())
        index_shards.append({"file": f"shard-{s:05d}.index", "rows": len(p), "bytes": len(data),
                             "idmap_file": f"idmap-{s:05d}.parquet", "idmap_bytes": len(buf.getvalue())})
        sources.append({"path": f"src/part-{s:05d}.parquet", "size": 1, "etag_or_checksum": "x", "rows": len(p),
                        "index_shard": f"shard-{s:05d}.index", "id_min": int(ids[p].min()), "id_max": int(ids[p].max())})
    manifest = {"schema_version": 1, "model_uri": "models:/sscq/5", "model_version": version,
                "codebook_checksum": fi.codebook_checksum(c), "bits": 4 * M, "M": M, "K": 16,
                "index_type": "pq_fastscan", "index_params": {}, "created_at": now_iso(), "complete": complete,
                "sources": sources, "index_shards": index_shards}
    storage.atomic_write_bytes(vloc.join("manifest.json"), json.dumps(manifest).encode())
    storage.atomic_write_bytes(root.join("CURRENT"), (version + "\n").encode())
    return root


def assert_same_topk(d1, i1, d2, i2):
    """Equal distances; equal id sets below the k-th distance (ties at the boundary may
    be broken differently, and both choices are correct)."""
    np.testing.assert_array_equal(d1, d2)
    for r in range(len(d1)):
        below = d1[r] < d1[r, -1]
        assert set(i1[r][below]) == set(i2[r][below])
        assert len(set(i1[r])) == len(set(i2[r])) == d1.shape[1]


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_merge_over_shards_equals_one_index(kind):
    c = codebooks()
    x, ids, _ = dataset(c, 6000)
    queries, _ = fi.synthetic_embeddings(c, 100, 0.5, np.random.default_rng(7))
    single = fi.deserialize(fi.serialize(empty_index(kind, c, x)))
    fi.add(single, x, ids)
    d_one, i_one = single.search(queries, 20)
    shards, _ = shard_indices(kind, c, x, ids, 4)
    results = [s.search(queries, 20) for s in shards]
    d_m, i_m = merge_topk([r[0] for r in results], [r[1] for r in results], 20)
    assert_same_topk(d_one, i_one, d_m, i_m)
    assert i_m.dtype == np.int64 and d_m.dtype == np.float32


def test_merge_topk_pads_missing_results():
    d = [np.array([[1.0, 5.0]], np.float32), np.array([[0.5, np.nan]], np.float32)]
    i = [np.array([[10, 11]]), np.array([[20, -1]])]
    dist, ids = merge_topk(d, i, 4)
    np.testing.assert_array_equal(ids, [[20, 10, 11, -1]])
    assert np.isinf(dist[0, 3])
    dist, ids = merge_topk([d[0]], [i[0]], 3)
    np.testing.assert_array_equal(ids, [[10, 11, -1]])


def test_part_file_round_trip_and_errors():
    meta = pa.table({"label": [[1, 2], None, [3]], "uri": ["a", None, "c"], "row_group": [0, 0, 1], "row": [0, 4, 0]},
                    schema=PART_META_SCHEMA)
    codes = np.arange(12, dtype=np.uint8).reshape(3, 4)
    data = part_bytes(PartRows(np.array([3, 1, 2]), codes, np.array([7, 0, 7]), meta))
    back = parse_part(data, "mem", ivf=True)
    assert back.ids.tolist() == [3, 1, 2] and back.lists.tolist() == [7, 0, 7]
    np.testing.assert_array_equal(back.codes, codes)
    assert back.meta.column("label").to_pylist() == [[1, 2], None, [3]]
    assert back.meta.column("uri").to_pylist() == ["a", None, "c"]
    assert back.meta.column("row_group").to_pylist() == [0, 0, 1] and back.meta.column("row").to_pylist() == [0, 4, 0]
    with pytest.raises(IndexError_, match="part file mem: missing column 'list'"):
        parse_part(part_bytes(PartRows(back.ids, codes, None, meta)), "mem", ivf=True)
    with pytest.raises(IndexError_, match="part file bad: not a readable Parquet file"):
        parse_part(b"nope", "bad", ivf=False)


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_answers_equal_the_per_part_faiss_indices_of_the_previous_design(tmp_path, kind):
    """Same model and rows: lean parts merged into the one trained index answer the ids and
    distances that whole per-part FAISS indices (the previous part format) merged by top-k gave."""
    c = codebooks()
    x, ids, uris = dataset(c, 4000)
    write_root(str(tmp_path / "index"), kind, c, x, ids, uris, n_shards=4)
    s = Searcher.open(str(tmp_path / "index"), nprobe=32)
    old_parts, _ = shard_indices(kind, c, x, ids, 4)
    for index in old_parts:
        fi.set_nprobe(index, 32)
    queries, _ = fi.synthetic_embeddings(c, 60, 0.5, np.random.default_rng(5))
    for q in queries:
        got = s.search(q[None], 10)
        old = [p.search(q[None], 10) for p in old_parts]
        d_old, i_old = merge_topk([r[0] for r in old], [r[1] for r in old], 10)
        assert_same_topk(got.distances, got.ids, d_old, i_old)


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_searcher_local_root(tmp_path, kind):
    c = codebooks()
    x, ids, uris = dataset(c, 3000)
    labels = [[int(i % 10), 7] if i % 3 else None for i in ids]
    write_root(str(tmp_path / "index"), kind, c, x, ids, uris, labels=labels)
    s = Searcher.open(str(tmp_path / "index"), nprobe=32)
    # The three parts are merged into one in-memory index (one partition).
    assert s.ntotal == 3000 and len(s.snapshot.parts) == 3 and len(s.parts) == 1 and s.version == "5/00000001"
    res = s.search(x[:40], 5)
    assert res.ids.shape == (40, 5) and res.distances.shape == (40, 5)
    assert (res.ids[:, 0] == ids[:40]).mean() > 0.9  # a stored vector finds itself
    uri_of = dict(zip(ids.tolist(), uris))
    label_of = dict(zip(ids.tolist(), labels))
    for row_ids, row_uris, row_labels in zip(res.ids, res.uris, res.labels):
        assert row_uris == [uri_of[i] for i in row_ids]
        assert row_labels == [label_of[i] for i in row_ids]  # from the parts: no source shard exists here
    assert any(u is None for row in res.uris for u in row)  # null uris come back as None
    if kind == "ivf_pq_fastscan":
        assert all(sh.nprobe == 32 for sh in s.parts)


def test_searcher_encodes_images_with_its_encoder(tmp_path):
    c = codebooks()
    x, ids, uris = dataset(c, 1000)
    write_root(str(tmp_path / "index"), "pq_fastscan", c, x, ids, uris, n_shards=2)
    images = np.arange(5)  # stand-ins: the encoder maps image i to embedding i

    s = Searcher.open(str(tmp_path / "index"), encoder=lambda imgs: x[imgs], codebooks=c)
    res = s.search_images(images, 3)
    np.testing.assert_array_equal(res.ids, s.search(x[:5], 3).ids)
    with pytest.raises(ValueError, match="no encoder"):
        Searcher.open(str(tmp_path / "index")).search_images(images, 3)


def test_searcher_refuses_other_codebooks_and_bad_queries(tmp_path):
    c = codebooks()
    x, ids, uris = dataset(c, 500)
    write_root(str(tmp_path / "index"), "pq_fastscan", c, x, ids, uris, n_shards=1)
    with pytest.raises(IndexError_, match="codebook checksum mismatch"):
        Searcher.open(str(tmp_path / "index"), codebooks=codebooks(seed=3))
    s = Searcher.open(str(tmp_path / "index"))
    with pytest.raises(ValueError, match=r"\(Q, 128\)"):
        s.search(x[:2, :64], 3)


def test_searcher_errors_name_the_problem(tmp_path):
    with pytest.raises(IndexError_, match="has no CURRENT"):
        Searcher.open(str(tmp_path / "empty"))
    c = codebooks()
    x, ids, uris = dataset(c, 500)
    root = write_root(str(tmp_path / "gone"), "pq_fastscan", c, x, ids, uris, n_shards=1)
    storage.atomic_write_bytes(root.join("CURRENT"), b"5/00000002\n")  # a generation never written
    with pytest.raises(IndexError_, match="snapshot 5/00000002 does not exist"):
        Searcher.open(str(tmp_path / "gone"))
    root = write_root(str(tmp_path / "trunc"), "pq_fastscan", c, x, ids, uris, n_shards=1)
    part = version_loc(root, "5").join(part_files("part-00000-0123456789abcdef")[0])
    storage.write_bytes(part, storage.read_bytes(part)[:-10])  # truncated after the snapshot
    with pytest.raises(IndexError_, match="snapshot says"):
        Searcher.open(str(tmp_path / "trunc"))


def write_schema2_root(root_uri, c, x, ids, uris):
    """The previous snapshot layout (schema 2): per part a FAISS index with its own codebook copy
    (<part>.index) and an id map (<part>.ids.parquet), listed by a schema-2 snapshot."""
    root = write_root(root_uri, "pq_fastscan", c, x, ids, uris, n_shards=2)
    vloc = version_loc(root, "5")
    loc = snapshot_loc(root, "5", 1)
    snap = json.loads(storage.read_bytes(loc))
    # Schema 2 listed its parts inline (no manifests).
    snap.pop("manifests", None)
    snap["parts"] = [to_plain(p) for p in read_snapshot(root, "5/00000001").parts]
    shards, _ = shard_indices("pq_fastscan", c, x, ids, 2)
    for p, index in zip(snap["parts"], shards):
        data = fi.serialize(index)
        storage.atomic_write_bytes(vloc.join(f"parts/{p['part']}.index"), data)
        p.update(index_file=f"parts/{p['part']}.index", index_bytes=len(data), ids_file=f"parts/{p['part']}.ids.parquet",
                 ids_bytes=1)
    snap["schema_version"] = 2
    storage.atomic_write_bytes(loc, json.dumps(snap).encode())
    return root


def test_old_layout_roots_are_refused_with_the_rebuild_message(tmp_path):
    c = codebooks()
    x, ids, uris = dataset(c, 1000)
    write_legacy_root(str(tmp_path / "manifest"), c, x, ids, uris)
    write_schema2_root(str(tmp_path / "schema2"), c, x, ids, uris)
    for name, found in (("manifest", "manifest.json layout"), ("schema2", "schema 2: a FAISS index and an id map")):
        with pytest.raises(IndexError_, match=f"older index format \\(.*{found}.*rebuild it: run the reindex into a new "
                                              "--index-root"):
            Searcher.open(str(tmp_path / name))


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_searcher_s3_root_second_open_reads_from_cache(s3_root, tmp_path, kind):
    c = codebooks()
    x, ids, uris = dataset(c, 3000)
    root = write_root(s3_root, kind, c, x, ids, uris)
    cache = str(tmp_path / "cache")
    first = Searcher.open(s3_root, cache_dir=cache)
    want = first.search(x[:30], 10)
    # Remove every part object: only the cache can serve them now.
    vloc = version_loc(root, "5")
    for p in first.snapshot.parts:
        storage.delete(vloc.join(p.index_file))
    second = Searcher.open(s3_root, cache_dir=cache)
    got = second.search(x[:30], 10)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.distances, want.distances)
    assert got.uris == want.uris
    with pytest.raises(StorageError, match="not found"):
        Searcher.open(s3_root)  # without the cache the parts are gone: the cache really served them
