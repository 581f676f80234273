"""index_metrics.json: how the served index compares with exhaustive ADC over the same codes."""

from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np

from sscq_dist.config import Config
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.formats import METRICS_FILE, version_loc
from sscq_dist.storage import atomic_write_bytes, resolve

KS = (1, 10, 100)


def sample_parts(parts: list, max_rows: int, seed: int = 0) -> list:
    """A seeded uniform sample of parts holding at most max_rows vectors (all of them when they fit)."""
    if sum(p.indexed for p in parts) <= max_rows:
        return list(parts)
    chosen, rows = [], 0
    for i in np.random.default_rng(seed).permutation(len(parts)):
        if rows + parts[i].indexed > max_rows and chosen:
            continue
        chosen.append(parts[i])
        rows += parts[i].indexed
    return chosen


def index_metrics(index_root_uri: str, cfg: Config, model, queries: np.ndarray,
                  cache_dir: Optional[str] = None) -> dict:
    """Recall@1/10/100 and QPS of the served index vs exhaustive IndexPQ over the same codes.

    queries: (Q, D) float32 embeddings of held-out images (never database rows). The
    reference reads back the codes stored in the parts (index_codes), so the comparison
    isolates what the served index structure (fast-scan rounding, IVF probing) loses.
    Above index.metrics_max_rows vectors the driver loads only a uniform random sample of
    parts holding at most that many (the measured loss is a property of the structure, not
    of which parts), so its memory does not grow with the collection.
    """
    from sscq_dist.indexing.formats import open_current
    from sscq_dist.serving.partition import load_partition

    root = resolve(index_root_uri, cfg.storage)
    m = open_current(root)
    out = {"model_version": m.model_version, "snapshot": m.name, "index_type": m.index_type,
           "index_params": m.index_params, "rows": m.total_rows, "parts": len(m.parts),
           "index_bytes": int(m.index_bytes), "num_queries": int(len(queries))}
    out["bytes_per_image"] = out["index_bytes"] / max(1, m.total_rows)
    if len(queries) == 0 or m.total_rows == 0:
        return out
    parts = sample_parts(m.parts, cfg.index.metrics_max_rows, cfg.train.seed)
    part = load_partition(root, m, parts, cache_dir=cache_dir)
    out["measured_rows"], out["measured_parts"] = part.ntotal, len(parts)
    k = min(max(KS), part.ntotal)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    t0 = time.perf_counter()
    served = part.search(q, k)
    out["qps_served"] = len(queries) / max(1e-9, time.perf_counter() - t0)
    all_ids, all_codes = fi.index_codes(part.index)
    codebooks = model.quantizer.codebooks.detach().cpu().float().numpy()
    ref_index = fi.exhaustive_adc(codebooks, all_codes, all_ids)
    t0 = time.perf_counter()
    ref_d, ref_ids = ref_index.search(q, k)
    out["qps_exhaustive_adc"] = len(queries) / max(1e-9, time.perf_counter() - t0)
    served_d = exact_adc(q, served.ids, all_ids, all_codes, codebooks)
    for kk in KS:
        if kk <= k:
            out[f"recall@{kk}"] = tie_aware_recall(served_d[:, :kk], ref_d[:, kk - 1])
            out[f"id_recall@{kk}"] = fi.recall_at(served.ids[:, :kk], ref_ids[:, :kk], kk)
    return out


def exact_adc(queries: np.ndarray, ids: np.ndarray, all_ids: np.ndarray, all_codes: np.ndarray,
              codebooks: np.ndarray) -> np.ndarray:
    """Exact squared-L2 ADC distance (float) of each returned id: (Q, k); inf for -1."""
    m, kk, d = codebooks.shape
    lut = ((queries.reshape(len(queries), m, 1, d) - codebooks[None]) ** 2).sum(-1)  # (Q, M, K)
    order = np.argsort(all_ids)
    pos = np.searchsorted(all_ids[order], np.clip(ids, 0, None))
    rows = order[np.clip(pos, 0, len(order) - 1)]
    codes = all_codes[rows].astype(np.int64)  # (Q, k, M)
    dist = np.take_along_axis(lut[:, None, :, :], codes[..., None], axis=3)[..., 0].sum(-1)
    return np.where(ids >= 0, dist, np.inf)


def tie_aware_recall(served_dist: np.ndarray, kth_ref_dist: np.ndarray, rtol: float = 1e-4) -> float:
    """Share of served top-k results whose exact distance is within the exhaustive k-th distance.

    Many database items share a code (same distance), so which of the tied items an index
    returns is arbitrary; counting by distance, not id, measures what the index loses.
    """
    thr = kth_ref_dist[:, None] * (1 + rtol) + 1e-6
    return float((served_dist <= thr).mean())


def write_index_metrics(index_root_uri: str, cfg: Config, version: str, metrics: dict) -> str:
    """Atomically write <root>/models/<version>/index_metrics.json; returns its URI."""
    loc = version_loc(resolve(index_root_uri, cfg.storage), version).join(METRICS_FILE)
    atomic_write_bytes(loc, json.dumps(metrics, indent=1, default=float).encode())
    return loc.uri
