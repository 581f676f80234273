"""Evaluate a registered model: `python jobs/evaluate.py --model models:/sscq@champion`.

The `ray job submit` entry point of `sscq evaluate` (same flags: `python jobs/evaluate.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("evaluate")
