"""Search over index shards: merge equals one index; Searcher opens local and S3 roots."""

import uuid

import numpy as np
import pytest

from sscq_dist import storage
from sscq_dist.errors import IndexError_, StorageError
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.manifest import (IndexManifest, IndexShard, SourceShard, now_iso, version_loc,
                                         write_current, write_manifest)
from sscq_dist.search import (Searcher, index_shard_name, idmap_name, merge_topk, read_idmap, write_idmap)

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
    """What the encoding job does: one trained empty index, copied per shard."""
    template = fi.serialize(empty_index(kind, c, x))
    parts = np.array_split(np.arange(len(x)), n_shards)
    shards = []
    for p in parts:
        index = fi.deserialize(template)
        fi.add(index, x[p], ids[p])
        shards.append(index)
    return shards, parts


def write_root(root_uri, kind, c, x, ids, uris, n_shards=3, version="5", complete=True):
    root = storage.resolve(root_uri)
    vloc = version_loc(root, version)
    shards, parts = shard_indices(kind, c, x, ids, n_shards)
    index_shards, sources = [], []
    for s, (index, p) in enumerate(zip(shards, parts)):
        data = fi.serialize(index)
        storage.atomic_write_bytes(vloc.join(index_shard_name(s)), data)
        nbytes = write_idmap(vloc.join(idmap_name(s)), ids[p], [uris[i] for i in p])
        index_shards.append(IndexShard(file=index_shard_name(s), rows=len(p), bytes=len(data),
                                       idmap_file=idmap_name(s), idmap_bytes=nbytes))
        sources.append(SourceShard(path=f"src/part-{s:05d}.parquet", size=1, etag_or_checksum="x", rows=len(p),
                                   index_shard=index_shard_name(s), id_min=int(ids[p].min()),
                                   id_max=int(ids[p].max())))
    manifest = IndexManifest(model_uri="models:/sscq/5", model_version=version,
                             codebook_checksum=fi.codebook_checksum(c), bits=4 * M, M=M, K=16, index_type=kind,
                             index_params={}, created_at=now_iso(), complete=complete, sources=sources,
                             index_shards=index_shards)
    write_manifest(root, manifest)
    write_current(root, version)
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


def test_idmap_round_trip(tmp_path):
    loc = storage.resolve(str(tmp_path / "idmap-00000.parquet"))
    size = write_idmap(loc, np.array([3, 1, 2]), ["a", None, "c"])
    assert size == (tmp_path / "idmap-00000.parquet").stat().st_size
    ids, uris = read_idmap(loc)
    assert ids.dtype == np.int64 and list(ids) == [3, 1, 2] and uris.to_pylist() == ["a", None, "c"]


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_searcher_local_root(tmp_path, kind):
    c = codebooks()
    x, ids, uris = dataset(c, 3000)
    write_root(str(tmp_path / "index"), kind, c, x, ids, uris)
    s = Searcher.open(str(tmp_path / "index"), nprobe=32)
    assert s.ntotal == 3000 and len(s.shards) == 3 and s.version == "5"
    res = s.search(x[:40], 5)
    assert res.ids.shape == (40, 5) and res.distances.shape == (40, 5)
    assert (res.ids[:, 0] == ids[:40]).mean() > 0.9  # a stored vector finds itself
    uri_of = dict(zip(ids.tolist(), uris))
    for row_ids, row_uris in zip(res.ids, res.uris):
        assert row_uris == [uri_of[i] for i in row_ids]
    assert any(u is None for row in res.uris for u in row)  # null uris come back as None
    if kind == "ivf_pq_fastscan":
        assert all(sh.nprobe == 32 for sh in s.shards)


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
    write_root(str(tmp_path / "inc"), "pq_fastscan", c, x, ids, uris, n_shards=1, complete=False)
    with pytest.raises(IndexError_, match="incomplete"):
        Searcher.open(str(tmp_path / "inc"))
    root = write_root(str(tmp_path / "trunc"), "pq_fastscan", c, x, ids, uris, n_shards=1)
    shard = version_loc(root, "5").join("shard-00000.index")
    storage.write_bytes(shard, storage.read_bytes(shard)[:-10])  # truncated after the manifest
    with pytest.raises(IndexError_, match="manifest says"):
        Searcher.open(str(tmp_path / "trunc"))


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
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"idx-{uuid.uuid4().hex[:12]}"
    storage.s3fs_filesystem().call_s3("create_bucket", Bucket=bucket)
    return f"s3://{bucket}/index"


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_searcher_s3_root_second_open_reads_from_cache(s3_root, tmp_path, kind):
    c = codebooks()
    x, ids, uris = dataset(c, 3000)
    root = write_root(s3_root, kind, c, x, ids, uris)
    cache = str(tmp_path / "cache")
    first = Searcher.open(s3_root, cache_dir=cache)
    want = first.search(x[:30], 10)
    # Remove every shard and id-map object: only the cache can serve them now.
    vloc = version_loc(root, "5")
    for sh in first.manifest.index_shards:
        storage.delete(vloc.join(sh.file))
        storage.delete(vloc.join(sh.idmap_file))
    second = Searcher.open(s3_root, cache_dir=cache)
    got = second.search(x[:30], 10)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.distances, want.distances)
    assert got.uris == want.uris
    with pytest.raises(StorageError, match="not found"):
        Searcher.open(s3_root)  # without the cache the shards are gone: the cache really served them
