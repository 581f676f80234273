"""Re-index images with the champion: `sscq reindex --images URI --index-root URI`.

Incremental and exactly-once: only source shards missing from (or changed since) the
version's latest snapshot are built, as parts on Ray Data workers; the run publishes one new
snapshot generation and flips CURRENT to it, then collects garbage (`--no-gc`: leave that to
`sscq gc`; a GC failure after the publish is a warning). A source shard whose build fails is
skipped, named in the summary and retried by the next run. A new champion is built beside
the serving version. Exits 0 with "nothing to do" when everything is up to date, 2 with one `error:` line
otherwise. Schedule it with cron or the Kubernetes CronJob in infra/ (see README).
"""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="image shards prefix (local dir or s3://)")
    p.add_argument("--index-root", required=True, help="index root (local dir or s3://)")
    p.add_argument("--model", default="models:/sscq@champion", help="model URI (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--no-gc", action="store_true", help="publish only; collect garbage later with `sscq gc`")


def config_overrides(a: argparse.Namespace) -> list[str]:
    return ["index.gc_after_reindex=false"] if a.no_gc else []


def check_args(a: argparse.Namespace) -> None:
    """URI schemes first: a bad one is refused before any config or cluster work."""
    from sscq_dist.storage import validate_uri

    validate_uri(a.images)
    validate_uri(a.index_root)


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.console import CONSOLE
    from sscq_dist.reindex_job import run_reindex
    from sscq_dist.train.driver import init_ray

    init_ray(cfg, a.address)
    summary, metrics = run_reindex(a.images, a.index_root, a.model, cfg)
    CONSOLE.line(summary.line())
    if summary.skipped:
        CONSOLE.warn(summary.skipped_line())
    if summary.gc_warning:
        CONSOLE.warn("reindex: " + summary.gc_warning)
    elif summary.gc is not None:
        CONSOLE.line(summary.gc.line())
    if metrics and "recall@10" in metrics:
        CONSOLE.line(f"reindex: served index recall@10 {metrics['recall@10']:.4f} vs exhaustive ADC, "
                     f"{metrics['qps_served']:.0f} QPS served, {metrics['bytes_per_image']:.1f} bytes/image")
    return 0
