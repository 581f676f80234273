"""Ingest images into sharded Parquet: `python jobs/ingest.py --source digits --dest data/digits`.

Each destination prefix gets `part-NNNNN.parquet` shards and, once all are written, the
dataset record `_dataset.json`; until then it is marked `_writing.json`, which training and
reindex refuse.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.ingest import ingest  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", required=True, choices=["digits", "fashion_mnist", "folder", "parquet"])
    p.add_argument("--dest", required=True, help="destination prefix: a local dir or s3://bucket/prefix")
    p.add_argument("--source-path", help="folder of images, Parquet URI, or Fashion-MNIST IDX directory")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--splits", default="train,test", help="splits for digits / fashion_mnist")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what is under --dest (also what a dead ingest left): shards the new "
                        "dataset record does not list are removed")
    p.add_argument("--config", default=None, help="config file (storage section: endpoint, retries)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    cfg = load_config(a.config)
    for s in ingest(a.source, a.dest, a.rows_per_shard, a.overwrite, a.source_path,
                    [x for x in a.splits.split(",") if x], cfg.storage, progress=not a.no_progress):
        print(s.line())
    return 0


if __name__ == "__main__":
    run_main(main)
