"""Query the served index: `python jobs/search.py --index-root URI --image FILE [-k 10]`."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.query import QueryService  # noqa: E402
from sscq_dist.storage import validate_uri  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--index-root", required=True)
    p.add_argument("--image", required=True, action="append", help="query image file (repeatable)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--config", default="configs/digits.yaml", help="storage / tracking settings")
    p.add_argument("--cache-dir", default=".cache/index", help="local cache of index shards")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    validate_uri(a.index_root)
    cfg = load_config(a.config, a.overrides)
    svc = QueryService.open(a.index_root, cfg, cache_dir=a.cache_dir)
    print(f"index {a.index_root}: model version {svc.searcher.version}, {svc.searcher.ntotal} images")
    for path in a.image:
        res = svc.search_file(path, a.k)
        print(f"query {path}")
        print(f"{'rank':>4s} {'id':>20s} {'distance':>10s}  uri")
        for r, (i, d, u) in enumerate(zip(res.ids[0], res.distances[0], res.uris[0]), 1):
            print(f"{r:4d} {int(i):20d} {float(d):10.4f}  {u or ''}")
    return 0


if __name__ == "__main__":
    run_main(main)
