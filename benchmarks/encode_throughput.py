"""Batch-encoding rate of the re-index job vs the bare model forward (SPEC section 7).

Measured in one run on the same images, batch size and model:
1. `reindex` end to end (plan; parts built on a Ray Data actor pool: read + decode +
   forward + FAISS add + part / id map / record writes; id check; snapshot; CURRENT):
   encoded rows / the job's wall time; Ray's start-up is excluded (Ray is started first);
2. the build stage alone (parts built on the Ray Data actor pool): rows / wall time;
3. the bare model forward in one process over the already decoded images (torch threads =
   all cores), and single-process PIL decode for reference.

    python benchmarks/encode_throughput.py                    # Fashion-MNIST train, 60,000 images
    python benchmarks/encode_throughput.py --source digits --rows 50000
    python benchmarks/encode_throughput.py --smoke            # seconds: 2,000 digits
    python benchmarks/encode_throughput.py index.use_gpu=true # on a GPU machine (1 actor per GPU)

The model is a randomly initialised one built from the config (the rate does not depend on
the weights) unless --model names a registered model or a model directory. The index type
defaults to pq_fastscan (no IVF training pass), so the job's rate is the encoding rate; pass
index.index_type=ivf_pq_fastscan to include the coarse-quantizer pass. Prints a markdown
table and writes <out>/encode_throughput.json (--json to choose the path).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402  (puts the repository on sys.path)

from sscq_dist.config import Config, load_config  # noqa: E402

SMOKE_ROWS = 2000
# Shards the repeated digits are split into (at least), so every encoding actor gets input.
ENCODE_SHARDS = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=bs.SOURCES, default="fashion_mnist",
                   help="fashion_mnist: its 60,000 train images; digits: the digits repeated to --rows")
    p.add_argument("--images", default=None, help="existing image shards instead of --source")
    p.add_argument("--rows", type=int, default=60_000, help="rows of repeated digits (--source digits)")
    p.add_argument("--model", default=None, help="models:/name/version or a model dir (default: random init)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="encoding actors (index.encode_concurrency; default: cores, or GPUs with index.use_gpu)")
    p.add_argument("--batch-size", type=int, default=None, help="index.encode_batch_size (also the bare loop's)")
    p.add_argument("--no-stream", action="store_true", help="skip the build-stage-only pass")
    p.add_argument("--data-dir", default=None, help="shards (default data/<source>)")
    p.add_argument("--out", default=None, help="output dir (default outputs/bench-encode-throughput)")
    p.add_argument("--json", default=None, help="results JSON path (default <out>/encode_throughput.json)")
    p.add_argument("--config", default=None, help="default: configs/<source>.yaml")
    p.add_argument("--quiet", action="store_true", help="keep Ray worker logs off stdout")
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_ROWS} repeated digits")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    a = p.parse_args(argv)
    if a.smoke:
        a.source, a.rows, a.quiet = "digits", SMOKE_ROWS, True
    a.data_dir = a.data_dir or os.path.join(bs.REPO, "data", a.source)
    a.out = os.path.abspath(a.out or os.path.join("outputs", "bench-encode-throughput" + ("-smoke" if a.smoke else "")))
    a.json = a.json or os.path.join(a.out, "encode_throughput.json")
    a.config = a.config or bs.default_config(a.source)
    return a


def default_concurrency(use_gpu: bool) -> int:
    """One actor per core on CPU (each runs one torch thread), one per GPU otherwise."""
    if use_gpu:
        import torch

        return max(1, torch.cuda.device_count())
    return bs.cpu_cores()


def job_config(a: argparse.Namespace) -> Config:
    """The job config: --config + overrides, with the benchmark's defaults where none is given."""
    pre = load_config(a.config, a.overrides)
    given = {o.split("=", 1)[0] for o in a.overrides}
    first = [] if "index.index_type" in given else ["index.index_type=pq_fastscan"]
    last = []
    if a.concurrency or "index.encode_concurrency" not in given:
        last.append(f"index.encode_concurrency={a.concurrency or default_concurrency(pre.index.use_gpu)}")
    if a.batch_size:
        last.append(f"index.encode_batch_size={a.batch_size}")
    return load_config(a.config, [*first, *a.overrides, *last])


def model_for(a: argparse.Namespace, cfg: Config):
    """The LoadedModel to encode with: --model, or a random init saved as a model directory.

    The encoding stage reads its index settings (actors, batch, GPU) from the model's config,
    so the job config's index section is put there: the run measures what was asked.
    """
    import dataclasses

    import torch

    from sscq_dist.model import build_model
    from sscq_dist.registry import load_model, write_model_dir

    if a.model:
        loaded = load_model(a.model, cfg.tracking)
    else:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, cfg.data.channels)
        model_dir = os.path.join(a.out, "model")
        write_model_dir(model_dir, model.state_dict(), cfg)
        loaded = load_model(model_dir, cfg.tracking)
    return dataclasses.replace(loaded, cfg=dataclasses.replace(loaded.cfg, index=cfg.index))


