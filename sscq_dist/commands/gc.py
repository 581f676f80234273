"""Collect an index root's garbage: `sscq gc --index-root URI`.

Iceberg's expire_snapshots for the index: keeps the newest `index.gc_keep_generations` of the
CURRENT chain, older generations retired less than `index.gc_grace_s` ago, and every
generation a serving replica holds a reader lease on (`<root>/leases/`); deletes the other
manifest lists, manifests and part files older than the grace period, in batched requests
(S3 DeleteObjects, up to `index.gc_delete_batch` keys each). Runs under the root's writer
lock, so it never overlaps a reindex. A reindex runs it after its publish unless `--no-gc`.
"""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True, help="index root (local dir or s3://)")


def check_args(a: argparse.Namespace) -> None:
    from sscq_dist.storage import validate_uri

    validate_uri(a.index_root)


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.console import CONSOLE
    from sscq_dist.indexing.publish import run_gc
    from sscq_dist.indexing.reindex import default_owner, gc_policy
    from sscq_dist.storage import resolve

    summary = run_gc(resolve(a.index_root, cfg.storage), gc_policy(cfg), default_owner() + ":gc", cfg.index.lock_ttl_s)
    CONSOLE.line(summary.line())
    return 0
