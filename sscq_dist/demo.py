"""The main job on embedded defaults: ingest -> train -> evaluate -> promote -> reindex -> search -> serve.

Everything local (a data folder, a SQLite MLflow store, a local Ray); prints one summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from sscq_dist.config import Config
from sscq_dist.console import CONSOLE


@dataclass
class DemoPaths:
    data: str = "data/digits"
    index_root: str = "index/digits"


def _step(name: str) -> float:
    CONSOLE.stage(name)
    return time.perf_counter()


def _serve_once(index_root: str, cfg: Config, q, in_process_ids: list[int]) -> list[str]:
    """Start the search service (Ray Serve, 2 partitions), send one HTTP query, stop it.
    Returns the summary lines: its answer against the in-process one, and the command that
    keeps a service running."""
    import dataclasses
    import io

    from PIL import Image

    from sscq_dist.serving import service

    _step("7/7 serve (Ray Serve: HTTP ingress + 2 index partitions; one query over HTTP)")
    sv = dataclasses.replace(cfg.serve, partitions=2, partition_cpus=0.5, ingress_cpus=0.5)
    port = _free_port()
    url = service.start(index_root, dataclasses.replace(cfg, serve=sv), port=port)
    try:
        png = io.BytesIO()
        img = q.images[0]  # (C, H, W) uint8: the held-out query, sent as a PNG upload
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(png, format="PNG")
        status, body = service.post_image(url, png.getvalue(), 5)
    finally:
        service.stop()
    if status != 200:
        return [f"  search service         answered HTTP {status}: {body.get('error')}"]
    ids = [hit["id"] for hit in body["results"]]
    same = "the same top-5 as in process" if ids == in_process_ids else f"top-5 ids {ids}"
    return [f"  search service         POST {url}search -> snapshot {body['version']} in {body['took_ms']:.0f} ms: {same}",
            f"  keep a service running  sscq serve --index-root {index_root} --partitions 2 "
            "(then open http://127.0.0.1:8000/)"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(cfg: Config, paths: DemoPaths = DemoPaths()) -> dict:
    from sscq_dist.evaluate_job import run_evaluation
    from sscq_dist.reindex_job import run_reindex
    from sscq_dist.ingest import ingest
    from sscq_dist.promotion import promote
    from sscq_dist.serving.query import QueryService
    from sscq_dist.storage import list_files, resolve
    from sscq_dist.train.driver import init_ray, run_training

    t_all = time.perf_counter()
    _step("1/7 ingest (scikit-learn digits -> sharded Parquet)")
    if list_files(resolve(cfg.data.train_uri, cfg.storage), ".parquet"):
        CONSOLE.line(f"ingest: {cfg.data.train_uri} already present, reusing it")
    else:
        for s in ingest("digits", paths.data, rows_per_shard=500, storage=cfg.storage, progress=False):
            CONSOLE.line(s.line())

    _step(f"2/7 train (Ray Train + DeepSpeed ZeRO {cfg.train.zero_stage}, {cfg.train.num_workers} workers)")
    init_ray(cfg)
    tr = run_training(cfg)
    CONSOLE.line(f"train: registered {tr.model_name} v{tr.version} in {tr.seconds:.0f}s "
                 f"({tr.metrics.get('images_per_s', 0):.0f} img/s last epoch)")

    _step("3/7 evaluate (held-out queries vs the training images, with pixel baselines)")
    ev = run_evaluation(f"models:/{tr.model_name}/{tr.version}", cfg, out_dir=cfg.tracking.output_dir)
    CONSOLE.line(ev.table)

    _step("4/7 promote (gate: beat the current champion)")
    decision = promote(tr.model_name, tr.version, cfg)
    CONSOLE.line(decision.line())

    _step("5/7 reindex (Ray Data actor pool -> FAISS 4-bit fast-scan shards)")
    summary, metrics = run_reindex(cfg.data.train_uri, paths.index_root, f"models:/{tr.model_name}@champion", cfg)
    CONSOLE.line(summary.line())

    _step("6/7 search in process (a held-out query image over all parts)")
    svc = QueryService.open(paths.index_root, cfg, cache_dir=os.path.join(".cache", "index"))
    from sscq_dist.model.encoding import load_images

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
    served = _serve_once(paths.index_root, cfg, q, [int(i) for i in res.ids[0]])
    lines += served
    lines.append(f"  total {time.perf_counter() - t_all:.0f}s; MLflow store: {os.environ.get('MLFLOW_TRACKING_URI') or cfg.tracking.tracking_uri or 'sqlite:///mlruns.db'}")
    lines.append("=" * 72)
    CONSOLE.line("\n".join(lines))
    hits = sum(label_of.get(int(i)) == q.labels[0][0] for i in res.ids[0])
    return {"version": tr.version, "promoted": decision.promote, "map": ev.map, "pixel_pq_map": pixel_pq,
            "rows": summary.total_rows, "top5_same_label": int(hits), "metrics": metrics,
            "seconds": time.perf_counter() - t_all, "query_ids": np.asarray(res.ids[0]).tolist()}