def build_rate(uri: str, loaded, cfg: Config, root: str) -> dict:
    """rows / wall time of the build stage alone: parts built on the actor pool (read + decode +
    forward + FAISS add + part writes), also after the first record (actor start-up excluded)."""
    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.indexing.build import BuildJob, build_parts
    from sscq_dist.indexing.formats import version_loc
    from sscq_dist.indexing.plan import list_source_shards
    from sscq_dist.indexing.reindex import encode_config, model_version
    from sscq_dist.indexing.trained import ensure_trained_index
    from sscq_dist.storage import resolve

    enc = encode_config(cfg, loaded)
    todo = list_source_shards(resolve(uri, cfg.storage))
    version = model_version(loaded)
    # Parts hold codes against the version's one trained index, written once before the build.
    trained, _ = ensure_trained_index(version_loc(resolve(root, cfg.storage), version), todo, loaded.uri, enc,
                                      loaded.codebooks)
    job = BuildJob(root_uri=root, model_uri=loaded.uri, version=version,
                   codebook_checksum=fi.codebook_checksum(loaded.codebooks), index_type=enc.index.index_type,
                   coarse_checksum=trained, cfg_dict=enc.to_dict())
    r = build_parts(todo, job, enc, progress=False)
    rows = r.built_rows
    first = rows / max(1, len(r.records))  # the first part's rows (the shards are equal here)
    steady_s = r.seconds - r.first_record_s
    return {"rows": rows, "seconds": r.seconds, "images_per_s": rows / r.seconds, "first_batch_s": r.first_record_s,
            "steady_images_per_s": (rows - first) / steady_s if rows > first and steady_s > 0 else None,
            "driver_bytes_per_image": r.received_bytes / max(1, rows)}


def bare_rates(uri: str, loaded, batch_size: int, threads: int, use_gpu: bool) -> dict:
    """Single-process PIL decode rate, then the bare forward rate over the decoded images."""
    import torch

    from sscq_dist.data.augment import eval_view
    from sscq_dist.model.encoding import load_images

    t0 = time.perf_counter()
    images = load_images(uri, loaded.cfg).images
    decode_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
    model = loaded.model.eval().to(device)
    with torch.no_grad():
        model.embed(eval_view(torch.from_numpy(images[:batch_size])).to(device))  # one-time kernel set-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            f = model.embed(eval_view(torch.from_numpy(images[i:i + batch_size])).to(device))
            f.float().cpu()  # the job copies embeddings back to host memory too
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_s = time.perf_counter() - t0
    model.to("cpu")
    return {"rows": len(images), "decode_images_per_s": len(images) / decode_s,
            "forward_images_per_s": len(images) / forward_s, "forward_seconds": forward_s,
            "threads": threads, "device": device.type}


def markdown(res: dict) -> str:
    bare = res["bare"]["forward_images_per_s"]
    dev = res["bare"]["device"]
    lines = [f"Encoding throughput ({res['rows']} images, {res['image_size']} px, batch {res['batch_size']}, "
             f"{res['bits']} bits, {res['cores']} CPU cores, device {dev}):", "",
             "| path | images/s | vs bare forward |", "|---|---:|---:|",
             f"| bare model forward, 1 process, {res['bare']['threads']} torch threads, decoded images in memory | "
             f"{bare:.0f} | 1.00 |",
             f"| single-process PIL decode (reference) | {res['bare']['decode_images_per_s']:.0f} | - |"]
    if res.get("stream"):
        s = res["stream"]["images_per_s"]
        lines.append(f"| build stage: parts on {res['concurrency']} Ray Data actor(s) (read + decode + forward + "
                     f"FAISS add + part writes) | {s:.0f} | {s / bare:.2f} |")
        steady = res["stream"].get("steady_images_per_s")
        if steady:
            lines.append(f"| build stage after its first part ({res['stream']['first_batch_s']:.1f} s of actor "
                         f"start-up and model load excluded) | {steady:.0f} | {steady / bare:.2f} |")
    r = res["reindex"]["images_per_s"]
    lines.append(f"| reindex job end to end ({res['index_type']}: plan + build + id check + snapshot + GC) | "
                 f"{r:.0f} | {r / bare:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from sscq_dist.indexing.reindex import reindex

    a = parse_args(argv)
    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    if a.images:
        uri = a.images
    elif a.source == "digits":
        per_shard = min(bs.ROWS_PER_SHARD, max(1, a.rows // ENCODE_SHARDS))
        uri = bs.replicate_digits(os.path.join(a.data_dir, f"replicated-{a.rows}"), a.rows, per_shard)
    else:
        uri = bs.ensure_source(a.source, a.data_dir)[0]
    cfg = job_config(a)
    loaded = model_for(a, cfg)
    cores = bs.cpu_cores()
    bs.start_ray(max(cores, cfg.index.encode_concurrency + 1), a.quiet)
    index_root = os.path.join(a.out, "index")
    shutil.rmtree(index_root, ignore_errors=True)  # a fresh index: every row is encoded
    print(f"=== reindex ({cfg.index.encode_concurrency} encoding actor(s))", flush=True)
    summary = reindex(uri, index_root, loaded.uri, cfg, progress=not a.quiet, loaded=loaded)
    res = {"rows": summary.encoded_rows, "image_size": loaded.cfg.data.image_size, "bits": loaded.cfg.model.bits,
           "batch_size": cfg.index.encode_batch_size, "concurrency": cfg.index.encode_concurrency,
           "index_type": cfg.index.index_type, "cores": cores,
           "reindex": {"rows": summary.encoded_rows, "seconds": summary.seconds,
                       "images_per_s": summary.encoded_rows / summary.seconds,
                       "bytes_per_image": summary.index_bytes / max(1, summary.total_rows)}}
    if not a.no_stream:
        print("=== build stage only", flush=True)
        scratch = os.path.join(a.out, "index-build-only")
        shutil.rmtree(scratch, ignore_errors=True)
        res["stream"] = build_rate(uri, loaded, cfg, scratch)
    print("=== bare forward", flush=True)
    res["bare"] = bare_rates(uri, loaded, cfg.index.encode_batch_size, cores, cfg.index.use_gpu)
    res["ratio_reindex_vs_bare"] = res["reindex"]["images_per_s"] / res["bare"]["forward_images_per_s"]
    res["command"] = "python benchmarks/encode_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bs.write_json(a.json, res)
    print(markdown(res))
    print(f"encode throughput: results {a.json}; {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    from sscq_dist.cli import run_main

    run_main(lambda: main())
