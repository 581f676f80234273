"""Training step overhead and data plane rate (SPEC section 7), measured in one run.

Three measurements on the same machine, same model, losses and global batch:
1. the real training path (`run_training`, what `jobs/train.py` calls: Ray Train +
   DeepSpeed, W workers, Ray Data input): steady images/s and data-wait fraction, read
   from the per-epoch MLflow metrics `epoch/images_per_s` and `epoch/data_wait_fraction`
   (epochs after the first, which carries the input pipeline's start-up), for each --workers;
2. one plain PyTorch process (torch threads = all cores, same global batch, same Adam +
   warm-up/cosine schedule + clipping) over uint8 batches already in memory, making the
   two views per step exactly as the worker does (`two_views`): the reference rate, so the
   ratio is the framework's overhead, not a difference in work (precision by the job's own
   rule: bf16 + channels_last where `resolve_precision` picks them);
3. the data plane alone: one `pipeline_pass` (Ray Data decode to uint8 + the two views
   made in the consuming process) over the training shards, against the rate training consumes;
4. object-store bytes per image of the training stream, measured on materialised rows of
   the first shard: the uint8 stream now, and the previous format (two float32 views per
   image, built the old way for the measurement) before.

    python benchmarks/train_throughput.py                       # Fashion-MNIST 28 px, 1 and 2 workers
    python benchmarks/train_throughput.py --source digits --workers 1 2
    python benchmarks/train_throughput.py --smoke               # seconds: digits, 2 workers, few steps
    python benchmarks/train_throughput.py train.use_gpu=true --workers 1   # on a GPU machine

Prints markdown tables and writes <out>/train_throughput.json (--json to choose the path).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402  (puts the repository on sys.path)

from sscq_dist.config import Config, load_config  # noqa: E402

EXPERIMENT = "sscq-bench-throughput"
# Distinct pre-augmented global batches the plain loop cycles through.
PLAIN_BATCHES = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=bs.SOURCES, default="fashion_mnist")
    p.add_argument("--images", default=None, help="existing training shards (default: the --source train split)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to run")
    p.add_argument("--epochs", type=int, default=3, help="epochs per Ray run (the first is not counted)")
    p.add_argument("--steps", type=int, default=40,
                   help="steps per epoch (train.max_steps_per_epoch; 0 = a full pass)")
    p.add_argument("--plain-steps", type=int, default=40, help="timed steps of the plain PyTorch loop")
    p.add_argument("--plain-warmup", type=int, default=3, help="untimed first steps of the plain loop")
    p.add_argument("--pipeline-passes", type=int, default=2,
                   help="data plane passes; the best counts (the first pays Ray Data's start-up); 0 = skip")
    p.add_argument("--data-dir", default=None, help="shards (default data/<source>)")
    p.add_argument("--out", default=None, help="output dir (default outputs/bench-train-throughput)")
    p.add_argument("--json", default=None, help="results JSON path (default <out>/train_throughput.json)")
    p.add_argument("--config", default=None, help="default: configs/<source>.yaml")
    p.add_argument("--quiet", action="store_true", help="keep Ray worker logs off stdout")
    p.add_argument("--smoke", action="store_true", help="digits, 2 workers, 2 epochs of 3 steps, 3 plain steps")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, key.sub=value")
    a = p.parse_args(argv)
    if a.smoke:
        a.source, a.workers, a.epochs, a.steps, a.plain_steps, a.plain_warmup, a.pipeline_passes, a.quiet = \
            "digits", [2], 2, 3, 3, 1, 1, True
    a.data_dir = a.data_dir or os.path.join(bs.REPO, "data", a.source)
    a.out = os.path.abspath(a.out or os.path.join("outputs", "bench-train-throughput" + ("-smoke" if a.smoke else "")))
    a.json = a.json or os.path.join(a.out, "train_throughput.json")
    a.config = a.config or bs.default_config(a.source)
    return a


def run_config(a: argparse.Namespace, train_uri: str, workers: int, tracking_uri: str) -> Config:
    """One Ray run: W workers sharing all cores, capped epochs, storage and tracking under --out."""
    cores = bs.cpu_cores()
    return load_config(a.config, [
        f"data.train_uri={train_uri}", f"train.num_workers={workers}",
        f"train.cpus_per_worker={max(1.0, cores / workers)}", f"train.epochs={a.epochs}",
        f"train.max_steps_per_epoch={a.steps}", f"train.checkpoint_every_epochs={a.epochs}",
        f"train.storage_path={os.path.join(a.out, 'runs')}", f"train.run_name=throughput-w{workers}",
        f"tracking.tracking_uri={tracking_uri}", f"tracking.experiment={EXPERIMENT}",
        "tracking.registered_model=bench-throughput", f"tracking.output_dir={os.path.join(a.out, 'outputs')}",
        *a.overrides])


def ray_rate(cfg: Config) -> dict:
    """Train with the real driver; steady images/s and data-wait fraction from the epoch metrics."""
    from sscq_dist.train.driver import run_training

    r = run_training(cfg)
    ips = bs.metric_history(r.run_id, "epoch/images_per_s")
    wait = bs.metric_history(r.run_id, "epoch/data_wait_fraction")
    steady = slice(1, None) if len(ips) > 1 else slice(None)
    return {"workers": cfg.train.num_workers, "threads_per_worker": max(1, int(cfg.train.cpus_per_worker)),
            "images_per_s": float(np.mean(ips[steady])), "data_wait_fraction": float(np.mean(wait[steady])),
            "epoch_images_per_s": ips, "epoch_data_wait_fraction": wait, "run_wall_s": r.seconds,
            "run_id": r.run_id}


def _views(out, n: int):
    """Split a forward pass over cat(view_a, view_b) into the two views' SSCQOutputs (float32)."""
    from sscq_dist.model import SSCQOutput

    def part(sl):
        return SSCQOutput(f=out.f[sl].float(), z=out.z[sl].float(), soft=out.soft[sl].float(), codes=out.codes[sl])
    return part(slice(0, n)), part(slice(n, 2 * n))


