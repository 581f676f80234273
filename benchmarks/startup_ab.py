"""Start-up cuts of 12-07, measured side by side on one warm local Ray (digits):

- `train`: a 2-epoch digits training run (2 workers, cached set) with the workers dealing
  the cached blocks themselves (now) against the set handed to Ray Train as a dataset (its
  streaming split and split coordinator: before; still the fallback for partial blocks);
- `encode`: a reindex of the 1,797 digits (18 shards) with the encoder actors taking the
  driver's loaded model from the object store (now) against each actor loading it from the
  MLflow registry by its URI (before).

Runs alternate (before, now, before, ...) after one warm-up run each, so host drift falls on
both sides. Prints each run and the means; writes `startup_ab.json`.

    python benchmarks/startup_ab.py                    # 3 pairs of each
    python benchmarks/startup_ab.py --pairs 1          # the quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402  (also puts the repository on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="alternating before/now pairs of each measure")
    p.add_argument("--out", default=os.path.join("outputs", "bench-startup-ab"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as the suite's Ray
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="startup-ab-", dir=os.path.abspath(a.out))
    from sscq_dist.config import load_config
    from sscq_dist.data import cached_shard
    from sscq_dist.indexing import reindex as reindex_mod
    from sscq_dist.ingest import ingest
    from sscq_dist.registry import load_model
    from sscq_dist.train.driver import run_training

    train_uri, test_uri = bs.ensure_source("digits", os.path.join(work, "digits"))
    ingest("digits", os.path.join(work, "all"), rows_per_shard=100, splits=["all"], progress=False)
    bs.start_ray(4, quiet=True)
    store = f"sqlite:///{work}/mlflow.db"

    def cfg_for(run: str, *extra: str):
        return load_config(bs.default_config("digits"), [
            f"data.train_uri={train_uri}", f"data.queries_uri={test_uri}", f"train.storage_path={work}/runs",
            f"tracking.tracking_uri={store}", f"tracking.output_dir={work}/outputs", f"train.run_name={run}",
            "train.epochs=2", *extra])

    real_blocks, real_object = cached_shard.cached_blocks, reindex_mod.model_object
    res: dict = {"train": {"now": [], "before": []}, "encode": {"now": [], "before": []}}
    order = ["now", "before"] + ["before", "now"] * a.pairs  # the first pair warms up, not counted
    last = None
    for i, mode in enumerate(order):
        cached_shard.cached_blocks = real_blocks if mode == "now" else (lambda ds, seed: None)
        t0 = time.perf_counter()
        last = run_training(cfg_for(f"ab{i}"))
        s = time.perf_counter() - t0
        if i >= 2:
            res["train"][mode].append(s)
        print(f"train  {mode:6s} {s:6.2f} s{'' if i >= 2 else ' (warm-up)'}", flush=True)
    cached_shard.cached_blocks = real_blocks

    cfg = cfg_for("enc")
    uri = f"models:/sscq/{last.version}"
    loaded = load_model(uri, cfg.tracking)
    for i, mode in enumerate(order):
        reindex_mod.model_object = real_object if mode == "now" else (lambda loaded: None)
        t0 = time.perf_counter()
        summary = reindex_mod.reindex(os.path.join(work, "all", "all"), os.path.join(work, f"index{i}"), uri, cfg,
                                      progress=False, loaded=loaded)
        s = time.perf_counter() - t0
        first = summary.stage_seconds.get("build_first_part", 0.0)
        if i >= 2:
            res["encode"][mode].append({"seconds": s, "first_part_s": first})
        print(f"encode {mode:6s} {s:6.2f} s (first part after {first:.2f} s){'' if i >= 2 else ' (warm-up)'}",
              flush=True)
    reindex_mod.model_object = real_object

    def mean(xs):
        return statistics.mean(xs) if xs else float("nan")
    tr, en = res["train"], res["encode"]
    res["summary"] = {
        "train_s": {"now": mean(tr["now"]), "before": mean(tr["before"])},
        "reindex_s": {"now": mean([r["seconds"] for r in en["now"]]), "before": mean([r["seconds"] for r in en["before"]])},
        "first_part_s": {"now": mean([r["first_part_s"] for r in en["now"]]),
                         "before": mean([r["first_part_s"] for r in en["before"]])},
        "cpus": os.cpu_count(), "pairs": a.pairs}
    bs.write_json(os.path.join(a.out, "startup_ab.json"), res)
    sm = res["summary"]
    print("| measure (means of the counted runs) | before | now |\n|---|---:|---:|")
    print(f"| 2-epoch digits training run, s | {sm['train_s']['before']:.2f} | {sm['train_s']['now']:.2f} |")
    print(f"| digits reindex (18 shards), s | {sm['reindex_s']['before']:.2f} | {sm['reindex_s']['now']:.2f} |")
    print(f"| reindex: first part after, s | {sm['first_part_s']['before']:.2f} | {sm['first_part_s']['now']:.2f} |")
    return res


if __name__ == "__main__":
    main()
