"""Ingest images into sharded Parquet: `sscq ingest --source digits --dest data/digits`.

Each destination prefix gets `part-NNNNN.parquet` shards and, once all are written, the
dataset record `_dataset.json`; until then it is marked `_writing.json`, which training and
reindex refuse.
"""

import argparse

from sscq_dist.config import Config

CONFIG_DEFAULT = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, choices=["digits", "fashion_mnist", "folder", "parquet"])
    p.add_argument("--dest", required=True, help="destination prefix: a local dir or s3://bucket/prefix")
    p.add_argument("--source-path", help="folder of images, Parquet URI, or Fashion-MNIST IDX directory")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--splits", default="train,test", help="splits for digits / fashion_mnist")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what is under --dest (also what a dead ingest left): shards the new "
                        "dataset record does not list are removed")
    p.add_argument("--no-progress", action="store_true")


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.console import CONSOLE
    from sscq_dist.ingest import ingest

    for s in ingest(a.source, a.dest, a.rows_per_shard, a.overwrite, a.source_path,
                    [x for x in a.splits.split(",") if x], cfg.storage, progress=not a.no_progress,
                    data_cfg=cfg.data):
        CONSOLE.line(s.line())
    return 0
