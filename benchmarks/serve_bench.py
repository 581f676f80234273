"""Search service benchmark (issue 13, SPEC sections 7-8).

    python benchmarks/serve_bench.py                 # 1,000,000 rows, 10 vs 1,000 parts
    python benchmarks/serve_bench.py --smoke         # 20,000 rows, 10 vs 100 parts (CI)

One synthetic collection (32-bit codes from a real, untrained SSCQ model's codebooks, so the
service can load the snapshot's model and check its codebook checksum) is written as two
snapshot roots holding the SAME rows: split into `--parts` A and B parts. Measured:

- in process: the Searcher (all parts merged into one index) and, as the reference for how
  the pre-partition Searcher grew, a per-part loop (each part searched in turn, then
  `merge_topk`), single-query latency p50/p99 and QPS;
- over HTTP (a local Ray Serve; JSON embedding queries, so no encoder cost): sequential
  latency p50/p99, and QPS with `--concurrency` client threads, for 1 and 2 partitions and
  for A vs B parts; every HTTP answer is checked against the in-process answer;
- memory: bytes a partition holds per served row (codes + ids + id order; accounted by
  structure, and as the RSS growth of loading it in this process) against the bytes of its
  codes + ids, and the resident set of a partition replica;
- results without source reads (`--thumbs`, on by default, off in the smoke run): the same
  rows over source shards on an S3 emulator (moto, in this process), parts carrying labels
  and thumbnail references; QPS of `--concurrency` clients with labels on (/search) and
  with labels + thumbnails (/search, then /thumb of its first result) against a service
  over parts without labels, both deployed at once and measured in alternating rounds
  (`--rounds`, medians); and the source bytes one thumbnail reads (the service's
  X-Source-Bytes-Read) against the shard's footer + one image column chunk.

Writes <out>/serve_bench.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import urllib.request

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist import storage  # noqa: E402
from sscq_dist.indexing import faiss_index as fi  # noqa: E402
from sscq_dist.indexing.formats import (PART_META_SCHEMA, TRAINED_FILE, PartRows, Snapshot, SourceShard,  # noqa: E402
                                        now_iso, open_current, sha256_hex, version_loc, write_current, write_part,
                                        write_snapshot)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 10


def make_model(path: str) -> np.ndarray:
    """An untrained digits-config SSCQ model (32 bits) as a model folder; returns its codebooks."""
    import torch

    from sscq_dist.config import load_config
    from sscq_dist.model import build_model
    from sscq_dist.registry import read_model_dir, write_model_dir

    cfg = load_config(os.path.join(REPO, "configs", "digits.yaml"))
    torch.manual_seed(0)
    if not os.path.exists(os.path.join(path, "config.yaml")):
        write_model_dir(path, build_model(cfg.model, cfg.data.channels).state_dict(), cfg)
    model, _ = read_model_dir(path)
    return model.quantizer.codebooks.detach().cpu().numpy().astype(np.float32)


def rows_block(codebooks: np.ndarray, lo: int, hi: int, seed: int, chunk: int = 1000) -> np.ndarray:
    """Embeddings of rows [lo, hi): generated per fixed chunk of rows, so a row's vector does not
    depend on how the rows are split into parts."""
    out = []
    for c in range(lo // chunk, (hi + chunk - 1) // chunk):
        x, _ = fi.synthetic_embeddings(codebooks, chunk, 0.5, np.random.default_rng([seed, c]))
        a, b = max(lo, c * chunk) - c * chunk, min(hi, (c + 1) * chunk) - c * chunk
        out.append(x[a:b])
    return np.concatenate(out)


def write_root(root_uri: str, codebooks: np.ndarray, rows: int, parts: int, model_dir: str, seed: int = 1,
               sources: list = None) -> None:
    """A snapshot of `rows` synthetic rows in `parts` lean parts (the same rows for any `parts`).

    sources: per part (SourceShard, labels) of real source shards whose rows they are (row
    groups of 1,024 rows); without, parts carry no label and a placeholder source."""
    root = storage.resolve(root_uri)
    if storage.exists(root.join("CURRENT")):
        return
    vloc = version_loc(root, "bench")
    trained_bytes = fi.serialize(fi.build_pq_fastscan(codebooks))
    storage.atomic_write_bytes(vloc.join(TRAINED_FILE), trained_bytes)
    trained = fi.deserialize(trained_bytes)
    ids = bench_ids(rows, seed)
    bounds = np.linspace(0, rows, parts + 1).astype(np.int64)
    entries, t0 = [], time.perf_counter()
    for s in range(parts):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        codes, _ = fi.encode(trained, rows_block(codebooks, lo, hi, seed))
        src, labels = sources[s] if sources else (SourceShard(f"bench/src-{s:05d}.parquet", 1, "b"), [None] * (hi - lo))
        meta = pa.table({"label": labels, "uri": [f"bench://{i}" for i in ids[lo:hi]],
                         "row_group": (np.arange(hi - lo) // 1024).astype(np.int32),
                         "row": (np.arange(hi - lo) % 1024).astype(np.int32)}, schema=PART_META_SCHEMA)
        rec = write_part(vloc, f"part-{s:05d}-{parts:016x}", src, PartRows(ids[lo:hi], codes, None, meta), hi - lo,
                         model_version="bench", codebook_checksum=fi.codebook_checksum(codebooks),
                         index_type="pq_fastscan", coarse_checksum=sha256_hex(trained_bytes))
        entries.append(rec.entry())
    m = codebooks.shape[0]
    snap = Snapshot(generation=1, model_uri=model_dir, model_version="bench", codebook_checksum=fi.codebook_checksum(codebooks),
                    bits=4 * m, M=m, K=16, index_type="pq_fastscan", index_params={},
                    coarse_checksum=sha256_hex(trained_bytes), created_at=now_iso(), previous=None,
                    writer="serve_bench", fence=0, parts=entries)
    write_snapshot(root, snap)
    write_current(root, snap.name)
    print(f"wrote {rows} rows in {parts} parts to {root_uri} in {time.perf_counter() - t0:.0f}s", flush=True)


def bench_ids(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(2 ** 40, size=rows, replace=False).astype(np.int64)


def write_s3_sources(bucket_uri: str, rows: int, parts: int, seed: int = 1) -> list:
    """The bench rows as source shards on the S3 emulator (a small noise PNG each, a label,
    row groups of 1,024 rows as ingest writes them); returns (SourceShard, labels) per part."""
    import io

    from PIL import Image

    from sscq_dist.data.schema import IMAGE_SCHEMA
    from sscq_dist.indexing.plan import stat_source_shard
    from sscq_dist.ingest import table_bytes

    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(256):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    ids = bench_ids(rows, seed)
    bounds = np.linspace(0, rows, parts + 1).astype(np.int64)
    out = []
    for s in range(parts):
        sl = ids[int(bounds[s]):int(bounds[s + 1])]
        labels = [[int(i % 10)] for i in sl]
        t = pa.table({"id": pa.array(sl, pa.int64()), "image": [pngs[int(i % 256)] for i in sl],
                      "uri": [f"bench://{i}" for i in sl], "label": pa.array(labels, pa.list_(pa.int32()))},
                     schema=IMAGE_SCHEMA)
        loc = storage.resolve(f"{bucket_uri}/part-{s:05d}.parquet")
        storage.atomic_write_bytes(loc, table_bytes(t))
        out.append((stat_source_shard(loc), labels))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latency_stats(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "qps_sequential": float(len(a) / (a.sum() / 1000))}


def time_each(fn, queries: np.ndarray) -> tuple[dict, list]:
    fn(queries[0])  # warm
    out, secs = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        secs.append(time.perf_counter() - t0)
    return latency_stats(secs), out


class PerPartLoop:
    """How the Searcher searched before partitions: every part in turn, then merge_topk."""

    def __init__(self, root_uri: str):
        from sscq_dist.serving.partition import load_partition

        root = storage.resolve(root_uri)
        snap = open_current(root)
        self.parts = [load_partition(root, snap, [p]) for p in snap.parts]  # one index per part

    def search(self, q: np.ndarray) -> np.ndarray:
        from sscq_dist.serving.searcher import merge_topk

        res = [p.search(q[None], K) for p in self.parts]
        return merge_topk([r.distances for r in res], [r.ids for r in res], K)[1][0]


def http_json(url: str, emb: np.ndarray) -> list[int]:
    req = urllib.request.Request(url + "search", data=json.dumps({"embedding": emb.tolist(), "k": K}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return [x["id"] for x in json.loads(r.read())["results"]]


def http_results(url: str, emb: np.ndarray) -> list[dict]:
    req = urllib.request.Request(url + "search", data=json.dumps({"embedding": emb.tolist(), "k": K}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["results"]


def http_thumb(url: str, image_id: int) -> tuple[int, int]:
    """(PNG bytes, source bytes the service read for it) of one /thumb request."""
    with urllib.request.urlopen(url + f"thumb/{image_id}", timeout=60) as r:
        return len(r.read()), int(r.headers.get("X-Source-Bytes-Read", "-1"))


def concurrent_qps(url: str, queries: np.ndarray, clients: int, thumbs: bool = False) -> float:
    idx = iter(range(len(queries)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(idx, None)
            if i is None:
                return
            if thumbs:  # what the web page does: the results, then the first one's thumbnail
                http_thumb(url, http_results(url, queries[i])[0]["id"])
            else:
                http_json(url, queries[i])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(queries) / (time.perf_counter() - t0)


def _rss_kb() -> dict:
    """RssAnon (heap: what the process holds) and RssFile (touched pages of mapped files, which
    the kernel can drop and replicas on one host share) from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) * 1024
    return out


