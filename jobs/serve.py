"""Run the search service locally: `python jobs/serve.py --index-root URI [--model URI] [--port 8000]
[--partitions N] [key.sub=value ...]`. Starts (or joins RAY_ADDRESS) Ray and Serve, prints the URL,
serves until Ctrl-C, then stops the service."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.serving.service import run_until_interrupted  # noqa: E402
from sscq_dist.storage import validate_uri  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--index-root", required=True, help="index root URI (local path or s3://)")
    p.add_argument("--model", default=None, help="query encoder model URI (default: the snapshot's own model)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port)")
    p.add_argument("--host", default=None, help="HTTP host (default: serve.host)")
    p.add_argument("--partitions", type=int, default=None, help="partitions (default: serve.partitions)")
    p.add_argument("--config", default="configs/digits.yaml", help="YAML config (storage, tracking, serve)")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    a = p.parse_args()
    validate_uri(a.index_root)
    overrides = list(a.overrides)
    if a.partitions is not None:
        overrides.append(f"serve.partitions={a.partitions}")
    cfg = load_config(a.config, overrides)
    run_until_interrupted(a.index_root, cfg, model_uri=a.model, host=a.host, port=a.port)
    return 0


if __name__ == "__main__":
    run_main(main)
