"""A partition: a share of a snapshot's parts merged into ONE in-memory fast-scan index.

Per-query cost must not grow with the number of parts (SPEC section 7). A part is lean: its
file holds per row the id, the packed PQ code (and for IVF the list number) and the row
metadata, never a codebook or a quantizer. A partition loads the version's ONE trained
empty index (`trained.index`) once and copies the parts' codes into it, exactly and
without re-encoding (as FAISS's `contrib/ondisk.py` merges shards' lists into one trained
index):

- exhaustive (`IndexIDMap(IndexPQFastScan)`): every part's flat codes are packed into one
  block table with the index's own `CodePacker` (`ntotal2` set as FAISS's `add` sets it),
  the ids into the one id map;
- IVF (`IndexIVFPQFastScan`): each inverted list gets the entries of that list from every
  part, packed once per list (`add_entries` on an empty list copies whole blocks). FAISS's
  own `merge_ondisk` is avoided: it refuses fast-scan lists (faiss issue 2407).

Positions: a partition numbers its rows part by part in file order, so position p is row
`p - offsets[j]` of part j. The lookups kept per row are the ids by position (for the
exhaustive index: a view of FAISS's own id map, no copy) and the positions sorted by id
(uint32 below 2^32 rows), so an id is located by binary search. Row metadata (label, uri,
thumbnail reference) is not held in the heap: each part's becomes a local Arrow IPC file
that is memory-mapped, read only for the rows a query returns. Results never read the
source bucket.

Results are canonical: the k smallest (distance, id) pairs, ties broken by id, whatever the
partitioning. FAISS breaks ties arbitrarily, so a search whose k-th distance is tied with
the last fetched one fetches more until the tie is resolved; with that, P partitions merged
by `merge_topk` answer exactly what one partition answers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.formats import PART_META_SCHEMA, PartEntry, PartRows, Snapshot, parse_part, version_loc
from sscq_dist.indexing.trained import read_trained_index
from sscq_dist.storage import Location

log = logging.getLogger(__name__)

LOOKUP_SUFFIX = ".lookup.arrow"
# The memory-mapped row metadata: the part file's meta columns, uri as large_string (64-bit offsets).
_LOOKUP_SCHEMA = pa.schema([pa.field("uri", pa.large_string()) if f.name == "uri" else f for f in PART_META_SCHEMA])


# --------------------------------------------------------------------------- part files


def cached_bytes(remote: Location, cache_dir: Optional[str], version: str, name: str,
                 size: int) -> tuple[Optional[str], Optional[bytes]]:
    """Return (local path, None) when cached (or now cached), or (None, bytes) without a cache.

    The cache key is version/size-name: a new version or a rewritten file of another
    size never hits an old entry. A cached file of the wrong size is fetched again.
    """
    if cache_dir is None:
        data = storage.read_bytes(remote)
        _check_size(remote, data, size)
        return None, data
    local_dir = os.path.join(cache_dir, version)
    local = os.path.join(local_dir, f"{size}-{name.replace('/', '_')}")
    if os.path.isfile(local) and os.path.getsize(local) == size:
        return local, None
    data = storage.read_bytes(remote)
    _check_size(remote, data, size)
    _atomic_local_write(local, data)
    return local, None


def _atomic_local_write(path: str, data: bytes) -> None:
    # Write next to the target and rename: a killed download never leaves a cache hit.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_size(remote: Location, data: bytes, size: int) -> None:
    if len(data) != size:
        raise IndexError_(f"{remote.uri} is {len(data)} bytes but the snapshot says {size}; "
                          "the index is inconsistent (a part rewritten after its snapshot?)")


def load_part(root: Location, snap: Snapshot, entry: PartEntry, cache_dir: Optional[str] = None) -> PartRows:
    """One part's rows: ids, packed codes ([lists] for IVF) and row metadata, in file order.

    Reads the part file named by the snapshot entry (through the local cache when given),
    checks its size and row count against the entry. The seam incremental loads build on.
    """
    remote = version_loc(root, snap.model_version).join(entry.index_file)
    path, data = cached_bytes(remote, cache_dir, snap.model_version, entry.index_file, entry.index_bytes)
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
    rows = parse_part(data, remote.uri, ivf=snap.index_type == "ivf_pq_fastscan")
    if len(rows.ids) != entry.indexed:
        raise IndexError_(f"part file {remote.uri} has {len(rows.ids)} rows, snapshot says {entry.indexed}")
    return rows


def _pack_blocks(packer, flat: np.ndarray) -> np.ndarray:
    """(n, code_size) flat codes -> fast-scan blocks (ceil(n / bbs) * block_size bytes)."""
    n = len(flat)
    nblocks = (n + packer.nvec - 1) // packer.nvec
    padded = np.zeros((nblocks * packer.nvec, packer.code_size), np.uint8)
    padded[:n] = flat
    blocks = np.zeros(nblocks * packer.block_size, np.uint8)
    for b in range(nblocks):
        packer.pack_all(faiss.swig_ptr(padded[b * packer.nvec:]), faiss.swig_ptr(blocks[b * packer.block_size:]))
    return blocks


def _merge_exhaustive(template: faiss.IndexIDMap, ids: np.ndarray, flat: np.ndarray) -> faiss.IndexIDMap:
    """Fill the emptied template IDMap(PQFastScan) with every row, in position order."""
    template.reset()
    base = faiss.downcast_index(template.index)
    packer = base.get_CodePacker()
    blocks = _pack_blocks(packer, flat)
    base.codes.resize(blocks.size)
    if blocks.size:
        faiss.memcpy(base.codes.data(), faiss.swig_ptr(blocks), blocks.size)
    base.ntotal = len(ids)
    base.ntotal2 = blocks.size // packer.block_size * packer.nvec  # search scans ntotal2 rows
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, np.int64), template.id_map)
    template.ntotal = len(ids)
    return template


def _merge_ivf(template: faiss.IndexIVFPQFastScan, ids: np.ndarray, flat: np.ndarray,
               lists: np.ndarray) -> faiss.IndexIVFPQFastScan:
    """Fill the emptied template IVF index list by list (labels = image ids)."""
    template.reset()
    invlists = faiss.downcast_InvertedLists(template.invlists)
    packer = template.get_CodePacker()
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(template.nlist + 1))
    for list_no in range(template.nlist):
        sel = order[bounds[list_no]:bounds[list_no + 1]]
        if len(sel) == 0:
            continue
        blocks = _pack_blocks(packer, flat[sel])
        list_ids = np.ascontiguousarray(ids[sel], np.int64)
        # On an empty list add_entries copies whole blocks, which is exactly what we hand it.
        invlists.add_entries(list_no, len(sel), faiss.swig_ptr(list_ids), faiss.swig_ptr(blocks))
    template.ntotal = len(ids)
    return template


# --------------------------------------------------------------------------- lookups


@dataclass
class PartLookup:
    """One part's row metadata (label, uri, row group, row), memory-mapped from a local Arrow IPC file."""

    entry: PartEntry
    table: pa.Table  # _LOOKUP_SCHEMA