def plain_rate(cfg: Config, images_u8: np.ndarray, steps: int, warmup: int, threads: int,
               chunks: int = 1, on_start=None, on_chunk=None) -> dict:
    """images/s of the same model, objective and global batch in one PyTorch process.

    images_u8: (N, C, H, W) decoded training images; PLAIN_BATCHES uint8 global batches
    (NHWC, as the stream carries them) are cycled, and every step makes its two views
    with `two_views`, as a training worker does. `chunks` times `steps` timed steps, each
    chunk timed on its own (`chunk_images_per_s`); on_start() after the warm-up,
    on_chunk(i, images_per_s) after each chunk.
    """
    import torch

    from sscq_dist.data.augment import two_views
    from sscq_dist.losses.objective import SSCQObjective
    from sscq_dist.model import build_model
    from sscq_dist.neighbor_bank import NeighborBank
    from sscq_dist.train.loop import autocast, lr_lambda, resolve_precision

    torch.set_num_threads(threads)
    device = torch.device("cuda") if cfg.train.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    # The training job's own precision rule (auto: bf16 + channels_last on CUDA and on CPUs with
    # bf16 hardware; train.bf16 / train.channels_last force it), so both sides compare alike.
    precision = resolve_precision(cfg.train, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.channels).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = SSCQObjective(cfg.loss, cfg.model)
    m, d = cfg.model.num_codebooks, cfg.model.codeword_dim
    bank = NeighborBank(m, d, cfg.bank.size, 1, 0).to(device) if cfg.bank.enabled else None
    total = warmup + steps * chunks
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(1, total // 10), total))
    b = cfg.train.global_batch_size
    rng = np.random.default_rng(cfg.train.seed)
    batches = []
    for _ in range(PLAIN_BATCHES):
        u8 = images_u8[rng.choice(len(images_u8), b, replace=len(images_u8) < b)]
        batches.append(torch.from_numpy(np.ascontiguousarray(u8.transpose(0, 2, 3, 1))).to(device))
    step_no = [0]

    def step(images):
        step_no[0] += 1
        views = two_views(images, cfg.data.augment, cfg.train.seed, 0, step_no[0],
                          channels_last=precision.channels_last)
        with autocast(device, precision):
            out = model(views)
        out_a, out_b = _views(out, b)
        losses = objective(out_a, out_b, model.quantizer.codebooks.float(), bank=bank, use_bank=bank is not None)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        if bank is not None:
            bank.enqueue(out_b.z.detach().float().view(b, m, d))
        return float(losses["total"].detach())  # the Ray loop reads every loss term back too

    model.train()
    for i in range(warmup):
        step(batches[i % PLAIN_BATCHES])
    chunk_s = []
    if on_start is not None:
        on_start()
    for c in range(chunks):
        t0 = time.perf_counter()
        for i in range(steps):
            step(batches[i % PLAIN_BATCHES])
        if device.type == "cuda":
            torch.cuda.synchronize()
        chunk_s.append(time.perf_counter() - t0)
        if on_chunk is not None:
            on_chunk(c, steps * b / chunk_s[-1])
    seconds = sum(chunk_s)
    return {"workers": 1, "threads_per_worker": threads, "images_per_s": steps * chunks * b / seconds,
            "steps": steps * chunks, "seconds": seconds, "device": device.type,
            "chunk_images_per_s": [steps * b / t for t in chunk_s], "bf16": precision.bf16,
            "channels_last": precision.channels_last}


def pipeline_rate(uri: str, cfg: Config, passes: int) -> dict:
    """Best of `passes` passes of Ray Data decode (uint8) + the two views made by the consumer."""
    from sscq_dist.data.pipeline import pipeline_pass

    runs = [pipeline_pass(uri, cfg, batch_size=cfg.data.decode_batch_size, two_views_on_consumer=True,
                          progress=False)
            for _ in range(passes)]
    best = max(runs, key=lambda s: s.images_per_s)
    return {"images_per_s": best.images_per_s, "rows": best.rows, "dropped": best.dropped, "seconds": best.seconds,
            "pass_images_per_s": [s.images_per_s for s in runs]}


def _old_float_views(batch: dict, aug) -> dict:
    """The stream format before the uint8 change: two augmented float32 views per image."""
    import torch

    from sscq_dist.data.augment import augment

    t = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    return {"id": batch["id"], "ok": batch["ok"], "view_a": augment(t, aug).numpy(), "view_b": augment(t, aug).numpy()}


def stream_bytes(uri: str, cfg: Config) -> dict:
    """Object-store bytes per image of the first shard's rows: uint8 stream (now) vs two float32 views (before)."""
    from sscq_dist.data.pipeline import decoded_images

    first = sorted(os.path.join(uri, f) for f in os.listdir(uri) if f.endswith(".parquet"))[0] \
        if "://" not in uri else uri
    ds, _ = decoded_images(first, cfg)
    now = ds.materialize()
    before = now.map_batches(_old_float_views, fn_kwargs={"aug": cfg.data.augment}, batch_format="numpy",
                             batch_size=cfg.data.decode_batch_size).materialize()
    rows = now.count()
    c, h = cfg.data.channels, cfg.data.image_size
    return {"rows": rows, "chw": c * h * h, "uint8_bytes_per_image": now.size_bytes() / rows,
            "float_views_bytes_per_image": before.size_bytes() / rows}


def markdown(res: dict) -> str:
    plain = res["plain"]["images_per_s"]
    zero = res["zero_stage"]
    lines = [f"Training throughput ({res['source']}, {res['image_size']} px, global batch {res['global_batch']}, "
             f"{res['bits']} bits, {res['cores']} CPU cores, device {res['device']}):", "",
             "| setup | workers | torch threads / worker | images/s | vs plain PyTorch | scaling vs 1 worker | "
             "data wait |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| plain PyTorch, 1 process, uint8 batches in memory, views per step | 1 | {res['plain']['threads_per_worker']} | "
             f"{plain:.0f} | 1.00 | - | - |"]
    one = next((r["images_per_s"] for r in res["ray"] if r["workers"] == 1), None)
    for r in res["ray"]:
        scale = f"{r['images_per_s'] / one:.2f}" if one else "-"
        lines.append(f"| Ray Train + DeepSpeed ZeRO-{zero} (jobs/train.py path) | {r['workers']} | "
                     f"{r['threads_per_worker']} | {r['images_per_s']:.0f} | {r['images_per_s'] / plain:.2f} | "
                     f"{scale} | {100 * r['data_wait_fraction']:.1f}% |")
    if res.get("pipeline"):
        p = res["pipeline"]
        consume = max(r["images_per_s"] for r in res["ray"])
        lines += ["", "| data plane | images/s | vs fastest training consumption |", "|---|---:|---:|",
                  f"| Ray Data decode + two augmented views (pipeline_pass, {p['rows']} rows) | "
                  f"{p['images_per_s']:.0f} | {p['images_per_s'] / consume:.2f}x |"]
    if res.get("stream_bytes"):
        sb = res["stream_bytes"]
        lines += ["", f"| object-store bytes per image ({sb['rows']} rows, C*H*W = {sb['chw']}) | bytes |",
                  "|---|---:|",
                  f"| before: two float32 views + id + ok | {sb['float_views_bytes_per_image']:.0f} |",
                  f"| now: uint8 image + id + ok + shard | {sb['uint8_bytes_per_image']:.0f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    train_uri = a.images or bs.ensure_source(a.source, a.data_dir)[0]
    tracking_uri = bs.tracking_store(a.out, EXPERIMENT)
    cores = bs.cpu_cores()
    base = run_config(a, train_uri, max(a.workers), tracking_uri)
    bs.start_ray(max(cores, max(int(w * base.train.cpus_per_worker) for w in a.workers) + 2), a.quiet)
    ray_runs = []
    for w in a.workers:
        print(f"=== Ray Train + DeepSpeed, {w} worker(s)", flush=True)
        ray_runs.append(ray_rate(run_config(a, train_uri, w, tracking_uri)))
        print(f"{w} worker(s): {ray_runs[-1]['images_per_s']:.0f} images/s, "
              f"data wait {100 * ray_runs[-1]['data_wait_fraction']:.1f}%", flush=True)
    print("=== plain PyTorch", flush=True)
    from sscq_dist.model.encoding import load_images

    images = load_images(train_uri, base, limit=PLAIN_BATCHES * base.train.global_batch_size).images
    plain = plain_rate(base, images, a.plain_steps, a.plain_warmup, cores)
    pipe = None
    if a.pipeline_passes > 0:
        print("=== data plane (pipeline_pass)", flush=True)
        pipe = pipeline_rate(train_uri, base, a.pipeline_passes)
    print("=== object-store bytes per image", flush=True)
    sbytes = stream_bytes(train_uri, base)
    res = {"source": a.images or a.source, "image_size": base.data.image_size,
           "global_batch": base.train.global_batch_size, "bits": base.model.bits, "cores": cores,
           "zero_stage": base.train.zero_stage, "device": plain["device"], "epochs": a.epochs, "steps": a.steps,
           "plain": plain, "ray": ray_runs, "pipeline": pipe, "stream_bytes": sbytes,
           "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    res["overhead_ratio"] = {str(r["workers"]): r["images_per_s"] / plain["images_per_s"] for r in ray_runs}
    bs.write_json(a.json, res)
    print(markdown(res))
    print(f"train throughput: results {a.json}; {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    from sscq_dist.cli import run_main

    run_main(lambda: main())
