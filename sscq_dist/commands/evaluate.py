"""Evaluate a registered model: `sscq evaluate --model models:/sscq@champion`.

Scores mAP@K (both distances), P@k, R@k and a PR curve on held-out queries against a
database beside the raw-pixel baselines; logs an MLflow evaluation run and tags the version.
"""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models:/sscq@champion", help="model URI (default: %(default)s)")
    p.add_argument("--queries", default=None, help="query shards URI (default: data.queries_uri)")
    p.add_argument("--database", default=None, help="database shards URI (default: data.database_uri or train_uri)")
    p.add_argument("--topk", type=int, default=None, help="mAP cut-off (default: eval.topk)")
    p.add_argument("--no-baselines", action="store_true")


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.console import CONSOLE
    from sscq_dist.evaluate_job import run_evaluation

    out = run_evaluation(a.model, cfg, a.queries, a.database, a.topk, baselines_on=not a.no_baselines)
    CONSOLE.line(out.table)
    CONSOLE.line(f"evaluate: {out.model_uri} mAP@{out.topk} = {out.map:.4f} "
                 f"(report {out.report_path}, PR curve {out.plot_path})")
    return 0
