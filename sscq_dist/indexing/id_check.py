"""Ids are unique over an index version: an O(N) distributed check, never pairwise id-map reads.

Two parts can share an id only if their [id_min, id_max] ranges overlap. The driver sorts the
parts' ranges (O(S log S) over the records it already holds) into overlapping groups; groups
with a part new in this run are checked by one partitioned hash join on Ray tasks: map tasks
read the parts' id columns (each file once), hash-partition (id, part) by id into buckets, and one
reduce task per bucket sorts its ids and counts the repeats. The driver receives per bucket a
count and at most MAX_EXAMPLES examples, never the ids. Sequential ids (ingest's) give
disjoint ranges and cost no reads at all; hash ids overlap everywhere and cost one pass over
the parts' id columns (8 bytes per id, on the workers).
"""

from __future__ import annotations

import math
import numpy as np

from sscq_dist.config import StorageConfig
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.formats import PartEntry, parse_part_ids
from sscq_dist.storage import Location, read_bytes, resolve

IDS_PER_BUCKET = 2_000_000  # ~16 MB of ids per reduce task
MAX_MAP_TASKS = 1024
MAX_EXAMPLES = 20  # duplicate examples the driver receives, whatever the number of duplicates


def overlapping_groups(parts: list[PartEntry], new: set[str]) -> list[list[PartEntry]]:
    """Groups of parts whose id ranges overlap (transitively) and that hold a part in `new`."""
    ents = sorted((p for p in parts if p.indexed), key=lambda p: p.id_min)
    groups, cur, hi = [], [], None
    for p in ents:
        if cur and p.id_min > hi:
            groups.append(cur)
            cur = []
        hi = p.id_max if not cur else max(hi, p.id_max)
        cur.append(p)
    if cur:
        groups.append(cur)
    return [g for g in groups if len(g) > 1 and any(p.part in new for p in g)]


def _map_ids(files: list, buckets: int, storage_cfg: dict) -> list:
    """Read part files' ids [(uri, part number)], hash-partition (ids, part numbers) into `buckets` buckets."""
    ids, nums = [], []
    for uri, num in files:
        col = parse_part_ids(read_bytes(resolve(uri, StorageConfig(**storage_cfg))), uri)
        ids.append(col)
        nums.append(np.full(len(col), num, np.int32))
    i, n = np.concatenate(ids), np.concatenate(nums)
    b = (i.view(np.uint64) % np.uint64(buckets)).astype(np.int64)
    order = np.argsort(b, kind="stable")
    cuts = np.searchsorted(b[order], np.arange(1, buckets))
    out = list(zip(np.split(i[order], cuts), np.split(n[order], cuts)))
    return out if buckets > 1 else out[0]


def _count_repeats(*chunks) -> tuple[int, list[tuple[int, int, int]]]:
    """One bucket's (ids, part numbers) chunks -> (ids held by more than one row, up to MAX_EXAMPLES
    examples (id, part, other part))."""
    ids = np.concatenate([c[0] for c in chunks])
    nums = np.concatenate([c[1] for c in chunks])
    order = np.argsort(ids, kind="stable")
    s, p = ids[order], nums[order]
    hit = np.nonzero(s[1:] == s[:-1])[0]
    if len(hit) == 0:
        return 0, []
    dup_ids = np.unique(s[hit])
    return int(len(dup_ids)), [(int(s[j]), int(p[j]), int(p[j + 1])) for j in hit[:MAX_EXAMPLES]]


def find_duplicates(vloc: Location, parts: list[PartEntry],
                    storage_cfg: StorageConfig) -> tuple[int, list[tuple[int, PartEntry, PartEntry]]]:
    """(number of ids shared by two rows, up to MAX_EXAMPLES (id, part, other part)); one distributed pass."""
    import ray

    if len(parts) < 2:
        return 0, []
    files = [(vloc.join(p.index_file).uri, i) for i, p in enumerate(parts)]
    buckets = max(1, math.ceil(sum(p.indexed for p in parts) / IDS_PER_BUCKET))
    mappers = min(len(files), MAX_MAP_TASKS, 4 * max(1, int(ray.cluster_resources().get("CPU", 1))))
    map_task = ray.remote(_map_ids).options(num_returns=buckets, num_cpus=1)
    reduce_task = ray.remote(_count_repeats).options(num_cpus=1)
    outs = [map_task.remote(files[m::mappers], buckets, storage_cfg.__dict__) for m in range(mappers)]
    outs = [o if isinstance(o, list) else [o] for o in outs]
    total, examples = 0, []
    for count, found in ray.get([reduce_task.remote(*[o[k] for o in outs]) for k in range(buckets)]):
        total += count
        examples += [(i, parts[a], parts[b]) for i, a, b in found][:MAX_EXAMPLES - len(examples)]
    return total, examples


def check_unique_ids(vloc: Location, parts: list[PartEntry], new: set[str], storage_cfg: StorageConfig) -> int:
    """Raise one error line naming an id, both shards and the count if parts share ids; returns ids checked."""
    groups = overlapping_groups(parts, new)
    checked = [p for g in groups for p in g]
    count, examples = find_duplicates(vloc, checked, storage_cfg)
    if count:
        i, a, b = examples[0]
        more = f" ({count} ids are held twice; e.g. also {', '.join(str(e[0]) for e in examples[1:4])})" \
            if count > 1 else ""
        raise IndexError_(f"id {i} is in both {a.source.uri} and {b.source.uri}{more}; ids must be unique over the "
                          "collection (fix the source shards, then rerun the reindex)")
    return sum(p.indexed for p in checked)
