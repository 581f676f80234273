"""A rank's rows of the cached training set, one epoch at a time, straight from its blocks.

The cached path decodes a small training set once into the object store. Handing that
dataset to Ray Train would split it again every epoch through Ray Data's streaming split: a
coordinator actor per run (a worker process, ~2 CPU-s to start, ~3.5 s of a run's wall on
2 cores) and an executor per epoch on every rank, only to deal out blocks that are already
in memory. Here the driver passes the block references and row counts instead, and every
rank computes the same epoch order itself:

- epoch e lays the blocks out in a permutation seeded by (seed, e), so every epoch deals
  each rank a different part of the set;
- rank r takes rows [r * m, (r + 1) * m) of that layout, m = rows // world (equal counts,
  so the all-gathers of a step line up; the < world leftover rows wait for the next epoch);
- its rows are shuffled by (seed, e, r) and cut into batches.

The order of an epoch is a function of (seed, epoch, rank, world), so a run resumed at step k
of an epoch skips exactly the k batches its ranks had trained on and sees the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np


@dataclass(frozen=True)
class CachedBlocks:
    """The decoded blocks of a materialised training set: refs[i] holds rows[i] rows."""

    refs: tuple
    rows: tuple
    seed: int

    @property
    def total_rows(self) -> int:
        return int(sum(self.rows))


def cached_blocks(ds: "ray.data.MaterializedDataset", seed: int) -> Optional[CachedBlocks]:  # noqa: F821
    """The block refs and row counts of a materialised dataset (from its block metadata: no
    block is read), or None when a block is only partly in the dataset (a slice), which
    the caller then hands to Ray Train as a dataset."""
    refs, rows = [], []
    for bundle in ds.iter_internal_ref_bundles():
        if any(s is not None for s in (bundle.slices or ())):
            return None
        for entry in bundle.blocks:
            if entry.metadata.num_rows is None:
                return None
            refs.append(entry.ref)
            rows.append(int(entry.metadata.num_rows))
    return CachedBlocks(tuple(refs), tuple(rows), int(seed))


def epoch_rows(rows: tuple, seed: int, epoch: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """(block index, row in block) of rank's rows in epoch, in training order (see the module doc)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(rows))
    ends = np.cumsum(rows[order])
    starts = ends - rows[order]
    m = int(ends[-1]) // world if len(rows) else 0
    lo, hi = rank * m, (rank + 1) * m
    blocks, offsets = [], []
    for b, s, e in zip(order, starts, ends):
        a, z = max(lo, s), min(hi, e)
        if a < z:
            blocks.append(np.full(z - a, b, dtype=np.int64))
            offsets.append(np.arange(a - s, z - s, dtype=np.int64))
    if not blocks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    blk, off = np.concatenate(blocks), np.concatenate(offsets)
    mix = np.random.default_rng([seed, epoch, rank + 1]).permutation(len(blk))
    return blk[mix], off[mix]


def epoch_batches(cache: CachedBlocks, epoch: int, rank: int, world: int, batch_size: int,
                  skip_batches: int = 0) -> Iterator[dict]:
    """Rank's full batches of epoch as numpy columns (id, ok, shard, image), from batch
    `skip_batches` on. The blocks it needs are fetched once per epoch (zero-copy on the
    node that holds them) and released when the epoch's iterator is."""
    import ray
    from ray.data.block import BlockAccessor

    blk, off = epoch_rows(cache.rows, cache.seed, epoch, rank, world)
    n_batches = len(blk) // batch_size
    if skip_batches >= n_batches:
        return
    needed = sorted(set(blk[skip_batches * batch_size:n_batches * batch_size].tolist()))
    got = ray.get([cache.refs[b] for b in needed])
    cols = {b: BlockAccessor.for_block(t).to_numpy() for b, t in zip(needed, got)}
    for i in range(skip_batches, n_batches):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        b_idx, r_idx = blk[sl], off[sl]
        parts = [(b, r_idx[b_idx == b]) for b in np.unique(b_idx)]  # one take per block it touches
        yield {k: np.concatenate([cols[b][k][r] for b, r in parts]) for k in ("id", "ok", "shard", "image")}
