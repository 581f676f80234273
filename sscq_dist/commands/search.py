"""Query the served index in process: `sscq search --index-root URI --image FILE [-k 10]`."""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True)
    p.add_argument("--image", required=True, action="append", help="query image file (repeatable)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--cache-dir", default=".cache/index", help="local cache of index shards")


def check_args(a: argparse.Namespace) -> None:
    """URI schemes first: a bad one is refused before any config or cluster work."""
    from sscq_dist.storage import validate_uri

    validate_uri(a.index_root)


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.console import CONSOLE
    from sscq_dist.serving.query import QueryService

    svc = QueryService.open(a.index_root, cfg, cache_dir=a.cache_dir)
    CONSOLE.line(f"index {a.index_root}: model version {svc.searcher.version}, {svc.searcher.ntotal} images")
    for path in a.image:
        res = svc.search_file(path, a.k)
        CONSOLE.line(f"query {path}")
        CONSOLE.line(f"{'rank':>4s} {'id':>20s} {'distance':>10s}  uri")
        for r, (i, d, u) in enumerate(zip(res.ids[0], res.distances[0], res.uris[0]), 1):
            CONSOLE.line(f"{r:4d} {int(i):20d} {float(d):10.4f}  {u or ''}")
    return 0
