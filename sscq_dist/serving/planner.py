"""Assign a snapshot's parts to P partitions, balanced by bytes (SPEC section 7).

A partition's memory and its per-query scan time both grow with the bytes of its codes,
so balancing `index_bytes` balances both. Greedy largest-first (LPT): each part, biggest
first, goes to the partition holding the fewest bytes so far; the result is within 4/3 of
the optimal maximum and deterministic (ties broken by part name, then partition number),
so every replica of every partition computes the same plan from the same snapshot.
"""

from __future__ import annotations

import heapq

from sscq_dist.indexing.formats import PartEntry


def plan_partitions(parts: list[PartEntry], num_partitions: int) -> list[list[PartEntry]]:
    """parts -> num_partitions lists of parts (each sorted by part name; some may be empty)."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    heap = [(0, p) for p in range(num_partitions)]  # (bytes so far, partition number)
    out: list[list[PartEntry]] = [[] for _ in range(num_partitions)]
    for part in sorted(parts, key=lambda e: (-int(e.index_bytes), e.part)):
        load, p = heapq.heappop(heap)
        out[p].append(part)
        heapq.heappush(heap, (load + int(part.index_bytes), p))
    return [sorted(ps, key=lambda e: e.part) for ps in out]


def partition_bytes(plan: list[list[PartEntry]]) -> list[int]:
    """Index bytes per partition (for logs and /healthz)."""
    return [sum(int(e.index_bytes) for e in ps) for ps in plan]
