"""Query expansion and database-side augmentation over a trained model's codes (issue 25).

Reads a model that benchmarks/quality_fashion_mnist.py trained and registered (its --out
directory), encodes the split's queries and database with the model and its codebooks, and
scores mAP@topk by the served protocol (database = hard codes, queries = raw f, squared-L2
ADC) for:

- plain: the served search as it is today;
- aqe k a: alpha-weighted average query expansion. The top-k database items of a first ADC
  search, decoded from their codes (the codewords the FAISS index already holds), are added
  to the query with weights max(cos, 0)^a; the sum is rescaled to the query's norm and
  searched again. Serving-time only: the index is unchanged.
- dba k a: database-side augmentation. Every database item's f is expanded the same way by
  its top-k database neighbours (an ADC search of the item against the codes) and re-encoded
  with the same codebooks. Index-time only: codes change, codebooks and queries do not.
- dba+aqe: both.

Choose k and a on --split val; report on --split test once with the chosen values:

    python benchmarks/rerank_study.py --run-dir outputs/bench-quality-val-... --split val
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402  (puts the repository on sys.path)

from sscq_dist import evaluation as ev  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a quality_fashion_mnist.py --out directory")
    p.add_argument("--key", default="sscq/32", help="the results.json entry whose model is read")
    p.add_argument("--source", choices=bs.SOURCES, default="fashion_mnist")
    p.add_argument("--split", choices=("val", "test"), required=True)
    p.add_argument("--val-queries", type=int, default=5000)
    p.add_argument("--db-limit", type=int, default=0, help="as the run's quality_fashion_mnist.py --db-limit")
    p.add_argument("--query-limit", type=int, default=0, help="as its --query-limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="shards (default data/<source>)")
    p.add_argument("--topk", type=int, default=None, help="mAP cut-off (default: the config's eval.topk)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--modes", nargs="+", choices=("aqe", "dba", "dba+aqe"), default=["aqe", "dba", "dba+aqe"])
    p.add_argument("--tta", action="store_true",
                   help="embed every image and its mirror image and average the two (queries and database)")
    p.add_argument("--config", default=None, help="default: configs/<source>.yaml")
    p.add_argument("--out", default=None, help="results JSON (default <run-dir>/rerank_<split>.json)")
    a = p.parse_args(argv)
    a.config = a.config or bs.default_config(a.source)
    a.data_dir = a.data_dir or os.path.join(bs.REPO, "data", a.source)
    a.out = a.out or os.path.join(a.run_dir, f"rerank_{a.split}.json")
    return a


def decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """(N, M) codes -> (N, M*d) codeword concatenations (what the PQ index reconstructs)."""
    m = codebooks.shape[0]
    return codebooks[np.arange(m)[None, :], codes.astype(np.int64)].reshape(len(codes), -1)


def expand(x: np.ndarray, idx: np.ndarray, recon: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """x + sum of its first k results' decoded vectors, weighted max(cos, 0)^alpha, at x's norm."""
    nb = recon[idx[:, :k]]  # (Q, k, D)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = np.einsum("qd,qkd->qk", xn, nb) / np.maximum(np.linalg.norm(nb, axis=2), 1e-12)
    w = np.maximum(cos, 0.0) ** alpha
    y = x + np.einsum("qk,qkd->qd", w, nb)
    return (y * (np.linalg.norm(x, axis=1, keepdims=True)
                 / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12))).astype(np.float32)


def flip_averaged(model, f: np.ndarray, images_u8: np.ndarray, normalized: bool) -> np.ndarray:
    """(f(x) + f(mirror x)) / 2, back at f's norm (sqrt(M)) when the model normalises f."""
    from sscq_dist.model.encoding import embed_images

    g = (f + embed_images(model, np.ascontiguousarray(images_u8[..., ::-1]), 512)) / 2
    if normalized:
        g *= np.linalg.norm(f, axis=1, keepdims=True) / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return g.astype(np.float32)


def neighbours_without_self(f: np.ndarray, codes: np.ndarray, cb: np.ndarray, k: int) -> np.ndarray:
    """Each database item's first k hits among the other items (an ADC search of its own f)."""
    idx = ev.rank_pq(f, codes, cb, k + 1, "sql2")[1]
    # The item itself is usually among its k+1 hits, not always first (items sharing its code
    # tie with it): move it to the end (stable), where the cut drops it.
    order = np.argsort(idx == np.arange(len(idx))[:, None], axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)[:, :k]


