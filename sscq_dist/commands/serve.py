"""Run the search service: `sscq serve --index-root URI [--model URI] [--port 8000] [--partitions N]`.

Starts (or joins RAY_ADDRESS) Ray and Serve, prints the URL, serves until Ctrl-C, then stops
the service.
"""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True, help="index root URI (local path or s3://)")
    p.add_argument("--model", default=None, help="query encoder model URI (default: the snapshot's own model)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port)")
    p.add_argument("--host", default=None, help="HTTP host (default: serve.host)")
    p.add_argument("--partitions", type=int, default=None, help="partitions (default: serve.partitions)")


def config_overrides(a: argparse.Namespace) -> list[str]:
    return [] if a.partitions is None else [f"serve.partitions={a.partitions}"]


def check_args(a: argparse.Namespace) -> None:
    """URI schemes first: a bad one is refused before any config or cluster work."""
    from sscq_dist.storage import validate_uri

    validate_uri(a.index_root)


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.serving.service import run_until_interrupted

    run_until_interrupted(a.index_root, cfg, model_uri=a.model, host=a.host, port=a.port)
    return 0