def rss_growth_per_row(root_uri: str) -> dict:
    """Resident growth of holding one partition of the whole root in this process, per row.

    Loaded twice, the first copy dropped before the second: the second load's growth is the
    steady cost of holding a partition (the first also pays one-off allocator growth)."""
    from sscq_dist.serving.partition import load_partition

    root = storage.resolve(root_uri)
    snap = open_current(root)
    load_partition(root, snap, snap.parts[:1])  # imports and one-off buffers
    gc.collect()
    before = _rss_kb()
    first = load_partition(root, snap, snap.parts)
    gc.collect()
    after_first = _rss_kb()
    rows = first.ntotal
    acc = first.resident_bytes()
    del first
    gc.collect()
    dropped = _rss_kb()
    second = load_partition(root, snap, snap.parts)
    gc.collect()
    after_second = _rss_kb()
    code = (snap.M + 1) // 2
    return {"rows": rows, "code_bytes_per_row": code, "codes_plus_ids_per_row": code + 8,
            "accounted_per_row": (acc["codes"] + acc["labels"] + acc["ids"] + acc["order"]) / rows,
            "accounted": acc,
            "anon_growth_first_load_per_row": (after_first["RssAnon"] - before["RssAnon"]) / rows,
            "anon_growth_steady_per_row": (after_second["RssAnon"] - dropped["RssAnon"]) / rows,
            "file_pages_per_row": (after_second["RssFile"] - before["RssFile"]) / rows,
            "second_rows": second.ntotal}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--parts", type=int, nargs=2, default=[10, 1000])
    p.add_argument("--queries", type=int, default=2000, help="queries per measurement")
    p.add_argument("--concurrency", type=int, default=8, help="client threads for the QPS runs")
    p.add_argument("--partitions", type=int, nargs="+", default=[1, 2])
    p.add_argument("--work", default=".cache/serve_bench", help="folder for the synthetic roots and the model")
    p.add_argument("--out", default="benchmarks/results/serve")
    p.add_argument("--smoke", action="store_true", help="20,000 rows, 10 vs 100 parts, 200 queries (CI)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the results-without-source-reads QPS")
    p.add_argument("--thumbs", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure labels and thumbnails over source shards on an S3 emulator (local Ray only)")
    a = p.parse_args()
    if a.smoke:
        a.rows, a.parts, a.queries, a.concurrency, a.thumbs = 20_000, [10, 100], 200, 4, False
        a.work = os.path.join(a.out, "work")
    os.makedirs(a.out, exist_ok=True)
    model_dir = os.path.abspath(os.path.join(a.work, "model"))
    codebooks = make_model(model_dir)
    roots = {n: os.path.abspath(os.path.join(a.work, f"rows{a.rows}-parts{n}")) for n in a.parts}
    for n, r in roots.items():
        write_root(r, codebooks, a.rows, n, model_dir)
    queries, _ = fi.synthetic_embeddings(codebooks, a.queries, 0.5, np.random.default_rng(12345))
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time on one thread, as a partition replica searches
    from sscq_dist.serving.searcher import Searcher

    res: dict = {"rows": a.rows, "parts": a.parts, "queries": a.queries, "concurrency": a.concurrency,
                 "cpus": os.cpu_count(), "in_process": {}, "per_part_loop": {}, "http": {}}
    want = {}
    for n, r in roots.items():
        s = Searcher.open(r)
        stats, out = time_each(lambda q, s=s: s.search(q[None], K).ids[0], queries)
        res["in_process"][str(n)] = stats
        want[n] = np.stack(out)
        loop = PerPartLoop(r)
        stats, out = time_each(loop.search, queries)
        res["per_part_loop"][str(n)] = stats
        # The merged index and the per-part loop rank the same rows: equal up to ties at the cut.
        res["per_part_loop"][str(n)]["top1_agreement"] = float((np.stack(out)[:, 0] == want[n][:, 0]).mean())
        del s, loop
        gc.collect()
        print(f"in process, {n} parts: merged {res['in_process'][str(n)]['p50_ms']:.2f} ms p50, "
              f"per-part loop {res['per_part_loop'][str(n)]['p50_ms']:.2f} ms p50", flush=True)
    assert all(np.array_equal(want[a.parts[0]], want[n]) for n in a.parts), "answers differ between splits"
    res["memory"] = rss_growth_per_row(roots[a.parts[0]])
    print(f"memory: {json.dumps(res['memory'])}", flush=True)

    import ray
    from ray import serve

    from sscq_dist.config import load_config
    from sscq_dist.serving.app import start_local

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_setup as bs

    if a.thumbs:  # before Ray starts: its workers inherit the emulator's endpoint
        emulator = S3Emulator()
        src_bucket = f"s3://bench-src-{os.getpid()}"
        storage.s3fs_filesystem().call_s3("create_bucket", Bucket=src_bucket[5:])
        roots["labels"] = os.path.abspath(os.path.join(a.work, f"rows{a.rows}-parts{a.parts[0]}-labels-{os.getpid()}"))
        write_root(roots["labels"], codebooks, a.rows, a.parts[0], model_dir,
                   sources=write_s3_sources(src_bucket, a.rows, a.parts[0]))
    for attempt in range(3):  # a busy machine can miss Ray's node start-up deadline; try again
        try:
            bs.start_ray(max(4, os.cpu_count() or 1), quiet=True)  # or joins the cluster RAY_ADDRESS names
            break
        except Exception as exc:
            if attempt == 2:
                raise
            print(f"ray.init failed ({str(exc).splitlines()[0][:120]}); retrying", flush=True)
            ray.shutdown()
            time.sleep(10)
    port = free_port()
    configs = [(pp, n) for pp in a.partitions for n in a.parts]
    if a.smoke:  # two deployments cover 1 and 2 partitions and both splits
        configs = [(a.partitions[0], a.parts[0]), (a.partitions[-1], a.parts[1])]
    try:
        for pp, n in configs:
            cfg = load_config(os.path.join(REPO, "configs", "digits.yaml"), [f"serve.partitions={pp}", *serve_overrides(a)])
            t0 = time.perf_counter()
            url = start_local(roots[n], cfg, port=port, host="127.0.0.1", name=f"bench-p{pp}-n{n}",
                              route_prefix=f"/p{pp}n{n}")
            started = time.perf_counter() - t0
            stats, out = time_each(lambda q: http_json(url, q), queries)
            got = np.asarray(out)
            same = float((got == want[n]).all(axis=1).mean())
            stats.update(qps_concurrent=concurrent_qps(url, queries, a.concurrency), identical_to_in_process=same,
                         start_s=started)
            mem = serve.get_deployment_handle("Partition0", app_name=f"bench-p{pp}-n{n}").memory.remote(
                open_current(storage.resolve(roots[n])).name).result(timeout_s=60)
            stats["partition0_replica"] = {"rows": mem["rows"], "rss_bytes": mem["rss"],
                                           "accounted_per_row": (mem["codes"] + mem["labels"] + mem["ids"]
                                                                 + mem["order"]) / max(1, mem["rows"])}
            res["http"][f"p{pp}/n{n}"] = stats
            print(f"HTTP, {pp} partition(s), {n} parts: {stats['p50_ms']:.2f} ms p50, {stats['p99_ms']:.2f} ms p99, "
                  f"{stats['qps_concurrent']:.0f} QPS at {a.concurrency} clients, identical answers {same:.3f}",
                  flush=True)
            serve.delete(f"bench-p{pp}-n{n}")
        if a.thumbs:
            res["results"] = results_run(a, roots, queries, port)
    finally:
        serve.shutdown()
        ray.shutdown()
        if a.thumbs:
            emulator.stop()
    small, big = str(a.parts[0]), str(a.parts[1])
    res["ratios"] = {
        "in_process_latency_big_vs_small": res["in_process"][big]["p50_ms"] / res["in_process"][small]["p50_ms"],
        "per_part_loop_latency_big_vs_small": res["per_part_loop"][big]["p50_ms"] / res["per_part_loop"][small]["p50_ms"],
    }
    for pp in a.partitions:
        if f"p{pp}/n{small}" in res["http"] and f"p{pp}/n{big}" in res["http"]:
            res["ratios"][f"http_p{pp}_latency_big_vs_small"] = (res["http"][f"p{pp}/n{big}"]["p50_ms"]
                                                                 / res["http"][f"p{pp}/n{small}"]["p50_ms"])
    with open(os.path.join(a.out, "serve_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    return 0


class S3Emulator:
    """moto's S3 server on 127.0.0.1 in its own process (not competing with the client threads
    for this process's GIL), with this process's env pointing at it."""

    def __init__(self):
        import subprocess

        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the S3 emulator did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def serve_overrides(a) -> list:
    """Settings every benchmarked service shares."""
    return ["serve.partition_cpus=0.5", "serve.ingress_cpus=0.5", "serve.watch_interval_s=60",
            "serve.graceful_shutdown_wait_loop_s=0.5",
            # All clients share one loopback address: the per-client rate limit would measure itself.
            "serve.rate_limit_per_s=100000", "serve.rate_limit_burst=100000",
            f"serve.cache_dir={os.path.abspath(os.path.join(a.work, 'cache'))}"]


def results_run(a, roots: dict, queries: np.ndarray, port: int) -> dict:
    """QPS of `a.concurrency` clients: parts without labels vs with labels and thumbnail
    references (/search) vs the web page's pattern (/search, then /thumb of the first result);
    source bytes one thumbnail reads. Both services run side by side and the three loads take
    turns for `a.rounds` rounds (medians reported): a shared machine's drift hits all alike."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from ray import serve

    from sscq_dist.config import load_config
    from sscq_dist.serving.app import start_local

    cfg = load_config(os.path.join(REPO, "configs", "digits.yaml"), ["serve.partitions=1", *serve_overrides(a)])
    urls = {key: start_local(root, cfg, port=port, host="127.0.0.1", name=f"bench-{key}", route_prefix=f"/{key}")
            for key, root in (("off", roots[a.parts[0]]), ("on", roots["labels"]))}
    out: dict = {}
    try:
        for url in urls.values():
            http_results(url, queries[0])  # warm
        first = http_results(urls["on"], queries[1])
        assert all(r["label"] is not None for r in first), first  # labels come from the parts
        assert all(r["label"] is None for r in http_results(urls["off"], queries[1]))
        snap = open_current(storage.resolve(roots["labels"]))
        reads = []
        for j, entry in enumerate(snap.parts[:5]):  # one uncached thumbnail per source shard
            loc = storage.resolve(entry.source.uri)
            with loc.fs.open_input_file(loc.path) as fh:
                size = fh.size()
                footer = int.from_bytes(fh.read_at(8, size - 8)[:4], "little") + 8
                md = pq.ParquetFile(fh).metadata
            g = min(j, md.num_row_groups - 1)
            image = md.row_group(g).column(md.schema.names.index("image"))
            ids = pq.read_table(os.path.join(roots["labels"], "models", "bench", entry.index_file),
                                columns=["id", "row_group"])
            iid = int(ids.filter(pc.equal(ids.column("row_group"), g)).column("id")[0].as_py())
            _, read = http_thumb(urls["on"], iid)
            reads.append({"shard_bytes": size, "read": read, "footer": footer, "image_chunk": image.total_compressed_size})
        out["thumb_reads"] = reads
        runs: dict[str, list[float]] = {"off": [], "on": [], "thumb": []}
        for r in range(a.rounds):
            runs["off"].append(concurrent_qps(urls["off"], queries, a.concurrency))
            runs["on"].append(concurrent_qps(urls["on"], queries, a.concurrency))
            runs["thumb"].append(concurrent_qps(urls["on"], queries, a.concurrency, thumbs=True))
            print(f"results round {r + 1}/{a.rounds}: QPS off {runs['off'][-1]:.0f}, labels {runs['on'][-1]:.0f}, "
                  f"labels + thumbnail {runs['thumb'][-1]:.0f}", flush=True)
    finally:
        for key in urls:
            serve.delete(f"bench-{key}")
    out["rounds"] = runs
    out["qps_search_labels_off"] = float(np.median(runs["off"]))
    out["qps_search_labels_on"] = float(np.median(runs["on"]))
    out["qps_search_and_thumb_on"] = float(np.median(runs["thumb"]))
    out["ratio_labels_on_vs_off"] = out["qps_search_labels_on"] / out["qps_search_labels_off"]
    out["ratio_labels_and_thumbs_vs_off"] = out["qps_search_and_thumb_on"] / out["qps_search_labels_off"]
    # The web page's pattern is two requests per query: requests/s against /search alone.
    out["ratio_thumb_requests_vs_off"] = 2 * out["qps_search_and_thumb_on"] / out["qps_search_labels_off"]
    print(f"results: {json.dumps(out)}", flush=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"rows {res['rows']}, {res['queries']} queries, k={K}, {res['cpus']} CPUs", "",
             "| path | partitions | parts | p50 ms | p99 ms | QPS (1 client) | QPS (concurrent) | same ids as in-process |",
             "|---|---|---|---|---|---|---|---|"]
    for n, s in res["in_process"].items():
        lines.append(f"| in-process Searcher (merged) | 1 | {n} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{s['qps_sequential']:.0f} | - | - |")
    for n, s in res["per_part_loop"].items():
        lines.append(f"| per-part loop (Searcher before) | 1 | {n} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{s['qps_sequential']:.0f} | - | top-1 {s['top1_agreement']:.3f} |")
    for key, s in res["http"].items():
        pp, n = key.split("/")
        lines.append(f"| HTTP service | {pp[1:]} | {n[1:]} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{s['qps_sequential']:.0f} | {s['qps_concurrent']:.0f} | {s['identical_to_in_process']:.3f} |")
    m = res["memory"]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in res["ratios"].items()]
    if res.get("results"):
        r = res["results"]
        lines += ["", f"Results without source reads ({res['concurrency']} clients, source shards on the S3 emulator):",
                  "", "| run | QPS | vs no labels |", "|---|---:|---:|",
                  f"| /search, parts without labels | {r['qps_search_labels_off']:.0f} | 1.00 |",
                  f"| /search, labels from the parts | {r['qps_search_labels_on']:.0f} | "
                  f"{r['ratio_labels_on_vs_off']:.2f} |",
                  f"| /search + /thumb of the first result (2 requests per query) | "
                  f"{r['qps_search_and_thumb_on']:.0f} | {r['ratio_labels_and_thumbs_vs_off']:.2f} "
                  f"({r['ratio_thumb_requests_vs_off']:.2f} in requests/s) |", "",
                  "One uncached thumbnail, source bytes read (service's X-Source-Bytes-Read) vs the shard's footer "
                  "+ one image column chunk: " + "; ".join(
                      f"{t['read']:,} = {t['footer']:,} + {t['image_chunk']:,} of {t['shard_bytes']:,}"
                      if t["read"] == t["footer"] + t["image_chunk"] else
                      f"{t['read']:,} (footer cached: chunk {t['image_chunk']:,}) of {t['shard_bytes']:,}"
                      for t in r["thumb_reads"])]
    lines += ["", f"memory per served row: accounted {m['accounted_per_row']:.2f} B; heap (RssAnon) growth "
                  f"{m['anon_growth_steady_per_row']:.2f} B steady, {m['anon_growth_first_load_per_row']:.2f} B first "
                  f"load; mapped id-map pages touched {m['file_pages_per_row']:.2f} B; vs codes + ids "
                  f"{m['codes_plus_ids_per_row']} B (code {m['code_bytes_per_row']} B + id 8 B)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