def mean_ap(qf, codes, cb, ql, dl, topk) -> float:
    _, idx = ev.rank_pq(qf, codes, cb, topk, "sql2")
    return ev.retrieval_metrics(idx, ql, dl)["map"]


def main(argv=None) -> int:
    from sscq_dist.config import load_config
    from sscq_dist.model.encoding import codes_from_embeddings
    from sscq_dist.model_eval import _same_classes, encode, load_eval_sets
    from sscq_dist.registry import load_model

    a = parse_args(argv)
    t0 = time.perf_counter()
    db_uri, q_uri = bs.prepare_split(a.source, a.split, a.data_dir, a.val_queries, a.db_limit, a.query_limit,
                                     a.seed)
    stored = json.load(open(os.path.join(a.run_dir, "results.json")))["results"][a.key]
    method, bits = a.key.split("/")
    tracking = f"sqlite:///{os.path.abspath(os.path.join(a.run_dir, 'mlflow.db'))}"
    cfg = load_config(a.config, [f"model.bits={bits}", f"tracking.tracking_uri={tracking}"])
    a.topk = a.topk or cfg.eval.topk
    loaded = load_model(f"models:/bench-{method}-{bits}b/{stored['model_version']}", cfg.tracking)
    sets = load_eval_sets(cfg, q_uri, db_uri)
    q, db = encode(loaded.model, sets.queries, 512), encode(loaded.model, sets.database, 512)
    cb = loaded.model.quantizer.codebooks.detach().cpu().float().numpy()
    if a.tta:
        for enc, imgs in ((q, sets.queries.images), (db, sets.database.images)):
            enc.f = flip_averaged(loaded.model, enc.f, imgs, cfg.model.normalize_embedding)
            enc.codes = codes_from_embeddings(enc.f, cb)
    ql, dl = _same_classes(ev.labels_to_matrix(q.labels), ev.labels_to_matrix(db.labels))
    codes, recon = db.codes.astype(np.int64), decode(db.codes, cb)
    print(f"{len(q.ids)} queries / {len(db.ids)} database, {bits} bits; encoded in {time.perf_counter() - t0:.0f} s",
          flush=True)
    k_max = max(a.ks)
    rows = [{"mode": "plain", "k": 0, "alpha": None, "map": mean_ap(q.f, codes, cb, ql, dl, a.topk)}]
    print(f"plain: {rows[0]['map']:.4f} (stored {stored.get('map_sql2')})", flush=True)
    _, q_idx = ev.rank_pq(q.f, codes, cb, k_max, "sql2")
    db_idx = neighbours_without_self(db.f, codes, cb, k_max) if {"dba", "dba+aqe"} & set(a.modes) else None
    for k, alpha in itertools.product(a.ks, a.alphas):
        if "aqe" in a.modes:
            qe = expand(q.f, q_idx, recon, k, alpha)
            rows.append({"mode": "aqe", "k": k, "alpha": alpha, "map": mean_ap(qe, codes, cb, ql, dl, a.topk)})
        if "dba" in a.modes or "dba+aqe" in a.modes:
            dba_codes = codes_from_embeddings(expand(db.f, db_idx, recon, k, alpha), cb).astype(np.int64)
            if "dba" in a.modes:
                rows.append({"mode": "dba", "k": k, "alpha": alpha, "map": mean_ap(q.f, dba_codes, cb, ql, dl, a.topk)})
            if "dba+aqe" in a.modes:
                # Query expansion over the augmented index: first search and decoding both on its codes.
                _, qi = ev.rank_pq(q.f, dba_codes, cb, k, "sql2")
                qe = expand(q.f, qi, decode(dba_codes, cb), k, alpha)
                rows.append({"mode": "dba+aqe", "k": k, "alpha": alpha,
                             "map": mean_ap(qe, dba_codes, cb, ql, dl, a.topk)})
        print("  ".join(f"{r['mode']} k={r['k']} a={r['alpha']:g}: {r['map']:.4f}"
                        for r in rows if r["k"] == k and r["alpha"] == alpha), flush=True)
    best = max(rows, key=lambda r: r["map"])
    out = {"run_dir": a.run_dir, "key": a.key, "split": a.split, "tta": a.tta, "topk": a.topk, "rows": rows, "best": best,
           "seconds": time.perf_counter() - t0,
           "command": "python benchmarks/rerank_study.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    bs.write_json(a.out, out)
    print(f"best: {best['mode']} k={best['k']} a={best['alpha']}: {best['map']:.4f}; results {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    from sscq_dist.cli import run_main

    run_main(lambda: main())
