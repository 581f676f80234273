"""Re-index images with the champion: `python jobs/reindex.py --images URI --index-root URI`.

Incremental and exactly-once: only source shards missing from (or changed since) the
version's latest snapshot are built, as parts on Ray Data workers; the run publishes one new
snapshot generation and flips CURRENT to it. A new champion is built beside the serving
version. Exits 0 with "nothing to do" when everything is up to date, 2 with one `error:` line
otherwise. Schedule it with cron or the Kubernetes CronJob in infra/ (see README).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.indexing.job import run_reindex  # noqa: E402
from sscq_dist.storage import validate_uri  # noqa: E402
from sscq_dist.train.driver import init_ray  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image shards prefix (local dir or s3://)")
    p.add_argument("--index-root", required=True, help="index root (local dir or s3://)")
    p.add_argument("--model", default="models:/sscq@champion", help="model URI (default: %(default)s)")
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    a = p.parse_args()
    validate_uri(a.images)
    validate_uri(a.index_root)
    cfg = load_config(a.config, a.overrides)
    init_ray(cfg, a.address)
    summary, metrics = run_reindex(a.images, a.index_root, a.model, cfg)
    print(summary.line())
    if metrics and "recall@10" in metrics:
        print(f"reindex: served index recall@10 {metrics['recall@10']:.4f} vs exhaustive ADC, "
              f"{metrics['qps_served']:.0f} QPS served, {metrics['bytes_per_image']:.1f} bytes/image")
    return 0


if __name__ == "__main__":
    run_main(main)
