"""Speed of the evaluation protocol: `evaluate_pq` (both distances) on random data.

Default sizes are the Fashion-MNIST protocol (10,000 queries x 60,000 database items,
32 bits = 8 subspaces of 16 codewords, mAP@1000). Prints wall seconds and peak RSS.

    python benchmarks/eval_speed.py
    python benchmarks/eval_speed.py --queries 50 --database 400 --bits 16 --topk 20   # smoke
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from sscq_dist.evaluation import evaluate_pq

# Per-subspace codeword dimension d and codewords K (SPEC section 4).
CODEWORD_DIM = 16
NUM_CODEWORDS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--database", type=int, default=60_000)
    p.add_argument("--bits", type=int, default=32, help="code length; M = bits / 4")
    p.add_argument("--topk", type=int, default=1000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--chunk", type=int, default=512, help="queries per block")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_data(args: argparse.Namespace) -> dict:
    """Random queries, codes, codebooks and single labels of the requested sizes."""
    rng = np.random.default_rng(args.seed)
    m = args.bits // 4
    return {
        "query_f": rng.standard_normal((args.queries, m * CODEWORD_DIM), dtype=np.float32),
        "query_labels": rng.integers(0, args.classes, args.queries),
        "db_codes": rng.integers(0, NUM_CODEWORDS, (args.database, m)).astype(np.uint8),
        "db_labels": rng.integers(0, args.classes, args.database),
        "codebooks": rng.standard_normal((m, NUM_CODEWORDS, CODEWORD_DIM), dtype=np.float32),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bits < 4 or args.bits % 4:
        print(f"--bits must be a positive multiple of 4, got {args.bits}", file=sys.stderr)
        return 2
    data = make_data(args)
    start = time.perf_counter()
    result = evaluate_pq(topk=args.topk, chunk=args.chunk, **data)
    seconds = time.perf_counter() - start
    # ru_maxrss is KiB on Linux.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"evaluate_pq queries={args.queries} database={args.database} bits={args.bits} "
        f"topk={args.topk}: {seconds:.2f} s, peak RSS {peak_mib:.0f} MiB, "
        f"map_sql2={result['map_sql2']:.4f} map_l2sum={result['map_l2sum']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
