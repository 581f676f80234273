"""Promote a registered model to `champion` only if it beats the current one on the gate set.

`sscq promote --name sscq --candidate N [--min-improvement 0] [--dry-run]`
Exit code: 0 promoted (or would be, with --dry-run), 3 rejected, 2 error (alias untouched),
including another promotion moving `champion` while this one scored (both versions named).
--dry-run scores and reports, and writes nothing anywhere.
"""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="sscq", help="registered model name")
    p.add_argument("--candidate", required=True, help="model version to consider")
    p.add_argument("--min-improvement", type=float, default=0.0, help="mAP margin the candidate must add")
    p.add_argument("--dry-run", action="store_true", help="score and report; write nothing (no run, tag or alias)")


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.console import CONSOLE
    from sscq_dist.promotion import promote

    d = promote(a.name, a.candidate, cfg, a.min_improvement, a.dry_run)
    CONSOLE.line(d.line())
    return d.exit_code
