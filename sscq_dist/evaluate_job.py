"""The evaluation job: score a registered model, log an MLflow evaluation run, tag the version."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from sscq_dist.config import Config
from sscq_dist.evaluation import flatten_metrics
from sscq_dist.model_eval import (baselines, evaluate_model, format_table, load_eval_sets, report_json,
                                  summary_rows, write_pr_plot)
from sscq_dist.registry import load_model
from sscq_dist.tracking import metric_key

EVAL_EXPERIMENT = "sscq-evaluation"


@dataclass
class EvaluationOutput:
    model_uri: str
    version: Optional[str]
    topk: int
    map: float
    result: dict
    baselines: Optional[dict]
    table: str
    report_path: str
    plot_path: str


def run_evaluation(model_uri: str, cfg: Config, queries: Optional[str] = None, database: Optional[str] = None,
                   topk: Optional[int] = None, baselines_on: bool = True, out_dir: str = "outputs",
                   log_mlflow: bool = True) -> EvaluationOutput:
    import mlflow
    from mlflow.tracking import MlflowClient

    from sscq_dist.tracking import configure, ensure_experiment

    topk = topk or cfg.eval.topk
    loaded = load_model(model_uri, cfg.tracking)
    data = dataclasses.replace(cfg.data, image_size=loaded.cfg.data.image_size, channels=loaded.cfg.data.channels)
    sets = load_eval_sets(dataclasses.replace(cfg, data=data), queries, database)
    res = evaluate_model(loaded.model, sets, topk, cfg.eval.batch_size)
    base = baselines(sets, loaded.cfg.model.bits, topk, cfg.eval.batch_size) if baselines_on else None
    tag = f"{loaded.name or 'model'}-v{loaded.version or 'local'}"
    os.makedirs(out_dir, exist_ok=True)
    report_path = os.path.abspath(os.path.join(out_dir, f"eval-{tag}.json"))
    with open(report_path, "w") as f:
        f.write(report_json(res, base))
    plot_path = write_pr_plot(res, base, os.path.abspath(os.path.join(out_dir, f"pr-{tag}.png")))
    table = format_table(summary_rows(res, base, loaded.cfg.model.bits, topk), topk)
    if log_mlflow:
        uri = configure(cfg.tracking)
        exp = ensure_experiment(EVAL_EXPERIMENT, uri)
        metrics = {metric_key(f"sscq/{k}"): v for k, v in flatten_metrics(res).items()}
        metrics["sscq/map_l2sum"] = float(res["map_l2sum"])
        metrics["sscq/map_float_embedding"] = float(res["map_float_embedding"])
        if base:
            metrics.update({metric_key(f"pixel_pq/{k}"): v for k, v in flatten_metrics(base["pixel_pq"]).items()})
            metrics.update({metric_key(f"pixel_float/{k}"): v for k, v in flatten_metrics(base["pixel_float"]).items()})
        with mlflow.start_run(experiment_id=exp, run_name=f"evaluate-{tag}") as run:
            mlflow.log_params({"model_uri": loaded.uri, "queries": queries or cfg.data.queries_uri,
                               "database": database or cfg.data.database_uri or cfg.data.train_uri, "topk": topk,
                               "num_queries": len(sets.queries.ids), "num_database": len(sets.database.ids)})
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(report_path)
            mlflow.log_artifact(plot_path)
            mlflow.set_tags({"model_name": loaded.name or "", "model_version": loaded.version or ""})
            run_id = run.info.run_id
        if loaded.name and loaded.version:
            client = MlflowClient()
            client.set_model_version_tag(loaded.name, loaded.version, f"eval.map_at_{topk}", f"{res['map_sql2']:.6f}")
            client.set_model_version_tag(loaded.name, loaded.version, "eval.run_id", run_id)
    return EvaluationOutput(loaded.uri, loaded.version, topk, float(res["map_sql2"]), res, base, table,
                            report_path, plot_path)
