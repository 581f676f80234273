"""Promote a registered model to `champion` only if it beats the current one on the gate set.

The `ray job submit` entry point of `sscq promote` (same flags: `python jobs/promote.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("promote")
