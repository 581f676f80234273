"""Promote a registered model to `champion` only if it beats the current one on the gate set.

`python jobs/promote.py --name sscq --candidate N [--min-improvement 0] [--dry-run]`
Exit code: 0 promoted (or would be, with --dry-run), 3 rejected, 2 error (alias untouched),
including another promotion moving `champion` while this one scored (both versions named).
--dry-run scores and reports, and writes nothing anywhere.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.promotion import promote  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="sscq", help="registered model name")
    p.add_argument("--candidate", required=True, help="model version to consider")
    p.add_argument("--config", default="configs/digits.yaml", help="gives the gate set (data.queries_uri, eval.gate_topk)")
    p.add_argument("--min-improvement", type=float, default=0.0, help="mAP margin the candidate must add")
    p.add_argument("--dry-run", action="store_true", help="score and report; write nothing (no run, tag or alias)")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    d = promote(a.name, a.candidate, cfg, a.min_improvement, a.dry_run)
    print(d.line())
    return d.exit_code


if __name__ == "__main__":
    run_main(main)
