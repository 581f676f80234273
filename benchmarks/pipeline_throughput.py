"""Training input throughput (images/s): Ray Data decode to uint8, then the two views made in
this process as a training worker makes them.

    python benchmarks/pipeline_throughput.py --source digits --rows 20000
    python benchmarks/pipeline_throughput.py --images data/fashion_mnist/train

With --source digits the bundled digits are replicated to --rows images (ids offset per
copy) so the pass is long enough to measure. Prints one line per pass and a summary.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.config import load_config  # noqa: E402


def make_digits(dest: str, rows: int, rows_per_shard: int) -> str:
    from sscq_dist.ingest import Record, digits_records, write_shards
    from sscq_dist.storage import resolve

    base = digits_records("all")

    def gen():
        for i in range(rows):
            r = base[i % len(base)]
            yield Record(i, r.image, r.uri, r.label)
    write_shards(gen(), resolve(dest), rows_per_shard, overwrite=True, total=rows, progress=False)
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="existing image shards (local or s3://)")
    p.add_argument("--source", default="digits", help="with no --images: replicate the bundled digits")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--rows-per-shard", type=int, default=2000)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray logical CPUs (default: all cores)")
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    import ray

    from sscq_dist.data.pipeline import pipeline_pass
    from sscq_dist.train.driver import quiet_ray_data

    cfg = load_config(a.config, a.overrides)
    quiet_ray_data()
    ray.init(num_cpus=a.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        uri = a.images or make_digits(os.path.join(tmp, "imgs"), a.rows, a.rows_per_shard)
        rates = []
        for i in range(a.passes):
            s = pipeline_pass(uri, cfg, batch_size=256, two_views_on_consumer=True, progress=False)
            rates.append(s.images_per_s)
            print(f"pass {i + 1}: {s.rows} images ({s.dropped} dropped) in {s.seconds:.1f}s = "
                  f"{s.images_per_s:.0f} images/s (Ray Data decode to uint8 + 2 views made here, {cfg.data.image_size}px)")
    print(f"pipeline throughput: best {max(rates):.0f} images/s on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
