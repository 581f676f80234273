"""FAISS fast-scan indices built from learned codebooks store exactly the model's codes."""

import faiss
import numpy as np
import pytest

from sscq_dist.config import IndexConfig
from sscq_dist.indexing import faiss_index as fi

D_SUB = 16


def make_codebooks(m: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, 16, D_SUB)).astype(np.float32)


def make_data(codebooks, n, seed=1, noise=0.7):
    rng = np.random.default_rng(seed)
    x, _ = fi.synthetic_embeddings(codebooks, n, noise, rng)
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    return x, ids


def build(kind, codebooks, x, seed=0):
    if kind == "pq_fastscan":
        return fi.build_pq_fastscan(codebooks)
    sample = x[np.random.default_rng(seed).choice(len(x), 1000, replace=False)]
    return fi.build_ivf_pq_fastscan(codebooks, sample, nlist=16, nprobe=4, seed=seed)


def by_id(ids, codes):
    order = np.argsort(ids)
    return ids[order], codes[order]


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_codes_faiss_assigns_equal_model_argmin_codes(kind, m):
    codebooks = make_codebooks(m)
    x, ids = make_data(codebooks, 3000)
    argmin = fi.assign_codes(x, codebooks)  # the model's hard codes
    # noise 0.7 makes some subspaces land nearer another codeword: argmin is not trivial
    _, gen = fi.synthetic_embeddings(codebooks, 3000, 0.7, np.random.default_rng(1))
    assert (argmin != gen).any()
    index = build(kind, codebooks, x)
    fi.add(index, x, ids)
    stored_ids, stored_codes = by_id(*fi.index_codes(index))
    want_ids, want_codes = by_id(ids, argmin)
    np.testing.assert_array_equal(stored_ids, want_ids)
    np.testing.assert_array_equal(stored_codes, want_codes)
    # the PQ kept the learned codebooks (no FAISS training touched them)
    base = index if kind == "ivf_pq_fastscan" else faiss.downcast_index(index.index)
    np.testing.assert_array_equal(faiss.vector_to_array(base.pq.centroids).reshape(m, 16, D_SUB), codebooks)


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_encode_with_the_trained_index_gives_what_add_stores(kind):
    """A lean part holds fi.encode's codes: the model's argmin codes, and for IVF the list FAISS's add picks."""
    codebooks = make_codebooks(8)
    x, ids = make_data(codebooks, 3000)
    trained = build(kind, codebooks, x)
    codes, lists = fi.encode(trained, x)
    np.testing.assert_array_equal(fi.unpack_codes(codes, 8), fi.assign_codes(x, codebooks))
    assert trained.ntotal == 0  # encoding does not add
    if kind == "ivf_pq_fastscan":
        from faiss.contrib.inspect_tools import get_invlist

        fi.add(trained, x, ids)
        where = {int(i): n for n in range(trained.nlist) for i in get_invlist(trained.invlists, n)[0]}
        assert [where[int(i)] for i in ids] == lists.tolist()
    else:
        assert lists is None


@pytest.mark.parametrize("kind", ["pq_fastscan", "ivf_pq_fastscan"])
def test_serialize_round_trip_keeps_codes_ids_and_results(kind):
    codebooks = make_codebooks(8)
    x, ids = make_data(codebooks, 2000)
    index = build(kind, codebooks, x)
    fi.add(index, x, ids)
    data = fi.serialize(index)
    assert isinstance(data, bytes) and not data.startswith(b"\x80")  # FAISS format, not a pickle
    copy = fi.deserialize(data)
    assert type(copy) is type(index)
    for a, b in zip(fi.index_codes(index), fi.index_codes(copy)):
        np.testing.assert_array_equal(a, b)
    q = x[:20]
    np.testing.assert_array_equal(index.search(q, 5)[1], copy.search(q, 5)[1])
    if kind == "ivf_pq_fastscan":
        assert copy.nprobe == 4 and not copy.by_residual


def test_ivf_uses_own_codes_not_residuals():
    codebooks = make_codebooks(8)
    x, ids = make_data(codebooks, 2000)
    index = build("ivf_pq_fastscan", codebooks, x)
    assert index.by_residual is False
    assert index.quantizer.ntotal == 16 and index.is_trained
    fi.add(index, x, ids)
    # a query equal to a stored vector finds it first
    _, found = index.search(x[:50], 1)
    assert (found[:, 0] == ids[:50]).mean() > 0.95


def test_ivf_refuses_a_sample_smaller_than_nlist():
    codebooks = make_codebooks(4)
    x, _ = make_data(codebooks, 10)
    with pytest.raises(ValueError, match="nlist=16"):
        fi.build_ivf_pq_fastscan(codebooks, x, nlist=16, nprobe=1)


def test_build_refuses_codebooks_with_wrong_shape():
    with pytest.raises(ValueError, match=r"\(M, 16, d\)"):
        fi.build_pq_fastscan(np.zeros((4, 8, 16), np.float32))


def test_exhaustive_adc_holds_the_codes_and_computes_float_adc():
    codebooks = make_codebooks(8)
    x, ids = make_data(codebooks, 500)
    codes = fi.assign_codes(x, codebooks)
    ref = fi.exhaustive_adc(codebooks, codes, ids)
    stored_ids, stored_codes = fi.index_codes(ref)
    np.testing.assert_array_equal(stored_ids, ids)
    np.testing.assert_array_equal(stored_codes, codes)
    q = make_data(codebooks, 5, seed=9)[0]
    recon = codebooks[np.arange(8)[None, :], codes].reshape(len(codes), -1)  # (N, D)
    exact = ((q[:, None, :] - recon[None]) ** 2).sum(-1)  # (Q, N)
    dist, found = ref.search(q, 10)
    np.testing.assert_array_equal(found, ids[np.argsort(exact, axis=1)[:, :10]])
    np.testing.assert_allclose(dist, np.sort(exact, axis=1)[:, :10], rtol=1e-4)