def _lookup_file(meta: pa.Table, store_dir: str, version: str, entry: PartEntry) -> pa.Table:
    path = os.path.join(store_dir, version, f"{entry.index_bytes}-{entry.part}{LOOKUP_SUFFIX}")
    if not os.path.isfile(path):
        lookup = pa.table([meta.column(f.name).cast(f.type) for f in _LOOKUP_SCHEMA], schema=_LOOKUP_SCHEMA)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, _LOOKUP_SCHEMA) as writer:
            writer.write_table(lookup)
        _atomic_local_write(path, sink.getvalue().to_pybytes())
    mapped = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()  # zero copy: pages load on use
    if mapped.num_rows != meta.num_rows:
        raise IndexError_(f"{path} has {mapped.num_rows} rows, the part {meta.num_rows}; delete it")
    return mapped


def _find_sorted(values: np.ndarray, order: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Positions p with values[p] == q for each query (-1 when absent); `order` sorts `values`.

    A vectorised binary search through the permutation, so no sorted copy of the ids is kept.
    """
    q = np.asarray(queries, dtype=np.int64).ravel()
    n = len(order)
    lo, hi = np.zeros(len(q), np.int64), np.full(len(q), n, np.int64)
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        v = values[order[np.minimum(mid, n - 1)]]
        go_right = active & (v < q)
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)
    found = lo < n
    pos = np.where(found, order[np.minimum(lo, n - 1)].astype(np.int64), -1)
    ok = found & (values[np.maximum(pos, 0)] == q) if n else np.zeros(len(q), bool)
    return np.where(ok, pos, -1).reshape(np.shape(queries))


# --------------------------------------------------------------------------- the partition


@dataclass
class Hits:
    """A partition's answer: distances (Q, k) float32 (inf: none), ids (Q, k) int64 (-1: none),
    positions (Q, k) int64 inside the partition (-1: none)."""

    distances: np.ndarray
    ids: np.ndarray
    positions: np.ndarray


@dataclass
class RowInfo:
    """What a result shows, from its part: uri, label, and the thumbnail reference (source
    shard uri + the etag it had when indexed + row group + row inside that group)."""

    uri: Optional[str]
    label: Optional[list]
    shard: Optional[str]
    etag: Optional[str]
    row_group: Optional[int]
    row: Optional[int]

    def as_tuple(self) -> tuple:
        """Plain values to send between replicas."""
        return (self.uri, self.label, self.shard, self.etag, self.row_group, self.row)


@dataclass
class Partition:
    """Parts of one snapshot merged into one index, with that share's id lookups."""

    snapshot: Snapshot
    number: int  # which partition of `of`
    of: int
    parts: list[PartEntry]
    index: Optional[faiss.Index]  # None when the partition holds no rows
    ids: np.ndarray  # (N,) int64 ids by position (a view of FAISS memory for exhaustive indices)
    order: np.ndarray  # (N,) positions sorted by id (uint32 below 2^32 rows)
    offsets: np.ndarray  # (parts + 1,) first position of each part
    lookups: list[PartLookup]
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.snapshot.name

    @property
    def ntotal(self) -> int:
        return int(len(self.ids))

    @property
    def dim(self) -> Optional[int]:
        return int(self.index.d) if self.index is not None else None

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """(Q, D) float32 -> the k smallest (distance, id) pairs of this partition."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        nq = q.shape[0]
        if self.index is None or self.ntotal == 0:
            return Hits(np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64),
                        np.full((nq, k), -1, np.int64))
        d, labels = self._search_tie_complete(q, k)
        exhaustive = isinstance(self.index, faiss.IndexIDMap)
        if exhaustive:  # labels are positions (the inner index was searched)
            pos = labels
            ids = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        else:
            ids = labels
        d = np.where(ids < 0, np.inf, d).astype(np.float32)
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), d), axis=-1)[:, :k]
        d, ids = np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)
        if exhaustive:
            pos = np.take_along_axis(pos, order, 1)
        else:
            pos = self.positions_of(ids)
        if d.shape[1] < k:  # fewer rows than k
            pad = ((0, 0), (0, k - d.shape[1]))
            d = np.pad(d, pad, constant_values=np.inf)
            ids, pos = np.pad(ids, pad, constant_values=-1), np.pad(pos, pad, constant_values=-1)
        return Hits(d, ids, pos)

    def _search_tie_complete(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-kk with kk grown (per query) until the k-th distance is not tied with
        the last one fetched, so every row tied at the k-th distance is among the results."""
        target = self.index.index if isinstance(self.index, faiss.IndexIDMap) else self.index
        n = self.ntotal
        kk = min(k + 1, n)
        d, labels = target.search(q, kk)
        todo = np.arange(q.shape[0])
        while kk < n:
            last_ok = labels[todo, kk - 1] >= 0
            tied = last_ok & (d[todo, kk - 1] <= d[todo, min(k, kk) - 1])
            todo = todo[tied]
            if len(todo) == 0:
                break
            kk = min(kk * 2, n)
            d2, l2 = target.search(q[todo], kk)
            grow = kk - d.shape[1]
            d = np.pad(d, ((0, 0), (0, grow)), constant_values=np.inf)
            labels = np.pad(labels, ((0, 0), (0, grow)), constant_values=-1)
            d[todo], labels[todo] = d2, l2
        return d, labels

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Image ids (any shape) -> positions in this partition (-1: not here)."""
        if self.ntotal == 0:
            return np.full(np.shape(ids), -1, np.int64)
        return _find_sorted(self.ids, self.order, ids)

    def row_info(self, positions: np.ndarray) -> list[RowInfo]:
        """Positions (flat) -> what each result shows (None fields for -1), from the parts only."""
        out = []
        for p in np.asarray(positions, dtype=np.int64).ravel().tolist():
            if p < 0 or p >= self.ntotal:
                out.append(RowInfo(None, None, None, None, None, None))
                continue
            j = int(np.searchsorted(self.offsets, p, side="right")) - 1
            lk = self.lookups[j]
            r = p - int(self.offsets[j])
            t = lk.table
            out.append(RowInfo(t.column("uri")[r].as_py(), t.column("label")[r].as_py(), lk.entry.source.uri,
                               lk.entry.source.etag, t.column("row_group")[r].as_py(), t.column("row")[r].as_py()))
        return out

    def resident_bytes(self) -> dict:
        """Bytes this partition holds in memory per structure (the mapped lookups excluded)."""
        codes, labels = 0, 0
        if isinstance(self.index, faiss.IndexIDMap):
            codes = int(faiss.downcast_index(self.index.index).codes.size())  # the id map is `ids` itself
        elif self.index is not None:
            il = faiss.downcast_InvertedLists(self.index.invlists)
            blocks = sum((il.list_size(i) + il.n_per_block - 1) // il.n_per_block for i in range(il.nlist))
            codes, labels = int(blocks * il.block_size), 8 * self.ntotal
        return {"rows": self.ntotal, "codes": codes, "labels": labels, "ids": int(self.ids.nbytes),
                "order": int(self.order.nbytes)}


def _release_unused_memory() -> None:
    """Hand the load's transient buffers (id-map tables, unpacked codes) back to the OS, so a
    replica's resident set is what it holds, not its loading peak."""
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its cache
        pass


def load_partition(root: Location, snap: Snapshot, parts: list[PartEntry], number: int = 0, of: int = 1,
                   cache_dir: Optional[str] = None, nprobe: Optional[int] = None,
                   progress_every_s: float = 10.0) -> Partition:
    """Read `parts` of `snap` and merge their codes into one copy of the version's trained index.

    cache_dir: local folder keeping part files and the lookup files between loads
    (without it the lookups go to a temporary folder removed with the partition).
    """
    t0 = time.perf_counter()
    vloc = version_loc(root, snap.model_version)
    store = cache_dir or tempfile.mkdtemp(prefix="sscq-lookups-")
    # One trained empty index per load (codebooks + quantizer): the parts carry codes only.
    template = read_trained_index(vloc, snap.coarse_checksum, snap.index_type) if parts else None
    total = sum(int(p.indexed) for p in parts)
    ids = np.empty(total, np.int64)
    flat: Optional[np.ndarray] = None
    lists = np.empty(total, np.int64) if snap.index_type == "ivf_pq_fastscan" else None
    offsets = np.zeros(len(parts) + 1, np.int64)
    lookups: list[PartLookup] = []
    last_log = time.perf_counter()
    for j, entry in enumerate(parts):
        rows = load_part(root, snap, entry, cache_dir)
        if flat is None:
            flat = np.empty((total, rows.codes.shape[1]), np.uint8)
        elif rows.codes.shape[1] != flat.shape[1]:
            raise IndexError_(f"part {entry.part} has {rows.codes.shape[1]}-byte codes, the others {flat.shape[1]}")
        lo, hi = offsets[j], offsets[j] + len(rows.ids)
        offsets[j + 1] = hi
        ids[lo:hi], flat[lo:hi] = rows.ids, rows.codes
        if lists is not None:
            lists[lo:hi] = rows.lists
        lookups.append(PartLookup(entry, _lookup_file(rows.meta, store, snap.model_version, entry)))
        del rows
        if time.perf_counter() - last_log >= progress_every_s:
            last_log = time.perf_counter()
            log.info("partition %d/%d of %s: %d/%d parts, %d/%d rows", number + 1, of, snap.name, j + 1,
                     len(parts), hi, total)
    if template is None:
        merged, ids_view = None, ids
    elif lists is None:
        merged = _merge_exhaustive(template, ids, flat)
        # FAISS's id map holds the ids by position: view it instead of keeping a second copy.
        ids_view = faiss.rev_swig_ptr(merged.id_map.data(), total) if total else np.zeros(0, np.int64)
    else:
        if total and (lists.min() < 0 or lists.max() >= template.nlist):
            raise IndexError_(f"snapshot {snap.name}: a part names an IVF list outside 0..{template.nlist - 1}")
        merged = _merge_ivf(template, ids, flat, lists)
        ids_view = ids
    del flat, lists
    if merged is not None:
        fi.set_nprobe(merged, nprobe)
    order = np.argsort(ids_view, kind="stable").astype(np.uint32 if total < 2 ** 32 else np.int64)
    if total and np.any(ids_view[order[1:]] == ids_view[order[:-1]]):
        raise IndexError_(f"snapshot {snap.name}: an id appears twice in partition {number + 1}/{of}")
    _release_unused_memory()
    # `ids_view` may point into the index's memory: both live and die with the Partition.
    part = Partition(snap, number, of, list(parts), merged, ids_view, order, offsets, lookups,
                     load_seconds=time.perf_counter() - t0)
    if cache_dir is None:
        weakref.finalize(part, shutil.rmtree, store, True)
    log.info("partition %d/%d of %s: %d parts, %d rows merged into one %s in %.1fs", number + 1, of, snap.name,
             len(parts), total, type(merged).__name__ if merged is not None else "empty index", part.load_seconds)
    return part
