"""The main job on embedded defaults: `python jobs/demo.py` (what `make demo` runs).

The `ray job submit` entry point of `sscq demo` (same flags: `python jobs/demo.py --help`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("demo")