def test_pack_codes_round_trip_odd_m():
    codes = np.random.default_rng(0).integers(0, 16, (7, 5)).astype(np.uint8)
    packed = fi.pack_codes(codes)
    assert packed.shape == (7, 3)
    np.testing.assert_array_equal(fi.unpack_codes(packed, 5), codes)


def test_codebook_checksum_is_stable_and_sensitive():
    c = make_codebooks(8)
    s = fi.codebook_checksum(c)
    assert s.startswith("sha256:") and len(s) == 7 + 64
    assert fi.codebook_checksum(c.astype(np.float64)) == s  # hashed as float32
    c2 = c.copy()
    c2[3, 5, 1] = np.nextafter(c2[3, 5, 1], np.float32(10))
    assert fi.codebook_checksum(c2) != s


def test_recall_at_counts_overlap():
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[2, 1, 9, 9], [5, -1, -1, -1]])
    assert fi.recall_at(found, ref, 2) == pytest.approx((2 + 1) / 4)
    assert fi.recall_at(found, ref, 4) == pytest.approx((2 + 1) / 8)
    assert fi.recall_at(ref, ref, 4) == 1.0


def test_measure_qps_reflects_the_work_searched():
    """QPS is queries per second of index.search: the best of `repeats` runs of Q queries takes
    Q / qps seconds, which cannot exceed the wall time / repeats; and an exhaustive scan of
    100x the codes answers fewer queries per second."""
    import time

    codebooks = make_codebooks(4)
    x, ids = make_data(codebooks, 100_000)
    small, large = fi.build_pq_fastscan(codebooks), fi.build_pq_fastscan(codebooks)
    fi.add(small, x[:1000], ids[:1000])
    fi.add(large, x, ids)
    q = x[:200]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one thread: a busy machine preempts it less than a team of them
    try:
        t0 = time.perf_counter()
        qps_small = fi.measure_qps(small, q, 10, repeats=5)
        wall = time.perf_counter() - t0
        qps_large = fi.measure_qps(large, q, 10, repeats=5)
    finally:
        faiss.omp_set_num_threads(threads)
    assert len(q) / qps_small <= wall / 5
    assert qps_large < qps_small / 3, (qps_small, qps_large)  # measured ~20x apart


def test_reservoir_keeps_a_uniform_seeded_sample():
    n, total, trials = 50, 500, 400
    counts = np.zeros(total)
    for seed in range(trials):
        s = fi.ReservoirSampler(n, seed=seed)
        for start in range(0, total, 37):  # batches smaller than n, then crossing it
            s.add(np.arange(start, min(start + 37, total))[:, None])
        rows = s.sample()[:, 0]
        assert len(rows) == n and len(np.unique(rows)) == n
        counts[rows] += 1
    expected = trials * n / total  # 40 per row
    # first and last rows of the stream are kept as often as any (not the first N)
    assert abs(counts[:100].mean() - expected) < 3 and abs(counts[-100:].mean() - expected) < 3
    assert counts.min() > 15
    a = fi.reservoir_sample([np.arange(300)[:, None]], 20, seed=3)
    b = fi.reservoir_sample([np.arange(150)[:, None], np.arange(150, 300)[:, None]], 20, seed=3)
    assert sorted(a[:, 0]) != list(range(20))
    np.testing.assert_array_equal(fi.reservoir_sample([np.arange(300)[:, None]], 20, seed=3), a)
    assert len(b) == 20


def test_reservoir_smaller_stream_keeps_everything():
    s = fi.ReservoirSampler(100, seed=0)
    s.add(np.ones((30, 4), np.float32))
    assert s.sample().shape == (30, 4)


def test_ivf_default_nprobe_recall_at_10_on_200k():
    """The served IVF index at IndexConfig's nlist/nprobe keeps recall@10 >= 0.95 vs
    exhaustive float ADC over the same codes (synthetic 200k vectors, 32 bits)."""
    cfg = IndexConfig()
    rng = np.random.default_rng(0)
    codebooks = make_codebooks(8, seed=5)
    x, _ = fi.synthetic_embeddings(codebooks, 200_000, 0.5, rng)
    ids = np.arange(len(x), dtype=np.int64) * 2 + 7
    queries, _ = fi.synthetic_embeddings(codebooks, 1000, 0.5, rng)
    sampler = fi.ReservoirSampler(min(cfg.ivf_train_sample, 64 * cfg.nlist), seed=0)
    for start in range(0, len(x), 50_000):
        sampler.add(x[start:start + 50_000])
    index = fi.build_ivf_pq_fastscan(codebooks, sampler.sample(), cfg.nlist, cfg.nprobe, seed=0,
                                     niter=cfg.kmeans_iters)
    fi.add(index, x, ids)
    stored_ids, stored_codes = fi.index_codes(index)
    ref = fi.exhaustive_adc(codebooks, stored_codes, stored_ids)
    _, ref_ids = ref.search(queries, 10)
    _, found = index.search(queries, 10)
    recall = fi.recall_at(found, ref_ids, 10)
    assert recall >= 0.95, f"recall@10 {recall:.3f} at nlist={cfg.nlist} nprobe={cfg.nprobe}"
