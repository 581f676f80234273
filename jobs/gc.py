"""Collect an index root's garbage: `python jobs/gc.py --index-root URI`.

The `ray job submit` entry point of `sscq gc` (same flags: `python jobs/gc.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("gc")
