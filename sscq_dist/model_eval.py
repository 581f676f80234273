"""Evaluate a model on held-out queries against a database, beside the pixel baselines.

Queries keep their raw embedding f, the database is stored as hard codes (asymmetric
distance, SPEC section 5). Returns plain dicts; the jobs print and log them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from sscq_dist import evaluation as ev
from sscq_dist.config import Config
from sscq_dist.model.encoding import EncodedSet, ImageSet, embed_images, codes_from_embeddings, load_images
from sscq_dist.errors import SSCQError


@dataclass
class EvalSets:
    queries: ImageSet
    database: ImageSet


def load_eval_sets(cfg: Config, queries_uri: Optional[str] = None, database_uri: Optional[str] = None) -> EvalSets:
    q = load_images(queries_uri or cfg.data.queries_uri, cfg)
    db = load_images(database_uri or cfg.data.database_uri or cfg.data.train_uri, cfg)
    if len(q.ids) == 0 or len(db.ids) == 0:
        raise SSCQError("evaluation needs at least one decodable query and database image")
    if any(lab is None for lab in q.labels) or any(lab is None for lab in db.labels):
        raise SSCQError("evaluation sets need the 'label' column on every row (queries and database)")
    return EvalSets(q, db)


def encode(model, images: ImageSet, batch_size: int) -> EncodedSet:
    f = embed_images(model, images.images, batch_size)
    cb = model.quantizer.codebooks.detach().cpu().float().numpy()
    return EncodedSet(images.ids, f, codes_from_embeddings(f, cb), images.labels, images.uris, images.dropped)


def evaluate_model(model, sets: EvalSets, topk: int, batch_size: int = 512) -> dict:
    """mAP@topk with both distances, P@k/R@k, PR curve, and the float (unquantised) mAP."""
    q = encode(model, sets.queries, batch_size)
    db = encode(model, sets.database, batch_size)
    cb = model.quantizer.codebooks.detach().cpu().float().numpy()
    ql, dl = ev.labels_to_matrix(q.labels), ev.labels_to_matrix(db.labels)
    ql, dl = _same_classes(ql, dl)
    res = ev.evaluate_pq(q.f, ql, db.codes.astype(np.int64), dl, cb, topk, chunk=batch_size)
    flt = ev.evaluate_float(q.f, ql, db.f, dl, topk, chunk=batch_size)
    res["map_float_embedding"] = flt["map"]
    res["codeword_usage_entropy"] = usage_entropy(db.codes, cb.shape[1])
    return res


def baselines(sets: EvalSets, bits: int, topk: int, batch_size: int = 512) -> dict:
    """Raw-pixel FAISS IndexPQ at the same bits and exact float L2 on pixels."""
    qx = sets.queries.images.reshape(len(sets.queries.ids), -1).astype(np.float32) / 255.0
    dx = sets.database.images.reshape(len(sets.database.ids), -1).astype(np.float32) / 255.0
    ql, dl = _same_classes(ev.labels_to_matrix(sets.queries.labels), ev.labels_to_matrix(sets.database.labels))
    pq_res = ev.pixel_pq_baseline(dx, qx, dl, ql, bits, topk)
    fl_res = ev.evaluate_float(qx, ql, dx, dl, topk, chunk=batch_size)
    return {"pixel_pq": pq_res, "pixel_float": fl_res}


def _same_classes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = max(a.shape[1], b.shape[1])
    pad = lambda m: np.pad(m, ((0, 0), (0, c - m.shape[1]))) if m.shape[1] < c else m  # noqa: E731
    return pad(a), pad(b)


def usage_entropy(codes: np.ndarray, k: int) -> float:
    """Mean over subspaces of the entropy (nats) of hard-code usage."""
    ents = []
    for m in range(codes.shape[1]):
        p = np.bincount(codes[:, m].astype(np.int64), minlength=k) / max(1, len(codes))
        p = p[p > 0]
        ents.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(ents))


def summary_rows(model_res: dict, base: Optional[dict], bits: int, topk: int) -> list[tuple[str, float, float]]:
    """(method, mAP sql2, mAP l2sum) rows for the printed table."""
    rows = [(f"SSCQ {bits}-bit PQ (ADC)", model_res["map_sql2"], model_res["map_l2sum"]),
            ("SSCQ float embedding", model_res["map_float_embedding"], float("nan"))]
    if base:
        rows += [(f"raw-pixel IndexPQ {bits}-bit", base["pixel_pq"]["map"], float("nan")),
                 ("raw-pixel exact float L2", base["pixel_float"]["map"], float("nan"))]
    return rows


def format_table(rows, topk: int) -> str:
    lines = [f"{'method':34s} {'mAP@' + str(topk) + ' sqL2':>14s} {'mAP l2sum':>10s}"]
    for name, a, b in rows:
        lines.append(f"{name:34s} {a:14.4f} {b:10.4f}")
    return "\n".join(lines)


def report_json(model_res: dict, base: Optional[dict]) -> str:
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k != "ap"}
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return o
    return json.dumps({"model": clean(model_res), "baselines": clean(base or {})}, indent=1)


def write_pr_plot(model_res: dict, base: Optional[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    curves = {"SSCQ (sqL2 ADC)": model_res["pr_curve"]}
    if "pr_curve_l2sum" in model_res:
        curves["SSCQ (l2sum)"] = model_res["pr_curve_l2sum"]
    if base:
        curves["raw-pixel IndexPQ"] = base["pixel_pq"]["pr_curve"]
        curves["raw-pixel float L2"] = base["pixel_float"]["pr_curve"]
    ev.plot_pr_curve(curves, path)
    return path
