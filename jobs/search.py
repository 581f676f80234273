"""Query the served index: `python jobs/search.py --index-root URI --image FILE [-k 10]`.

The `ray job submit` entry point of `sscq search` (same flags: `python jobs/search.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("search")
