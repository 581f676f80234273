"""Retrieval evaluation: exhaustive ranking, mAP@K, precision/recall and PR curves (SPEC section 5).

Plain functions, arrays in and numbers out; printing and logging happen in the caller.

Protocol:
- database items are hard PQ codes, queries keep their raw embedding f (asymmetric
  distance). Two distances are reported side by side: ``sql2``, the sum over subspaces of
  the squared L2 distance (what a FAISS PQ index serves), and ``l2sum``, the sum over
  subspaces of the non-squared L2 distance (the SSCQ authors' reference distance);
- relevance: a database item is relevant to a query when they share at least one label;
- AP@K = (1 / R_K) * sum_{r <= K} rel_r * P@r with R_K the relevant items in the top K;
  a query with none scores 0, and every query counts in the mean.

Rankings are exhaustive and deterministic: ties are broken by the lower database index,
so a result equals a stable full sort truncated to K. Work is chunked over queries; peak
memory is about ``chunk * N * 4`` bytes for the distance block of one chunk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from sscq_dist.errors import ConfigError

DISTANCES = ("sql2", "l2sum")
# Cut-offs kept on the precision-recall curve (evenly spaced from 1 to K).
PR_POINTS = 20
# Rows of query labels compared against all distinct database label sets at once.
_LABEL_CHUNK = 512
# Top-k pre-selection samples about this many times k columns of each distance row.
_CANDIDATE_SAMPLE = 8


# --------------------------------------------------------------------------- labels


def labels_to_matrix(labels: Any, num_classes: Optional[int] = None) -> np.ndarray:
    """Turn per-item labels into a multi-hot matrix.

    Args:
        labels: one entry per item, each an int (single-label), a list/array of ints
            (multi-label, as read from a Parquet ``list<int32>`` column) or None (no
            labels). A 1-D int array is read as single labels; a 2-D int array as one
            equal-length label list per row; a 2-D bool array is taken as the matrix
            itself. pyarrow arrays are accepted (read through ``to_pylist``).
        num_classes: C; None means ``max label + 1``.

    Returns:
        (N, C) bool, True where item n carries label c.
    """
    if hasattr(labels, "to_pylist"):  # pyarrow Array / ChunkedArray
        labels = labels.to_pylist()
    if isinstance(labels, np.ndarray) and labels.dtype == np.bool_:
        if labels.ndim != 2:
            raise ValueError(f"bool label matrix must be 2-D (N, C), got shape {labels.shape}")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise ValueError(f"label matrix has {labels.shape[1]} classes, expected {num_classes}")
        return labels
    if isinstance(labels, np.ndarray) and labels.dtype != object and labels.ndim in (1, 2):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        arr = labels.reshape(len(labels), -1).astype(np.int64)
        rows = np.repeat(np.arange(len(arr)), arr.shape[1])
        cols = arr.ravel()
    else:
        rows_l: list[int] = []
        cols_l: list[int] = []
        for n, item in enumerate(labels):
            if item is None:
                continue
            if np.ndim(item) == 0:
                rows_l.append(n)
                cols_l.append(int(item))
            else:
                for c in item:
                    rows_l.append(n)
                    cols_l.append(int(c))
        rows = np.asarray(rows_l, dtype=np.int64)
        cols = np.asarray(cols_l, dtype=np.int64)
        arr = labels
    n_items = len(arr)
    if cols.size and cols.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(cols.min())}")
    needed = int(cols.max()) + 1 if cols.size else 0
    if num_classes is None:
        num_classes = needed
    elif needed > num_classes:
        raise ValueError(f"label {needed - 1} out of range for num_classes={num_classes}")
    out = np.zeros((n_items, num_classes), dtype=bool)
    out[rows, cols] = True
    return out


def _label_matrices(query_labels: Any, db_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot (Q, C) and (N, C) matrices over one shared class count C."""
    q = labels_to_matrix(query_labels)
    d = labels_to_matrix(db_labels)
    c = max(q.shape[1], d.shape[1])
    q = _pad_classes(q, c)
    d = _pad_classes(d, c)
    return q, d


