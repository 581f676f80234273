"""Run the search service locally: `python jobs/serve.py --index-root URI [--model URI] [--port 8000]

The `ray job submit` entry point of `sscq serve` (same flags: `python jobs/serve.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("serve")
