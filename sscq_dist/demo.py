"""The main job on embedded defaults: ingest -> train -> evaluate -> promote -> reindex -> search.

Everything local (a data folder, a SQLite MLflow store, a local Ray); prints one summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from sscq_dist.config import Config


@dataclass
class DemoPaths:
    data: str = "data/digits"
    index_root: str = "index/digits"


def _step(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def run_demo(cfg: Config, paths: DemoPaths = DemoPaths()) -> dict:
    from sscq_dist.evaluate_job import run_evaluation
    from sscq_dist.indexing.job import run_reindex
    from sscq_dist.ingest import ingest
    from sscq_dist.promotion import promote
    from sscq_dist.query import QueryService
    from sscq_dist.storage import list_files, resolve
    from sscq_dist.train.driver import init_ray, run_training

    t_all = time.perf_counter()
    _step("1/6 ingest (scikit-learn digits -> sharded Parquet)")
    if list_files(resolve(cfg.data.train_uri, cfg.storage), ".parquet"):
        print(f"ingest: {cfg.data.train_uri} already present, reusing it")
    else:
        for s in ingest("digits", paths.data, rows_per_shard=500, storage=cfg.storage, progress=False):
            print(s.line())

    _step(f"2/6 train (Ray Train + DeepSpeed ZeRO {cfg.train.zero_stage}, {cfg.train.num_workers} workers)")
    init_ray(cfg)
    tr = run_training(cfg)
    print(f"train: registered {tr.model_name} v{tr.version} in {tr.seconds:.0f}s "
          f"({tr.metrics.get('images_per_s', 0):.0f} img/s last epoch)")

    _step("3/6 evaluate (held-out queries vs the training images, with pixel baselines)")
    ev = run_evaluation(f"models:/{tr.model_name}/{tr.version}", cfg, out_dir=cfg.tracking.output_dir)
    print(ev.table)

    _step("4/6 promote (gate: beat the current champion)")
    decision = promote(tr.model_name, tr.version, cfg)
    print(decision.line())

    _step("5/6 reindex (Ray Data actor pool -> FAISS 4-bit fast-scan shards)")
    summary, metrics = run_reindex(cfg.data.train_uri, paths.index_root, f"models:/{tr.model_name}@champion", cfg)
    print(summary.line())

    _step("6/6 search (a held-out query image over all shards)")
    svc = QueryService.open(paths.index_root, cfg, cache_dir=os.path.join(".cache", "index"))
    from sscq_dist.encoding import load_images

    q = load_images(cfg.data.queries_uri, cfg, limit=1)
    res = svc.searcher.search(svc.embed(q.images), 5)
    db = load_images(cfg.data.train_uri, cfg)
    label_of = dict(zip(db.ids.tolist(), [lab[0] if lab else None for lab in db.labels]))

    pixel_pq = ev.baselines["pixel_pq"]["map"] if ev.baselines else float("nan")
    lines = [
        "",
        "=" * 72,
        "sscq-dist demo summary",
        f"  mAP@{ev.topk} (32-bit PQ, ADC)   SSCQ {ev.map:.4f}   vs raw-pixel IndexPQ {pixel_pq:.4f}",
        f"  model version          v{tr.version} -> {'champion' if decision.promote else 'not promoted'} ({decision.reason})",
        f"  index                  version {summary.model_version}: {summary.total_rows} rows, "
        f"{summary.total_shards} shards, {summary.index_bytes} bytes "
        f"({summary.index_bytes / max(1, summary.total_rows):.1f} bytes/image)",
        f"  served recall@10       {metrics.get('recall@10', float('nan')) if metrics else float('nan'):.4f} "
        "vs exhaustive ADC",
        f"  query id {int(q.ids[0])} (label {q.labels[0][0]}): top-5",
    ]
    for r, (i, d, u) in enumerate(zip(res.ids[0], res.distances[0], res.uris[0]), 1):
        lines.append(f"    {r}. id {int(i):5d}  label {label_of.get(int(i))}  dist {float(d):.3f}  {u}")
    lines.append(f"  total {time.perf_counter() - t_all:.0f}s; MLflow store: {os.environ.get('MLFLOW_TRACKING_URI') or cfg.tracking.tracking_uri or 'sqlite:///mlruns.db'}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
    hits = sum(label_of.get(int(i)) == q.labels[0][0] for i in res.ids[0])
    return {"version": tr.version, "promoted": decision.promote, "map": ev.map, "pixel_pq_map": pixel_pq,
            "rows": summary.total_rows, "top5_same_label": int(hits), "metrics": metrics,
            "seconds": time.perf_counter() - t_all, "query_ids": np.asarray(res.ids[0]).tolist()}
