"""Multi-pass training stream: cost of building N passes as one input vs a union of N datasets.

The training pipeline streams every epoch of a cached collection from one Ray Data
execution (`sscq_dist.data.pipeline.cached_epochs_dataset`). This measures how long it takes
to stream the first --consume passes when the stream holds --passes passes, built

- `refs`: the way the library does it, one input of passes x blocks references
  (`repeat_blocks`);
- `union`: one `randomize_block_order` dataset per pass joined by `Dataset.union`.

Rows are small synthetic uint8 images (16 x 16) passed through an identity `map_batches`, so
the time is the executor's, not the augmentation's.

    python benchmarks/stream_passes.py                        # passes 10 and 60, 60,000 rows
    python benchmarks/stream_passes.py --smoke               # seconds: 2,000 rows, passes 2 and 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup  # noqa: E402,F401  (puts the repository on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=60_000, help="rows per pass")
    p.add_argument("--blocks", type=int, default=235, help="blocks per pass (60,000 / 256 rows)")
    p.add_argument("--passes", type=int, nargs="+", default=[10, 60], help="passes held by the stream")
    p.add_argument("--consume", type=int, default=3, help="passes read from each stream")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--smoke", action="store_true", help="2,000 rows in 8 blocks, passes 2 and 4, consume 2")
    a = p.parse_args(argv)
    if a.smoke:
        a.rows, a.blocks, a.passes, a.consume = 2000, 8, [2, 4], 2
    return a


def _pixels(batch: dict) -> dict:
    return {"id": batch["id"], "pixels": np.zeros((len(batch["id"]), 1, 16, 16), np.uint8)}


def _identity(batch: dict) -> dict:
    return batch


def union_stream(ds, passes: int):
    parts = [ds.randomize_block_order(seed=e) for e in range(passes)]
    return parts[0].union(*parts[1:]) if passes > 1 else parts[0]


def time_stream(stream, rows: int) -> float:
    """Seconds to read `rows` rows through an identity map (what training's reader sees)."""
    t0, seen = time.perf_counter(), 0
    for batch in stream.map_batches(_identity, batch_format="numpy", batch_size=256).iter_batches(
            batch_size=256, batch_format="numpy"):
        seen += len(batch["id"])
        if seen >= rows:
            break
    return time.perf_counter() - t0


def main(argv=None) -> int:
    a = parse_args(argv)
    if min(a.passes) < a.consume:
        raise SystemExit(f"--consume {a.consume} is more than the smallest --passes {min(a.passes)}")
    import ray

    from sscq_dist.data.pipeline import repeat_blocks

    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = ray.data.range(a.rows, override_num_blocks=a.blocks).map_batches(_pixels, batch_format="numpy").materialize()
    print(f"rows/pass={a.rows}, blocks/pass={a.blocks}, consume={a.consume} passes, cpus={a.cpus}")
    print("| stream built as | passes held | seconds to stream the first passes |")
    print("|---|---:|---:|")
    for name, build in (("refs (repeat_blocks)", lambda n: repeat_blocks(base, n)), ("union", lambda n: union_stream(base, n))):
        for n in a.passes:
            print(f"| {name} | {n} | {time_stream(build(n), a.consume * a.rows):.1f} |", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
