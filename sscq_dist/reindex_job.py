"""The scheduled re-index job: reindex, measure the served index, log an MLflow run."""

from __future__ import annotations

import logging
import os
from typing import Optional

from sscq_dist.config import Config
from sscq_dist.serving.index_quality import index_metrics, write_index_metrics
from sscq_dist.indexing.reindex import ReindexSummary, reindex
from sscq_dist.storage import redact_uri

log = logging.getLogger(__name__)

REINDEX_EXPERIMENT = "sscq-reindex"


def held_out_queries(cfg: Config, model) -> "object":
    """Embeddings of up to index.metrics_queries held-out images (data.queries_uri), or None."""
    import numpy as np

    from sscq_dist.model.encoding import embed_images, load_images
    from sscq_dist.errors import SSCQError

    try:
        imgs = load_images(cfg.data.queries_uri, cfg, limit=cfg.index.metrics_queries)
    except SSCQError as exc:
        log.warning("no held-out queries for index metrics (%s)", exc)
        return np.zeros((0, model.cfg.embedding_dim), np.float32)
    return embed_images(model, imgs.images)


def run_reindex(images_uri: str, index_root_uri: str, model_uri: str, cfg: Config,
                log_mlflow: bool = True) -> tuple[ReindexSummary, Optional[dict]]:
    import dataclasses

    from sscq_dist.registry import load_model

    # Resolve an alias once, so the version indexed is the version measured and logged.
    loaded = load_model(model_uri, cfg.tracking)
    summary = reindex(images_uri, index_root_uri, model_uri, cfg, loaded=loaded)
    if summary.nothing_to_do:
        return summary, None
    data = dataclasses.replace(cfg.data, image_size=loaded.cfg.data.image_size, channels=loaded.cfg.data.channels)
    queries = held_out_queries(dataclasses.replace(cfg, data=data), loaded.model)
    metrics = index_metrics(index_root_uri, cfg, loaded.model, queries)
    metrics_uri = write_index_metrics(index_root_uri, cfg, summary.model_version, metrics)
    summary.metrics = metrics
    local = os.path.join(os.path.abspath(cfg.tracking.output_dir), "index_metrics.json")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    import json

    with open(local, "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    if log_mlflow:
        import mlflow

        from sscq_dist.tracking import configure, ensure_experiment, metric_key

        uri = configure(cfg.tracking)
        exp = ensure_experiment(REINDEX_EXPERIMENT, uri)
        with mlflow.start_run(experiment_id=exp, run_name=f"reindex-v{summary.model_version}"):
            mlflow.set_tags({"model_version": summary.model_version, "model_uri": loaded.uri,
                             "index_root": redact_uri(index_root_uri), "images_uri": redact_uri(images_uri),
                             "snapshot": summary.snapshot, "index_metrics_uri": metrics_uri})
            if summary.skipped:  # named, so an operator sees which shards did not serve and why
                mlflow.set_tag("skipped_shards", "\n".join(f"{redact_uri(s.source.uri)}: {s.reason[:300]}"
                                                           for s in summary.skipped)[:4900])
            nums = {"rows": summary.total_rows, "parts": summary.total_shards,
                    "encoded_rows": summary.encoded_rows, "encoded_shards": summary.encoded_shards,
                    "resumed_shards": summary.resumed_shards, "removed_shards": summary.removed_shards,
                    "skipped_shards": len(summary.skipped),
                    "dropped_images": summary.dropped_rows, "build_seconds": summary.seconds,
                    "images_per_s": summary.encoded_rows / max(1e-9, summary.seconds),
                    "bytes_per_image": metrics["bytes_per_image"]}
            nums.update({metric_key(k): float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in nums})
            mlflow.log_metrics(nums)
            mlflow.log_artifact(local)
    return summary, metrics
