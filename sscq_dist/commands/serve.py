"""Run the search service: `sscq serve --index-root URI [--model URI] [--port 8000] [--partitions N]
[--host H] [--token-file F] [--insecure-no-auth]`.

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
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token clients must send (default: env SSCQ_SERVE_TOKEN)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve a non-loopback host without a token (anyone who reaches the port can search)")


def config_overrides(a: argparse.Namespace) -> list[str]:
    out = [] if a.partitions is None else [f"serve.partitions={a.partitions}"]
    if a.token_file:
        out.append(f"serve.token_file={a.token_file}")
    if a.insecure_no_auth:
        out.append("serve.insecure_no_auth=true")
    return out


def check_args(a: argparse.Namespace) -> None:
    """URI schemes first: a bad one is refused before any config or cluster work."""
    from sscq_dist.storage import validate_uri

    validate_uri(a.index_root)


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.serving.service import run_until_interrupted

    run_until_interrupted(a.index_root, cfg, model_uri=a.model, host=a.host, port=a.port)
    return 0
