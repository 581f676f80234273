"""Ingest images into sharded Parquet: `python jobs/ingest.py --source digits --dest data/digits`.

The `ray job submit` entry point of `sscq ingest` (same flags: `python jobs/ingest.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("ingest")
