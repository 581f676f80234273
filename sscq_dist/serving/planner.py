"""Assign a snapshot's parts to P partitions, stably (SPEC section 7).

Rendezvous (highest-random-weight) hashing on the part name: part x goes to the partition p
with the largest score h(x, p). A part's place depends on its own name and P only, never on
the other parts, so

- appending, replacing or removing parts moves no other part (a serving partition keeps,
  and need not reload, every part it held);
- going from P to P + 1 partitions moves exactly the parts whose score for the new partition
  beats their old maximum: 1 / (P + 1) of them in expectation, and none between old partitions;
- every replica of every partition computes the same plan from the same snapshot (the hash
  is keyed, stable blake2b, never Python's salted `hash`).

Balance is statistical: with N parts of similar size a partition holds N / P parts within a
few sqrt(N / P) (parts are one per source shard, so similar in size at scale). Small
indices are less even than a greedy byte-balanced plan; they are also small.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sscq_dist.indexing.formats import PartEntry

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _name_keys(names: list[str]) -> np.ndarray:
    """(N,) uint64: a stable 64-bit key of each part name."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little")
                        for n in names), dtype=np.uint64, count=len(names))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed uint64 -> uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def assign_partitions(names: list[str], num_partitions: int) -> np.ndarray:
    """Part names -> (N,) int64 partition numbers in [0, num_partitions) by rendezvous hashing.

    Score of (part, p) = mix(key(part) + (p + 1) * golden ratio): partition p's scores do not
    depend on P, which is what bounds the moves when P grows.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    keys = _name_keys(names)
    best = np.zeros(len(names), np.int64)
    best_score = np.zeros(len(names), np.uint64)
    with np.errstate(over="ignore"):
        for p in range(num_partitions):
            score = _mix(keys + np.uint64(p + 1) * _GOLDEN)
            take = (score > best_score) | (p == 0)
            best = np.where(take, p, best)
            best_score = np.where(take, score, best_score)
    return best


def plan_partitions(parts: list[PartEntry], num_partitions: int) -> list[list[PartEntry]]:
    """parts -> num_partitions lists of parts (each sorted by part name; some may be empty)."""
    where = assign_partitions([e.part for e in parts], num_partitions)
    out: list[list[PartEntry]] = [[] for _ in range(num_partitions)]
    for part, p in zip(parts, where.tolist()):
        out[p].append(part)
    return [sorted(ps, key=lambda e: e.part) for ps in out]


def partition_bytes(plan: list[list[PartEntry]]) -> list[int]:
    """Index bytes per partition (for logs and /healthz)."""
    return [sum(int(e.index_bytes) for e in ps) for ps in plan]


def plan_moves(names: list[str], before: int, after: int, appended: int = 0) -> dict:
    """Simulate a plan change: the first len(names) - appended names were planned over `before`
    partitions, all of them are planned over `after`. Returns how many of the existing parts
    moved, their fraction, and the largest partition's part count over the mean (balance)."""
    old = assign_partitions(names[:len(names) - appended], before)
    new = assign_partitions(names, after)
    moved = int(np.count_nonzero(old != new[:len(old)]))
    counts = np.bincount(new, minlength=after)
    return {"parts": len(names), "before": before, "after": after, "appended": appended, "moved": moved,
            "moved_fraction": moved / max(1, len(old)), "max_over_mean": float(counts.max() / counts.mean())}