def _pad_classes(m: np.ndarray, c: int) -> np.ndarray:
    if m.shape[1] == c:
        return m
    return np.concatenate([m, np.zeros((m.shape[0], c - m.shape[1]), dtype=bool)], axis=1)


# --------------------------------------------------------------------------- ranking


def _check_topk(topk: int, chunk: int) -> None:
    if int(topk) < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    if int(chunk) < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")


def _select_k(vals: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest k per row of candidate lists, ordered by (value, id).

    Args:
        vals: (q, c) float32 candidate distances, c >= k.
        ids: (q, c) int64 database rows of the candidates, ascending along each row.
        k: results per row.

    Returns:
        (q, k) float32 distances and (q, k) int64 database rows.
    """
    if k < vals.shape[1]:
        part = np.argpartition(vals, k - 1, axis=1)[:, :k]
        thr = np.take_along_axis(vals, part, axis=1).max(axis=1)
        # argpartition picks an arbitrary subset of the items tied at the k-th value;
        # re-select those rows so the lowest database rows win the tie (ids ascend).
        tied = np.flatnonzero((vals <= thr[:, None]).sum(axis=1) > k)
        if tied.size:
            sub = vals[tied]
            t = thr[tied][:, None]
            below = sub < t
            equal = sub == t
            need = k - below.sum(axis=1)
            take = below | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))
            _, cols = np.nonzero(take)  # row-major: per row, ascending column
            part[tied] = cols.reshape(len(tied), k)
    else:
        part = np.broadcast_to(np.arange(vals.shape[1]), vals.shape)
    pd = np.take_along_axis(vals, part, axis=1)
    pi = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((pi, pd), axis=-1)  # primary: distance, secondary: database row
    return np.take_along_axis(pd, order, axis=1), np.take_along_axis(pi, order, axis=1)


def _topk_rows(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest k per row, ordered by (distance, column index): a stable full sort cut at k.

    A full-row partition costs most of the ranking time, so each row is first cut to
    the candidates under a bound taken from a strided sample of its columns (generous
    enough to hold >= k items almost always); rows where it does not fall back to the full
    row. The bound only prunes, it never changes the result.

    Args:
        dist: (q, N) float32 distances.
        k: 1 <= k <= N.

    Returns:
        (q, k) float32 distances and (q, k) int64 column indices.
    """
    q, n = dist.shape
    all_ids = np.broadcast_to(np.arange(n, dtype=np.int64), (q, n))
    step = n // (_CANDIDATE_SAMPLE * k)
    if step < 2:
        return _select_k(dist, all_ids, k)
    sample = dist[:, ::step]
    s = sample.shape[1]
    expect = k * s / n  # sample items expected under the true k-th distance
    j = min(s - 1, int(1.25 * expect + 4.0 * math.sqrt(expect) + 8))
    bound = np.partition(sample, j, axis=1)[:, j]
    keep = dist <= bound[:, None]
    counts = keep.sum(axis=1)
    out_d = np.empty((q, k), dtype=np.float32)
    out_i = np.empty((q, k), dtype=np.int64)
    short = counts < k
    good = np.flatnonzero(~short)
    if good.size:
        cnt = counts[good]
        rows, cols = np.nonzero(keep[good])
        # Position of each candidate within its row; pads (inf, n) sort after real items.
        pos = np.arange(len(cols)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        cand_d = np.full((len(good), int(cnt.max())), np.inf, dtype=np.float32)
        cand_i = np.full(cand_d.shape, n, dtype=np.int64)
        cand_d[rows, pos] = dist[good[rows], cols]
        cand_i[rows, pos] = cols
        out_d[good], out_i[good] = _select_k(cand_d, cand_i, k)
    if short.any():
        out_d[short], out_i[short] = _select_k(dist[short], all_ids[: int(short.sum())], k)
    return out_d, out_i


def _pq_onehot(db_codes: np.ndarray, num_codewords: int) -> np.ndarray:
    """(N, M) codes -> (N, M*K) float32 one-hot, so a gather-sum over lookup tables is a matmul."""
    n, m = db_codes.shape
    onehot = np.zeros((n, m * num_codewords), dtype=np.float32)
    cols = db_codes.astype(np.int64) + np.arange(m, dtype=np.int64) * num_codewords
    onehot[np.arange(n)[:, None], cols] = 1.0
    return onehot


def pq_lookup_tables(query_f: np.ndarray, codebooks: np.ndarray, distance: str = "sql2") -> np.ndarray:
    """Per-query, per-subspace distances to every codeword.

    Args:
        query_f: (Q, M*d) float query embeddings.
        codebooks: (M, K, d) codewords.
        distance: "sql2" (squared L2 per subspace) or "l2sum" (non-squared L2 per subspace).

    Returns:
        (Q, M, K) float32 table T with T[q, m, k] = ||f_q^m - c_k^m||^2 (or its square root).
    """
    m, k, d = codebooks.shape
    f = np.asarray(query_f, dtype=np.float32).reshape(-1, m, 1, d)
    # Direct differences (not ||f||^2 - 2 f.c + ||c||^2): no cancellation near zero distance.
    diff = f - codebooks.astype(np.float32)[None]
    tables = np.einsum("qmkd,qmkd->qmk", diff, diff)
    if distance == "l2sum":
        np.sqrt(tables, out=tables)
    return tables


def rank_pq(
    query_f: np.ndarray,
    db_codes: np.ndarray,
    codebooks: np.ndarray,
    topk: int,
    distance: str = "sql2",
    chunk: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive asymmetric (ADC) search: raw query embeddings against PQ-coded database items.

    dist(q, n) = sum_m D(f_q^m, c^m_{code[n, m]}) with D the squared L2 ("sql2", what FAISS
    PQ indices serve) or the non-squared L2 ("l2sum", the SSCQ reference distance).

    Args:
        query_f: (Q, M*d) float query embeddings.
        db_codes: (N, M) int codes in [0, K).
        codebooks: (M, K, d) codewords.
        topk: K results per query; capped at N.
        distance: "sql2" or "l2sum".
        chunk: queries per block; memory ~ chunk * N * 4 bytes.

    Returns:
        dist (Q, K') float32 ascending and idx (Q, K') int64 database rows, K' = min(topk, N);
        ties are ordered by database row.
    """
    _check_topk(topk, chunk)
    if distance not in DISTANCES:
        raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")
    codebooks = np.asarray(codebooks, dtype=np.float32)
    if codebooks.ndim != 3:
        raise ValueError(f"codebooks must be (M, K, d), got shape {codebooks.shape}")
    m, k, d = codebooks.shape
    query_f = np.asarray(query_f, dtype=np.float32)
    db_codes = np.asarray(db_codes)
    if query_f.ndim != 2 or query_f.shape[1] != m * d:
        raise ValueError(f"query_f must be (Q, {m * d}) for codebooks {codebooks.shape}, got {query_f.shape}")
    if db_codes.ndim != 2 or db_codes.shape[1] != m or not np.issubdtype(db_codes.dtype, np.integer):
        raise ValueError(f"db_codes must be integer (N, {m}), got {db_codes.dtype} {db_codes.shape}")
    if db_codes.size and (db_codes.min() < 0 or db_codes.max() >= k):
        raise ValueError(f"db_codes must lie in [0, {k}), got [{db_codes.min()}, {db_codes.max()}]")
    if not np.isfinite(query_f).all():
        raise ValueError("query_f contains NaN or Inf")
    n = len(db_codes)
    if n == 0:
        raise ValueError("the database is empty")
    kk = min(int(topk), n)
    onehot_t = _pq_onehot(db_codes, k).T  # (M*K, N)
    out_d = np.empty((len(query_f), kk), dtype=np.float32)
    out_i = np.empty((len(query_f), kk), dtype=np.int64)
    for s in range(0, len(query_f), chunk):
        tables = pq_lookup_tables(query_f[s : s + chunk], codebooks, distance)
        # One-hot matmul = gather-sum of T[q, m, code[n, m]] over m, done by BLAS.
        dist = tables.reshape(len(tables), m * k) @ onehot_t
        out_d[s : s + chunk], out_i[s : s + chunk] = _topk_rows(dist, kk)
    return out_d, out_i


def rank_float(
    query_x: np.ndarray, db_x: np.ndarray, topk: int, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive L2 search between float vectors (raw pixels, unquantised embeddings).

    Args:
        query_x: (Q, D) float queries.
        db_x: (N, D) float database.
        topk: K results per query; capped at N.
        chunk: queries per block; memory ~ chunk * N * 4 bytes.

    Returns:
        dist (Q, K') float32 squared L2 ascending and idx (Q, K') int64, K' = min(topk, N);
        ties are ordered by database row.
    """
    _check_topk(topk, chunk)
    query_x = np.asarray(query_x, dtype=np.float32)
    db_x = np.asarray(db_x, dtype=np.float32)
    if query_x.ndim != 2 or db_x.ndim != 2 or query_x.shape[1] != db_x.shape[1]:
        raise ValueError(f"query_x (Q, D) and db_x (N, D) must share D, got {query_x.shape} and {db_x.shape}")
    if len(db_x) == 0:
        raise ValueError("the database is empty")
    if not (np.isfinite(query_x).all() and np.isfinite(db_x).all()):
        raise ValueError("query_x or db_x contains NaN or Inf")
    # Centering leaves L2 distances unchanged and shrinks the float32 cancellation error of
    # ||q||^2 + ||x||^2 - 2 q.x for data far from the origin (pixels in [0, 255]).
    mean = db_x.mean(axis=0, dtype=np.float64).astype(np.float32)
    db_c = db_x - mean
    db_sq = np.einsum("nd,nd->n", db_c, db_c)
    kk = min(int(topk), len(db_x))
    out_d = np.empty((len(query_x), kk), dtype=np.float32)
    out_i = np.empty((len(query_x), kk), dtype=np.int64)
    for s in range(0, len(query_x), chunk):
        q = query_x[s : s + chunk] - mean
        dist = q @ db_c.T
        dist *= -2.0
        dist += db_sq[None, :]
        dist += np.einsum("qd,qd->q", q, q)[:, None]
        np.maximum(dist, 0.0, out=dist)
        out_d[s : s + chunk], out_i[s : s + chunk] = _topk_rows(dist, kk)
    return out_d, out_i


# --------------------------------------------------------------------------- metrics


def relevant_counts(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """Relevant database items per query (sharing at least one label).

    Args:
        query_labels: (Q, C) bool.
        db_labels: (N, C) bool.

    Returns:
        (Q,) int64 counts.
    """
    c = query_labels.shape[1]
    if c == 0 or len(db_labels) == 0:
        return np.zeros(len(query_labels), dtype=np.int64)
    # Few distinct label sets in practice: compare distinct query sets with distinct
    # database sets weighted by how often each occurs, instead of Q x N.
    uq, q_inv = np.unique(np.packbits(query_labels, axis=1), axis=0, return_inverse=True)
    ud, d_count = np.unique(np.packbits(db_labels, axis=1), axis=0, return_counts=True)
    uq_f = np.unpackbits(uq, axis=1, count=c).astype(np.float32)
    ud_f = np.unpackbits(ud, axis=1, count=c).astype(np.float32)
    counts = np.empty(len(uq), dtype=np.int64)
    for s in range(0, len(uq), _LABEL_CHUNK):
        overlap = (uq_f[s : s + _LABEL_CHUNK] @ ud_f.T) > 0
        counts[s : s + _LABEL_CHUNK] = overlap.astype(np.int64) @ d_count.astype(np.int64)
    return counts[q_inv.reshape(-1)]


def relevance(idx: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Relevance of each retrieved item.

    Args:
        idx: (Q, K) int database rows, as returned by ``rank_pq`` / ``rank_float``.
        query_labels: (Q, C) bool.
        db_labels: (N, C) bool.
        chunk: queries per block.

    Returns:
        (Q, K) bool, True where the retrieved item shares a label with the query.
    """
    q_pack = np.packbits(query_labels, axis=1)  # (Q, ceil(C/8)) uint8
    d_pack = np.packbits(db_labels, axis=1)
    rel = np.empty(idx.shape, dtype=bool)
    for s in range(0, len(idx), chunk):
        gathered = d_pack[idx[s : s + chunk]]  # (q, K, B)
        rel[s : s + chunk] = (gathered & q_pack[s : s + chunk, None, :]).any(axis=-1)
    return rel


def _resolve_ks(ks: Optional[Iterable[int]], k_max: int) -> np.ndarray:
    if ks is None:
        return np.unique(np.array([k for k in (1, 10, 100, k_max) if k <= k_max], dtype=np.int64))
    arr = np.unique(np.asarray(list(ks), dtype=np.int64))
    if arr.size and (arr.min() < 1 or arr.max() > k_max):
        raise ConfigError(f"cut-offs ks must lie in [1, {k_max}] (results per query), got {arr.tolist()}")
    return arr


def pr_cutoffs(k_max: int, points: int = PR_POINTS) -> np.ndarray:
    """Cut-offs of the precision-recall curve: up to ``points`` values evenly spread over [1, k_max]."""
    return np.unique(np.rint(np.linspace(1, k_max, max(int(points), 1))).astype(np.int64))


def retrieval_metrics(
    idx: np.ndarray,
    query_labels: Any,
    db_labels: Any,
    ks: Optional[Sequence[int]] = None,
    pr_points: int = PR_POINTS,
    chunk: int = 512,
) -> dict:
    """mAP@K, precision@k, recall@k and a precision-recall curve of ranked results.

    Args:
        idx: (Q, K) int database rows, best first; K is the mAP cut-off.
        query_labels: (Q, C) bool or anything ``labels_to_matrix`` reads.
        db_labels: (N, C) bool or anything ``labels_to_matrix`` reads.
        ks: cut-offs for precision@k / recall@k, each in [1, K]; None = (1, 10, 100, K)
            where they fit.
        pr_points: cut-offs on the precision-recall curve (evenly spaced over [1, K]).
        chunk: queries per block.

    Returns:
        {"map": float, "topk": K, "num_queries": Q,
         "ks": (k,) int64, "precision@k": (k,) float64, "recall@k": (k,) float64,
         "pr_curve": {"k": (p,) int64, "precision": (p,) float64, "recall": (p,) float64},
         "ap": (Q,) float64 per-query AP@K}.
        Recall is relative to all relevant items in the database; a query with no relevant
        item anywhere has recall 0 (and AP 0) and still counts in every mean.
    """
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (Q, K) with K >= 1, got shape {idx.shape}")
    ql, dl = _label_matrices(query_labels, db_labels)
    if len(ql) != len(idx):
        raise ValueError(f"{len(idx)} ranked queries but {len(ql)} query label rows")
    if idx.size and (idx.min() < 0 or idx.max() >= len(dl)):
        raise ValueError(f"idx must lie in [0, {len(dl)}) (database rows)")
    nq, k_max = idx.shape
    ks_arr = _resolve_ks(ks, k_max)
    pr_k = pr_cutoffs(k_max, pr_points)
    n_rel = relevant_counts(ql, dl)
    ranks = np.arange(1, k_max + 1, dtype=np.float64)
    ap = np.empty(nq, dtype=np.float64)
    hits_ks = np.empty((nq, len(ks_arr)), dtype=np.int64)
    hits_pr = np.empty((nq, len(pr_k)), dtype=np.int64)
    for s in range(0, nq, chunk):
        rel = relevance(idx[s : s + chunk], ql[s : s + chunk], dl, chunk)
        cum = np.cumsum(rel, axis=1, dtype=np.int64)
        r_k = cum[:, -1]
        # sum_r rel_r * P@r, divided by R_K (relevant items in the top K), 0 when R_K = 0.
        ap[s : s + chunk] = np.where(r_k > 0, (rel * (cum / ranks)).sum(axis=1) / np.maximum(r_k, 1), 0.0)
        hits_ks[s : s + chunk] = cum[:, ks_arr - 1]
        hits_pr[s : s + chunk] = cum[:, pr_k - 1]
    denom = np.maximum(n_rel, 1)[:, None]
    return {
        "map": float(ap.mean()) if nq else 0.0,
        "topk": int(k_max),
        "num_queries": int(nq),
        "ks": ks_arr,
        "precision@k": (hits_ks / ks_arr).mean(axis=0),
        "recall@k": (hits_ks / denom).mean(axis=0),
        "pr_curve": {
            "k": pr_k,
            "precision": (hits_pr / pr_k).mean(axis=0),
            "recall": (hits_pr / denom).mean(axis=0),
        },
        "ap": ap,
    }


def flatten_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalar view of a metrics dict for logging: map*, precision@<k>, recall@<k>.

    Arrays other than precision@k / recall@k (the PR curve, per-query AP) are left out.
    """
    out: dict[str, float] = {}
    for key, value in result.items():
        if key.startswith("map") and np.isscalar(value):
            out[prefix + key] = float(value)
    ks = result.get("ks")
    if ks is not None:
        for k, p, r in zip(ks, result["precision@k"], result["recall@k"]):
            out[f"{prefix}precision@{int(k)}"] = float(p)
            out[f"{prefix}recall@{int(k)}"] = float(r)
    return out


# --------------------------------------------------------------------------- end-to-end


def evaluate_pq(
    query_f: np.ndarray,
    query_labels: Any,
    db_codes: np.ndarray,
    db_labels: Any,
    codebooks: np.ndarray,
    topk: int,
    ks: Optional[Sequence[int]] = None,
    chunk: int = 512,
    pr_points: int = PR_POINTS,
) -> dict:
    """SSCQ protocol: raw query embeddings against PQ-coded database, both distances.

    Args:
        query_f: (Q, M*d) float query embeddings.
        query_labels: (Q, C) bool or per-query labels (see ``labels_to_matrix``).
        db_codes: (N, M) int hard codes.
        db_labels: (N, C) bool or per-item labels.
        codebooks: (M, K, d) codewords.
        topk: mAP cut-off K (capped at N).
        ks: precision/recall cut-offs; None = (1, 10, 100, K) where they fit.
        chunk: queries per block.
        pr_points: cut-offs on the precision-recall curve.

    Returns:
        ``retrieval_metrics`` of the squared-L2 ADC ranking (the distance FAISS serves;
        "map" is its mAP) plus "map_sql2", "map_l2sum" and "pr_curve_l2sum".
    """
    ql, dl = _label_matrices(query_labels, db_labels)
    _, idx = rank_pq(query_f, db_codes, codebooks, topk, "sql2", chunk)
    result = retrieval_metrics(idx, ql, dl, ks, pr_points, chunk)
    _, idx_l2 = rank_pq(query_f, db_codes, codebooks, topk, "l2sum", chunk)
    ref = retrieval_metrics(idx_l2, ql, dl, result["ks"], pr_points, chunk)
    result["map_sql2"] = result["map"]
    result["map_l2sum"] = ref["map"]
    result["pr_curve_l2sum"] = ref["pr_curve"]
    return result


def evaluate_float(
    query_x: np.ndarray,
    query_labels: Any,
    db_x: np.ndarray,
    db_labels: Any,
    topk: int,
    ks: Optional[Sequence[int]] = None,
    chunk: int = 512,
    pr_points: int = PR_POINTS,
) -> dict:
    """Exact L2 retrieval between float vectors (raw pixels or unquantised embeddings).

    Args:
        query_x: (Q, D) float; db_x: (N, D) float; labels as in ``evaluate_pq``.

    Returns:
        ``retrieval_metrics`` of the exhaustive L2 ranking.
    """
    ql, dl = _label_matrices(query_labels, db_labels)
    _, idx = rank_float(query_x, db_x, topk, chunk)
    return retrieval_metrics(idx, ql, dl, ks, pr_points, chunk)


def pixel_pq_baseline(
    db_pixels: np.ndarray,
    query_pixels: np.ndarray,
    db_labels: Any,
    query_labels: Any,
    bits: int,
    topk: int,
    seed: int = 0,
    ks: Optional[Sequence[int]] = None,
    pr_points: int = PR_POINTS,
) -> dict:
    """Raw-pixel product-quantization baseline (SPEC section 5).

    A ``faiss.IndexPQ(D, M=bits/4, nbits=4)`` is trained (k-means, seeded) on the database
    pixels, holds the database, and is searched with the query pixels (squared-L2 ADC).
    When D is not divisible by M, both sides are zero-padded up to the next multiple of M;
    zero columns change no distance. Within the top K, results are re-sorted by
    (distance, database row) so ties are ordered deterministically.

    Args:
        db_pixels: (N, D) float32 flattened images; query_pixels: (Q, D) float32.
        db_labels, query_labels: (N, C) / (Q, C) bool or per-item labels.
        bits: code length, a positive multiple of 4 (M = bits / 4 subspaces of 16 codewords).
        topk: mAP cut-off K (capped at N).
        seed: k-means seed.

    Returns:
        ``retrieval_metrics`` of the FAISS ranking plus "bits", "M" and "dim" (padded D).
    """
    import faiss  # heavy import kept local: only this baseline needs it

    if int(bits) < 4 or int(bits) % 4 != 0:
        raise ConfigError(f"bits must be a positive multiple of 4 (4-bit codes), got {bits}")
    _check_topk(topk, 1)
    db = np.asarray(db_pixels, dtype=np.float32)
    qx = np.asarray(query_pixels, dtype=np.float32)
    if db.ndim != 2 or qx.ndim != 2 or db.shape[1] != qx.shape[1]:
        raise ValueError(f"db_pixels (N, D) and query_pixels (Q, D) must share D, got {db.shape} and {qx.shape}")
    ql, dl = _label_matrices(query_labels, db_labels)
    m = int(bits) // 4
    dim = math.ceil(db.shape[1] / m) * m
    if dim != db.shape[1]:
        db = np.pad(db, ((0, 0), (0, dim - db.shape[1])))
        qx = np.pad(qx, ((0, 0), (0, dim - qx.shape[1])))
    db = np.ascontiguousarray(db)
    qx = np.ascontiguousarray(qx)
    index = faiss.IndexPQ(dim, m, 4)
    index.pq.cp.seed = int(seed)
    index.train(db)
    index.add(db)
    kk = min(int(topk), len(db))
    dist, idx = index.search(qx, kk)
    order = np.lexsort((idx, dist), axis=-1)
    idx = np.take_along_axis(idx, order, axis=1)
    result = retrieval_metrics(idx, ql, dl, ks, pr_points)
    result.update({"bits": int(bits), "M": m, "dim": dim})
    return result


def plot_pr_curve(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """Write precision-recall curves (recall on x, precision on y) to a PNG file.

    Args:
        curves: name -> pr_curve dict ({"k", "precision", "recall"}), one line each.
        path: local output path; parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with the Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ax.plot(np.asarray(curve["recall"]), np.asarray(curve["precision"]), marker=".", label=str(name))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
