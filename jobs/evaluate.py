"""Evaluate a registered model: `python jobs/evaluate.py --model models:/sscq@champion`.

Scores mAP@K (both distances), P@k, R@k and a PR curve on held-out queries against a
database beside the raw-pixel baselines; logs an MLflow evaluation run and tags the version.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.evaluate_job import run_evaluation  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="models:/sscq@champion")
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--queries", default=None, help="query shards URI (default: data.queries_uri)")
    p.add_argument("--database", default=None, help="database shards URI (default: data.database_uri or train_uri)")
    p.add_argument("--topk", type=int, default=None, help="mAP cut-off (default: eval.topk)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    out = run_evaluation(a.model, cfg, a.queries, a.database, a.topk, baselines_on=not a.no_baselines)
    print(out.table)
    print(f"evaluate: {out.model_uri} mAP@{out.topk} = {out.map:.4f} (report {out.report_path}, PR curve {out.plot_path})")
    return 0


if __name__ == "__main__":
    run_main(main)
