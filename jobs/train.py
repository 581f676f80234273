"""Train SSCQ: `python jobs/train.py --config configs/digits.yaml [key.sub=value ...]`.

The `ray job submit` entry point of `sscq train` (same flags: `python jobs/train.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("train")
