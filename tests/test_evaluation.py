"""Evaluation protocol (SPEC section 5): rankings, mAP@K, precision/recall, baselines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits

import conftest
from sscq_dist import evaluation as ev
from sscq_dist.errors import ConfigError

REPO = Path(conftest.REPO)


def _random_pq(rng, n_query, n_db, m, k=16, d=16):
    """Queries (Q, M*d), database codes (N, M), codebooks (M, K, d)."""
    codebooks = rng.standard_normal((m, k, d)).astype(np.float32)
    codes = rng.integers(0, k, (n_db, m))
    query_f = rng.standard_normal((n_query, m * d)).astype(np.float32)
    return query_f, codes, codebooks


def _reconstruct(codes, codebooks):
    """(N, M) codes -> (N, M*d) float64 concatenated codewords."""
    m = codebooks.shape[0]
    return np.concatenate([codebooks[j][codes[:, j]] for j in range(m)], axis=1).astype(np.float64)


def _bruteforce_adc(query_f, codes, codebooks, distance):
    """(Q, N) float64 distances, computed per subspace without lookup tables."""
    m, _, d = codebooks.shape
    rec = _reconstruct(codes, codebooks).reshape(len(codes), m, d)
    q = query_f.astype(np.float64).reshape(len(query_f), 1, m, d)
    per_sub = ((q - rec[None]) ** 2).sum(-1)  # (Q, N, M)
    if distance == "l2sum":
        per_sub = np.sqrt(per_sub)
    return per_sub.sum(-1)


def _random_labels(rng, n, num_classes, multi):
    """Per-item labels as a Parquet list<int32> column reads back: lists or None."""
    out = []
    for _ in range(n):
        if multi:
            r = rng.random()
            if r < 0.1:
                out.append(None)
            elif r < 0.15:
                out.append([])
            else:
                size = int(rng.integers(1, 4))
                out.append(sorted(rng.choice(num_classes, size=size, replace=False).tolist()))
        else:
            out.append(int(rng.integers(0, num_classes)))
    return out


def _as_set(label):
    if label is None:
        return set()
    if np.ndim(label) == 0:
        return {int(label)}
    return {int(x) for x in label}


def _naive_metrics(idx, query_labels, db_labels, ks, pr_k):
    """Per-query Python reference of AP@K, precision@k, recall@k and the PR points."""
    q_sets = [_as_set(x) for x in query_labels]
    d_sets = [_as_set(x) for x in db_labels]
    aps, prec, rec, pr_p, pr_r = [], [], [], [], []
    for q, row in enumerate(idx):
        rel = [1 if q_sets[q] & d_sets[i] else 0 for i in row]
        total = sum(1 for s in d_sets if q_sets[q] & s)
        hits, acc = 0, 0.0
        for r, x in enumerate(rel, start=1):
            if x:
                hits += 1
                acc += hits / r
        aps.append(acc / hits if hits else 0.0)
        prec.append([sum(rel[:k]) / k for k in ks])
        rec.append([sum(rel[:k]) / total if total else 0.0 for k in ks])
        pr_p.append([sum(rel[:k]) / k for k in pr_k])
        pr_r.append([sum(rel[:k]) / total if total else 0.0 for k in pr_k])
    return (np.array(aps), np.mean(prec, 0), np.mean(rec, 0), np.mean(pr_p, 0), np.mean(pr_r, 0))


# --------------------------------------------------------------------------- labels


def test_labels_to_matrix_reads_ints_lists_none_and_arrow():
    single = ev.labels_to_matrix(np.array([2, 0, 1]))
    assert single.dtype == bool and single.shape == (3, 3)
    assert single.tolist() == [[False, False, True], [True, False, False], [False, True, False]]

    multi = ev.labels_to_matrix([[0, 3], None, [], 1], num_classes=5)
    assert multi.shape == (4, 5)
    assert multi[0].tolist() == [True, False, False, True, False]
    assert not multi[1].any() and not multi[2].any()
    assert multi[3].tolist() == [False, True, False, False, False]

    arrow = pa.array([[1], None, [0, 2]], type=pa.list_(pa.int32()))
    assert ev.labels_to_matrix(arrow).tolist() == [[False, True, False], [False, False, False], [True, False, True]]

    assert ev.labels_to_matrix(np.array([[0, 1], [2, 2]])).tolist() == [[True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="out of range"):
        ev.labels_to_matrix([0, 5], num_classes=3)
    with pytest.raises(ValueError, match=">= 0"):
        ev.labels_to_matrix([0, -1])


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("multi", [False, True], ids=["single-label", "multi-label"])
def test_metrics_equal_naive_reference(multi):
    rng = np.random.default_rng(1 if multi else 2)
    n_q, n_db, classes = 60, 400, 6
    query_f, codes, codebooks = _random_pq(rng, n_q, n_db, m=4)
    q_labels = _random_labels(rng, n_q, classes, multi)
    db_labels = _random_labels(rng, n_db, classes, multi)
    # A class no database item carries: those queries have no relevant item (AP 0).
    q_labels[0] = [classes + 1] if multi else classes + 1
    q_labels[1] = None if multi else classes + 1

    topk = 50
    ks = (1, 5, 10, 50)
    _, idx = ev.rank_pq(query_f, codes, codebooks, topk, "sql2", chunk=16)
    res = ev.retrieval_metrics(idx, q_labels, db_labels, ks=ks, chunk=7)
    ap, prec, rec, pr_p, pr_r = _naive_metrics(idx, q_labels, db_labels, ks, res["pr_curve"]["k"])

    assert res["ap"][0] == 0.0 and res["ap"][1] == 0.0
    assert (res["ap"][2:] > 0).any()
    np.testing.assert_allclose(res["ap"], ap, rtol=1e-12)
    assert res["map"] == pytest.approx(ap.mean(), rel=1e-12)
    assert res["ks"].tolist() == list(ks)
    np.testing.assert_allclose(res["precision@k"], prec, rtol=1e-12)
    np.testing.assert_allclose(res["recall@k"], rec, rtol=1e-12)
    assert res["pr_curve"]["k"][0] == 1 and res["pr_curve"]["k"][-1] == topk
    np.testing.assert_allclose(res["pr_curve"]["precision"], pr_p, rtol=1e-12)
    np.testing.assert_allclose(res["pr_curve"]["recall"], pr_r, rtol=1e-12)
    # Same numbers whether labels come as lists or as multi-hot matrices.
    ql, dl = ev._label_matrices(q_labels, db_labels)
    assert ev.retrieval_metrics(idx, ql, dl, ks=ks)["map"] == res["map"]


def test_map_uses_relevant_items_in_top_k_as_denominator():
    # rel = [1, 0, 1]: AP@3 = (1/1 + 2/3) / 2, although the database holds 4 relevant items.
    db_labels = np.array([0, 1, 0, 0, 0])
    idx = np.array([[0, 1, 2]])
    res = ev.retrieval_metrics(idx, np.array([0]), db_labels, ks=(1, 3))
    assert res["map"] == pytest.approx((1 + 2 / 3) / 2)
    assert res["precision@k"].tolist() == pytest.approx([1.0, 2 / 3])
    assert res["recall@k"].tolist() == pytest.approx([1 / 4, 2 / 4])


def test_cutoffs_beyond_results_are_refused():
    with pytest.raises(ConfigError, match="cut-offs"):
        ev.retrieval_metrics(np.zeros((2, 5), dtype=np.int64), [0, 1], [0, 1, 1], ks=(1, 10))


def test_flatten_metrics_gives_scalars_for_logging():
    res = ev.retrieval_metrics(np.array([[0, 1]]), [0], [0, 1], ks=(1, 2))
    flat = ev.flatten_metrics(res, prefix="val/")
    assert flat == {"val/map": 1.0, "val/precision@1": 1.0, "val/recall@1": 1.0,
                    "val/precision@2": 0.5, "val/recall@2": 1.0}


# --------------------------------------------------------------------------- ranking


@pytest.mark.parametrize("distance", ["sql2", "l2sum"])
def test_rank_pq_equals_bruteforce_adc(distance):
    rng = np.random.default_rng(3)
    query_f, codes, codebooks = _random_pq(rng, 40, 700, m=4)
    dist, idx = ev.rank_pq(query_f, codes, codebooks, 30, distance, chunk=9)
    full = _bruteforce_adc(query_f, codes, codebooks, distance)
    ref = np.argsort(full, axis=1, kind="stable")[:, :30]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(dist, np.take_along_axis(full, ref, 1), rtol=1e-5)
    assert dist.dtype == np.float32 and idx.dtype == np.int64


def test_rank_pq_breaks_ties_by_database_row():
    # M = 1: 16 distinct codes for 500 items, so most distances are exact ties.
    rng = np.random.default_rng(4)
    query_f, codes, codebooks = _random_pq(rng, 25, 500, m=1)
    for distance in ("sql2", "l2sum"):
        _, idx = ev.rank_pq(query_f, codes, codebooks, 70, distance)
        full = _bruteforce_adc(query_f, codes, codebooks, distance)
        np.testing.assert_array_equal(idx, np.argsort(full, axis=1, kind="stable")[:, :70])


def test_both_distances_rank_identically_for_one_subspace():
    rng = np.random.default_rng(5)
    query_f, codes, codebooks = _random_pq(rng, 50, 900, m=1)
    _, idx_sq = ev.rank_pq(query_f, codes, codebooks, 200, "sql2")
    _, idx_l2 = ev.rank_pq(query_f, codes, codebooks, 200, "l2sum")
    np.testing.assert_array_equal(idx_sq, idx_l2)
    # With several subspaces they are different distances: rankings differ somewhere.
    query_f, codes, codebooks = _random_pq(rng, 50, 900, m=8)
    assert (ev.rank_pq(query_f, codes, codebooks, 200, "sql2")[1]
            != ev.rank_pq(query_f, codes, codebooks, 200, "l2sum")[1]).any()


def test_sql2_equals_faiss_indexpq_with_the_same_codebooks():
    rng = np.random.default_rng(6)
    m, k, d = 8, 16, 16
    query_f, codes, codebooks = _random_pq(rng, 30, 2000, m=m, k=k, d=d)
    index = faiss.IndexPQ(m * d, m, 4)
    faiss.copy_array_to_vector(codebooks.ravel(), index.pq.centroids)
    index.is_trained = True
    recon = _reconstruct(codes, codebooks).astype(np.float32)
    # Reconstructions sit exactly on codewords, so FAISS re-encodes them to our codes
    # (4-bit codes, two per byte, the first in the low nibble).
    packed = index.sa_encode(recon)
    np.testing.assert_array_equal(np.stack([packed & 15, packed >> 4], -1).reshape(len(codes), m), codes)
    index.add(recon)

    f_dist, f_idx = index.search(query_f, 50)
    dist, idx = ev.rank_pq(query_f, codes, codebooks, 50, "sql2")
    np.testing.assert_allclose(dist, f_dist, rtol=1e-3)
    assert (idx == f_idx).mean() > 0.99


def test_rank_float_equals_numpy_l2():
    rng = np.random.default_rng(7)
    # Far from the origin like raw pixels, where float32 cancellation would bite.
    db = (rng.random((600, 64)) * 255).astype(np.float32)
    qx = (rng.random((35, 64)) * 255).astype(np.float32)
    dist, idx = ev.rank_float(qx, db, 40, chunk=8)
    full = ((qx[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
    ref = np.argsort(full, axis=1, kind="stable")[:, :40]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(dist, np.take_along_axis(full, ref, 1), rtol=1e-4)


def test_topk_equals_stable_sort_including_fallback_rows():
    rng = np.random.default_rng(8)
    n, k = 3000, 100
    step = n // (ev._CANDIDATE_SAMPLE * k)
    dist = rng.integers(0, 40, (6, n)).astype(np.float32)  # heavy ties
    dist[1] = rng.random(n)
    # Row 2: the strided sample holds the smallest values, so its bound keeps < k items
    # and the row takes the full-row path.
    dist[2] = 1e6
    dist[2, ::step] = np.arange(len(range(0, n, step)))
    dist[3] = 5.0  # all tied
    for kk in (1, k, n - 1, n):
        d, i = ev._topk_rows(dist, kk)
        ref = np.argsort(dist, axis=1, kind="stable")[:, :kk]
        np.testing.assert_array_equal(i, ref)
        np.testing.assert_array_equal(d, np.take_along_axis(dist, ref, 1))


def test_topk_is_capped_at_database_size_and_bad_arguments_fail():
    rng = np.random.default_rng(9)
    query_f, codes, codebooks = _random_pq(rng, 3, 10, m=2)
    dist, idx = ev.rank_pq(query_f, codes, codebooks, 50)
    assert idx.shape == (3, 10) and sorted(idx[0].tolist()) == list(range(10))
    with pytest.raises(ConfigError, match="distance"):
        ev.rank_pq(query_f, codes, codebooks, 5, distance="cosine")
    with pytest.raises(ConfigError, match="topk"):
        ev.rank_pq(query_f, codes, codebooks, 0)
    with pytest.raises(ValueError, match="db_codes"):
        ev.rank_pq(query_f, codes + 16, codebooks, 5)
    with pytest.raises(ValueError, match="query_f"):
        ev.rank_pq(query_f[:, :5], codes, codebooks, 5)


def test_evaluate_pq_reports_both_distances():
    rng = np.random.default_rng(10)
    query_f, codes, codebooks = _random_pq(rng, 40, 300, m=4)
    res = ev.evaluate_pq(query_f, rng.integers(0, 3, 40), codes, rng.integers(0, 3, 300), codebooks, 20)
    assert res["map"] == res["map_sql2"]
    assert 0.0 < res["map_sql2"] <= 1.0 and 0.0 < res["map_l2sum"] <= 1.0
    assert res["ks"].tolist() == [1, 10, 20]
    assert set(res["pr_curve_l2sum"]) == {"k", "precision", "recall"}


# --------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def digits_split():
    """scikit-learn digits: 1,500 database / 297 query images, fixed permutation."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x = x.astype(np.float32)[perm]
    y = y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def test_pixel_pq_baseline_on_digits_is_sane_and_below_exact_l2(digits_split):
    db_x, db_y, q_x, q_y = digits_split
    pq = ev.pixel_pq_baseline(db_x, q_x, db_y, q_y, bits=32, topk=100, seed=0)
    exact = ev.evaluate_float(q_x, q_y, db_x, db_y, topk=100)
    assert pq["M"] == 8 and pq["dim"] == 64
    assert pq["map"] > 0.5
    assert exact["map"] >= pq["map"] - 0.05
    # Deterministic under a fixed seed.
    assert ev.pixel_pq_baseline(db_x, q_x, db_y, q_y, bits=32, topk=100, seed=0)["map"] == pq["map"]


def test_pixel_pq_baseline_pads_dimension_to_a_multiple_of_m(digits_split):
    db_x, db_y, q_x, q_y = digits_split
    res = ev.pixel_pq_baseline(db_x, q_x, db_y, q_y, bits=20, topk=50)  # M = 5, 64 -> 65
    assert res["M"] == 5 and res["dim"] == 65
    assert res["map"] > 0.5
    with pytest.raises(ConfigError, match="bits"):
        ev.pixel_pq_baseline(db_x, q_x, db_y, q_y, bits=30, topk=50)


def test_plot_pr_curve_writes_png(tmp_path):
    curves = {
        "a": {"k": [1, 10], "precision": [1.0, 0.8], "recall": [0.1, 0.6]},
        "b": {"k": [1, 10], "precision": [0.9, 0.5], "recall": [0.05, 0.4]},
    }
    out = tmp_path / "plots" / "pr.png"
    ev.plot_pr_curve(curves, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_speed_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "eval_speed.py"),
         "--queries", "40", "--database", "300", "--bits", "16", "--topk", "20"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "peak RSS" in proc.stdout and "map_sql2=" in proc.stdout
