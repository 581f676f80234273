"""index_metrics.json: how the served index compares with exhaustive ADC over the same codes."""

from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np

from sscq_dist.config import Config
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.manifest import version_loc
from sscq_dist.storage import atomic_write_bytes, resolve

KS = (1, 10, 100)


def index_metrics(index_root_uri: str, cfg: Config, model, queries: np.ndarray,
                  cache_dir: Optional[str] = None) -> dict:
    """Recall@1/10/100 and QPS of the served index vs exhaustive IndexPQ over the same codes.

    queries: (Q, D) float32 embeddings of held-out images (never database rows). The
    reference reads back the codes stored in every shard (index_codes), so the comparison
    isolates what the served index structure (fast-scan rounding, IVF probing) loses.
    """
    from sscq_dist.search import Searcher

    searcher = Searcher.open(index_root_uri, cfg.storage, cache_dir=cache_dir)
    m = searcher.manifest
    out = {"model_version": m.model_version, "index_type": m.index_type, "index_params": m.index_params,
           "rows": m.total_rows, "shards": len(m.index_shards),
           "index_bytes": int(sum(x.bytes for x in m.index_shards)),
           "idmap_bytes": int(sum(x.idmap_bytes for x in m.index_shards)),
           "num_queries": int(len(queries))}
    out["bytes_per_image"] = out["index_bytes"] / max(1, m.total_rows)
    if len(queries) == 0 or m.total_rows == 0:
        return out
    k = min(max(KS), m.total_rows)
    t0 = time.perf_counter()
    served = searcher.search(queries, k)
    out["qps_served"] = len(queries) / max(1e-9, time.perf_counter() - t0)
    if m.total_rows > cfg.index.metrics_max_rows:
        out["reference"] = f"skipped: {m.total_rows} rows > index.metrics_max_rows"
        return out
    ids_all, codes_all = [], []
    for shard in searcher.shards:
        ids, codes = fi.index_codes(shard)
        ids_all.append(ids)
        codes_all.append(codes)
    codebooks = model.quantizer.codebooks.detach().cpu().float().numpy()
    ref_index = fi.exhaustive_adc(codebooks, np.concatenate(codes_all), np.concatenate(ids_all))
    t0 = time.perf_counter()
    _, ref_ids = ref_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    out["qps_exhaustive_adc"] = len(queries) / max(1e-9, time.perf_counter() - t0)
    for kk in KS:
        if kk <= k:
            out[f"recall@{kk}"] = fi.recall_at(served.ids[:, :kk], ref_ids[:, :kk], kk)
    return out


def write_index_metrics(index_root_uri: str, cfg: Config, version: str, metrics: dict) -> str:
    """Atomically write <root>/models/<version>/index_metrics.json; returns its URI."""
    loc = version_loc(resolve(index_root_uri, cfg.storage), version).join("index_metrics.json")
    atomic_write_bytes(loc, json.dumps(metrics, indent=1, default=float).encode())
    return loc.uri
