"""Index benchmark: build time, bytes/vector, QPS and recall of the served fast-scan indices.

Synthetic embeddings are drawn around random codebooks (a uniform random code per
subspace plus Gaussian noise), so the learned-codebook path is exercised exactly as in
production: codebooks copied into the PQ, no PQ training. Recall@k is measured against
exhaustive float ADC (`IndexPQ`) over the very codes the served index stores.

    python benchmarks/index_bench.py                         # N = 100k and 1M
    python benchmarks/index_bench.py --sizes 20000 --queries 200   # smoke
    python benchmarks/index_bench.py --sizes 100000 1000000 10000000

Prints one markdown table (one row per index and nprobe).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sscq_dist.indexing import faiss_index as fi  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="database sizes N")
    p.add_argument("--queries", type=int, default=1000, help="number of queries Q")
    p.add_argument("--bits", type=int, default=32, help="code length; M = bits / 4")
    p.add_argument("--codeword-dim", type=int, default=16, help="d, dimensions per subspace")
    p.add_argument("--noise", type=float, default=0.5, help="std of the Gaussian noise around codewords")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 160, 256, 512])
    p.add_argument("--nlist", type=int, default=0, help="IVF lists; 0 = round(4 * sqrt(N))")
    p.add_argument("--train-per-list", type=int, default=64,
                   help="IVF k-means sample = min(N, train-per-list * nlist) rows, drawn uniformly")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="QPS = best of this many timed runs")
    p.add_argument("--batch", type=int, default=100_000, help="rows generated and added per batch")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def generate(codebooks: np.ndarray, n: int, noise: float, batch: int, seed: int):
    """Yield (embeddings (b, D), ids (b,)) batches; ids are a shuffled sparse range."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x, _ = fi.synthetic_embeddings(codebooks, b, noise, rng)
        yield x, (np.arange(start, start + b, dtype=np.int64) * 3 + 1)


def bench_size(args, n: int) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    m = args.bits // 4
    codebooks = rng.standard_normal((m, 16, args.codeword_dim)).astype(np.float32)
    queries, _ = fi.synthetic_embeddings(codebooks, args.queries, args.noise, np.random.default_rng(args.seed + 1))
    kmax = 100
    rows = []

    # Exhaustive fast-scan (PQFastScan): no training at all.
    t0 = time.perf_counter()
    pqfs = fi.build_pq_fastscan(codebooks)
    for x, ids in generate(codebooks, n, args.noise, args.batch, args.seed + 2):
        fi.add(pqfs, x, ids)
    build_pq = time.perf_counter() - t0
    stored_ids, stored_codes = fi.index_codes(pqfs)
    reference = fi.exhaustive_adc(codebooks, stored_codes, stored_ids)
    del stored_ids, stored_codes
    _, ref_ids = reference.search(queries, kmax)
    qps_ref = fi.measure_qps(reference, queries, 10, 1)
    rows.append(_row(n, "IndexPQ (exhaustive ADC, reference)", "-", float("nan"), len(fi.serialize(reference)),
                     qps_ref, ref_ids, ref_ids))
    del reference
    _, found = pqfs.search(queries, kmax)
    rows.append(_row(n, "PQFastScan", "-", build_pq, len(fi.serialize(pqfs)),
                     fi.measure_qps(pqfs, queries, 10, args.repeats), found, ref_ids))
    del pqfs

    # IVF fast-scan: coarse k-means on a uniform sample, then add.
    nlist = args.nlist or max(1, int(round(4 * math.sqrt(n))))
    t0 = time.perf_counter()
    sampler = fi.ReservoirSampler(min(n, args.train_per_list * nlist), seed=args.seed)
    for x, _ in generate(codebooks, n, args.noise, args.batch, args.seed + 2):
        sampler.add(x)
    ivf = fi.build_ivf_pq_fastscan(codebooks, sampler.sample(), nlist, args.nprobe[0], args.seed, args.kmeans_iters)
    del sampler
    for x, ids in generate(codebooks, n, args.noise, args.batch, args.seed + 2):
        fi.add(ivf, x, ids)
    build_ivf = time.perf_counter() - t0
    size_ivf = len(fi.serialize(ivf))
    for nprobe in args.nprobe:
        if nprobe > nlist:
            continue
        fi.set_nprobe(ivf, nprobe)
        _, found = ivf.search(queries, kmax)
        rows.append(_row(n, f"IVF{nlist},PQ{m}x4fs", str(nprobe), build_ivf, size_ivf,
                         fi.measure_qps(ivf, queries, 10, args.repeats), found, ref_ids))
    return rows


def _row(n, name, nprobe, build_s, nbytes, qps, found, ref) -> dict:
    return {"N": n, "index": name, "nprobe": nprobe, "build_s": build_s, "bytes_per_vec": nbytes / n,
            "qps": qps, "r1": fi.recall_at(found, ref, 1), "r10": fi.recall_at(found, ref, 10),
            "r100": fi.recall_at(found, ref, 100)}


def markdown(rows: list[dict]) -> str:
    head = "| N | index | nprobe | build s | bytes/vec | QPS (k=10) | R@1 | R@10 | R@100 |\n" \
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        build = "-" if math.isnan(r["build_s"]) else f"{r['build_s']:.1f}"
        lines.append(f"| {r['N']:,} | {r['index']} | {r['nprobe']} | {build} | {r['bytes_per_vec']:.1f} | "
                     f"{r['qps']:,.0f} | {r['r1']:.3f} | {r['r10']:.3f} | {r['r100']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import faiss

    rows = []
    for n in args.sizes:
        rows.extend(bench_size(args, n))
    print(f"bits={args.bits} (M={args.bits // 4}, d={args.codeword_dim}), noise={args.noise}, "
          f"queries={args.queries}, faiss {faiss.__version__}, threads={faiss.omp_get_max_threads()}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
