"""Multi-epoch input: does a Ray Data executor spin while training consumes? (README, Known limits)

Two consumers (the training workers) read a 2-way `streaming_split` of 60,000 uint8 16 x 16
images, each pausing --step-s per batch of 128 to stand in for a training step, over
--epochs epochs, with the stream built two ways:

- `one stream` (before): one execution over epochs x blocks references with a map task
  per block (how the augmented multi-epoch stream was built);
- `per epoch`: the decoded set materialised once, one execution per epoch with a block
  order reseeded per execution (how `sscq_dist.data.pipeline.cached_train_data` fed the
  workers until 12-07; now its ranks deal the cached blocks themselves, no execution at all,
  and this is its fallback for a dataset with partial blocks).

Per epoch it prints the consumers' images/s and the CPU seconds of the split coordinator
(the process that runs the streaming executor). A spinning executor burns about one core
for as long as the consumers take; an idle one next to none.

    python benchmarks/stream_passes.py                      # 60,000 rows, 6 epochs
    python benchmarks/stream_passes.py --smoke              # seconds: 2,000 rows, 3 epochs
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402  (also puts the repository on sys.path)

BATCH = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--blocks", type=int, default=235, help="blocks (60,000 / 256 rows)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--step-s", type=float, default=0.02, help="pause per consumed batch (a training step)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="2,000 rows in 8 blocks, 3 epochs")
    a = p.parse_args(argv)
    if a.smoke:
        a.rows, a.blocks, a.epochs, a.step_s = 2000, 8, 3, 0.005
    return a


def _pixels(batch: dict) -> dict:
    return {"id": batch["id"], "image": np.zeros((len(batch["id"]), 16, 16, 1), np.uint8)}


def _identity(batch: dict) -> dict:
    return batch


def coordinator_cpu_s() -> dict[int, float]:
    """pid -> CPU seconds used so far, for the processes running a streaming-split coordinator."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if " ".join(proc.info["cmdline"] or []).startswith("ray::SplitCoordinator"):
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two samples, over the coordinator processes alive at the second."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def run_epochs(split, epochs: int, rows_per_epoch: int, step_s: float, one_stream: bool) -> list[dict]:
    """Per-epoch consumer rate and coordinator CPU seconds for a 2-way split."""
    marks = [(time.perf_counter(), coordinator_cpu_s())]
    lock = threading.Lock()
    consumed = [0]

    def consume(it, n_epochs):
        for _ in range(n_epochs):
            for b in it.iter_batches(batch_size=BATCH, batch_format="numpy"):
                time.sleep(step_s)
                with lock:
                    consumed[0] += len(b["id"])
                    if one_stream and consumed[0] >= rows_per_epoch * len(marks):
                        marks.append((time.perf_counter(), coordinator_cpu_s()))

    if one_stream:
        threads = [threading.Thread(target=consume, args=(it, 1)) for it in split]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for _ in range(epochs):
            threads = [threading.Thread(target=consume, args=(it, 1)) for it in split]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            marks.append((time.perf_counter(), coordinator_cpu_s()))
    out = []
    for (t0, c0), (t1, c1) in zip(marks, marks[1:epochs + 1]):
        out.append({"images_per_s": rows_per_epoch / (t1 - t0), "coordinator_cpu_s": cpu_delta(c0, c1), "wall_s": t1 - t0})
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    import ray
    from ray.data import RandomSeedConfig

    bs.start_ray(a.cpus, quiet=True)  # or joins the cluster RAY_ADDRESS names (the test suite's)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = ray.data.range(a.rows, override_num_blocks=a.blocks).map_batches(_pixels, batch_format="numpy").materialize()
    refs = base.to_arrow_refs()
    rng = np.random.default_rng(0)
    one = ray.data.from_arrow_refs([refs[i] for _ in range(a.epochs) for i in rng.permutation(len(refs))]) \
        .map_batches(_identity, batch_format="numpy", batch_size=256)
    per_epoch = base.randomize_block_order(seed=RandomSeedConfig(seed=0, reseed_after_execution=True))
    print(f"rows/epoch={a.rows}, blocks={a.blocks}, epochs={a.epochs}, pause {a.step_s}s per batch of {BATCH}, "
          f"2 consumers, cpus={a.cpus}")
    print("| stream | epoch | consumer images/s | coordinator CPU s | epoch wall s |")
    print("|---|---:|---:|---:|---:|")
    for name, ds, single in (("one stream of all epochs (before)", one, True), ("one execution per epoch (now)",
                                                                             per_epoch, False)):
        split = ds.streaming_split(2, equal=True)
        for e, r in enumerate(run_epochs(split, a.epochs, a.rows, a.step_s, single)):
            print(f"| {name} | {e + 1} | {r['images_per_s']:.0f} | {r['coordinator_cpu_s']:.1f} | {r['wall_s']:.1f} |",
                  flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
