"""The main job on embedded defaults: `python jobs/demo.py` (what `make demo` runs)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import config_parser, run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.demo import run_demo  # noqa: E402


def main() -> int:
    a = config_parser(__doc__).parse_args()
    run_demo(load_config(a.config, a.overrides))
    return 0


if __name__ == "__main__":
    run_main(main)
