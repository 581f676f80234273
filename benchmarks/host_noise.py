"""How steady is this machine without Ray? The plain PyTorch loop of train_throughput.py (same
model, objective, global batch, views per step; no Ray, no data loading) timed in consecutive
chunks about as long as one training epoch, with what else used the CPU during each chunk.

If this loop alone moves by more than 10 % from chunk to chunk, a per-epoch rate criterion
of 10 % cannot be judged on this host, whatever the training path does.

    python benchmarks/host_noise.py --chunks 12 --steps 230 data.image_size=16   # ~80 s chunks, 16 px
    python benchmarks/host_noise.py --source digits --chunks 3 --steps 5          # seconds
    python benchmarks/host_noise.py --chunks 2 --steps 20 train.bf16=false train.channels_last=false  # fp32

Prints one line per chunk and a markdown table; writes <out>/host_noise.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402  (puts the repository on sys.path)
import train_throughput as tt  # noqa: E402

from sscq_dist.config import load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=bs.SOURCES, default="fashion_mnist")
    p.add_argument("--data-dir", default=None, help="shards (default data/<source>)")
    p.add_argument("--chunks", type=int, default=12, help="consecutive timed chunks")
    p.add_argument("--steps", type=int, default=230, help="training steps per chunk")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--out", default="outputs/bench-host-noise")
    p.add_argument("--config", default=None, help="default: configs/<source>.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    a = p.parse_args(argv)
    a.config = a.config or bs.default_config(a.source)
    return a


class CpuWindow:
    """CPU seconds between two marks: this process, the whole machine (busy), and steal."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._mark = self._read()

    def _read(self):
        t = self._psutil.cpu_times()
        mine = self._me.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        return mine.user + mine.system, busy, getattr(t, "steal", 0.0)

    def take(self) -> dict:
        now = self._read()
        own, busy, steal = (b - a for a, b in zip(self._mark, now))
        self._mark = now
        return {"own_cpu_s": own, "others_cpu_s": max(0.0, busy - own), "steal_s": steal}


def main(argv=None) -> int:
    a = parse_args(argv)
    train_uri = bs.ensure_source(a.source, a.data_dir)[0]
    cfg = load_config(a.config, [f"data.train_uri={train_uri}", *a.overrides])
    cores = bs.cpu_cores()
    from sscq_dist.model.encoding import load_images

    images = load_images(train_uri, cfg, limit=tt.PLAIN_BATCHES * cfg.train.global_batch_size).images
    rows: list[dict] = []
    window: list[CpuWindow] = []

    def on_chunk(i: int, ips: float) -> None:
        rows.append({"chunk": i + 1, "images_per_s": ips, **window[0].take()})
        r = rows[-1]
        print(f"chunk {i + 1}/{a.chunks}: {ips:.0f} images/s, other processes {r['others_cpu_s']:.1f} CPU s, "
              f"steal {r['steal_s']:.1f} s", flush=True)

    plain = tt.plain_rate(cfg, images, a.steps, a.warmup, cores, chunks=a.chunks,
                          on_start=lambda: window.append(CpuWindow()), on_chunk=on_chunk)
    ips = np.array(plain["chunk_images_per_s"])
    mean = float(ips.mean())
    res = {"source": a.source, "image_size": cfg.data.image_size, "bf16": plain["bf16"],
           "channels_last": plain["channels_last"], "global_batch": cfg.train.global_batch_size,
           "cores": cores, "steps_per_chunk": a.steps, "threads": cores, "chunks": rows, "mean_images_per_s": mean,
           "min_deviation": float(ips.min() / mean - 1), "max_deviation": float(ips.max() / mean - 1),
           "command": "python benchmarks/host_noise.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    bs.write_json(os.path.join(a.out, "host_noise.json"), res)
    lines = [f"Plain PyTorch loop, no Ray ({a.source}, {cfg.data.image_size} px, global batch "
             f"{cfg.train.global_batch_size}, {cores} threads, {a.steps} steps per chunk, "
             f"{'bf16' if plain['bf16'] else 'fp32'}{' + channels_last' if plain['channels_last'] else ''}):", "",
             "| chunk | images/s | vs mean | other processes' CPU s | steal s |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['chunk']} | {r['images_per_s']:.0f} | {100 * (r['images_per_s'] / mean - 1):+.1f} % | "
              f"{r['others_cpu_s']:.1f} | {r['steal_s']:.1f} |" for r in rows]
    lines += ["", f"mean {mean:.0f} images/s; chunks from {100 * res['min_deviation']:+.1f} % to "
              f"{100 * res['max_deviation']:+.1f} % of it"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from sscq_dist.cli import run_main

    run_main(lambda: main())
