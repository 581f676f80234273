"""Re-index images with the champion: `python jobs/reindex.py --images URI --index-root URI`.

The `ray job submit` entry point of `sscq reindex` (same flags: `python jobs/reindex.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("reindex")
