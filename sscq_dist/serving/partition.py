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

Incremental swaps: a new generation's partition takes the parts it shares with the
generation the replica serves from that partition's memory (codes, ids, the mapped lookups)
and starts from its emptied index, so a swap reads only the parts it does not hold.

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
from faiss.contrib.inspect_tools import get_invlist

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.formats import PART_META_SCHEMA, PartEntry, PartRows, Snapshot, parse_part, version_loc
from sscq_dist.indexing.trained import read_trained_index
from sscq_dist.serving.cache import TEMP_PREFIX, cache_path, touch
from sscq_dist.storage import Location

log = logging.getLogger(__name__)

LOOKUP_SUFFIX = ".lookup.arrow"
# The memory-mapped row metadata: the part file's meta columns, uri as large_string (64-bit offsets).
_LOOKUP_SCHEMA = pa.schema([pa.field("uri", pa.large_string()) if f.name == "uri" else f for f in PART_META_SCHEMA])


# --------------------------------------------------------------------------- part files


def cached_bytes(remote: Location, cache_dir: Optional[str], version: str, name: str,
                 size: int) -> tuple[Optional[str], Optional[bytes]]:
    """Return (local path, None) when cached (or now cached), or (None, bytes) without a cache.

    The cache key is version/size-name (cache.cache_path); a hit refreshes its place in the
    cache's LRU order. A cached file of the wrong size is fetched again.
    """
    if cache_dir is None:
        data = storage.read_bytes(remote)
        _check_size(remote, data, size)
        return None, data
    local = cache_path(cache_dir, version, name, size)
    if os.path.isfile(local) and os.path.getsize(local) == size:
        touch(local)
        return local, None
    data = storage.read_bytes(remote)
    _check_size(remote, data, size)
    _atomic_local_write(local, data)
    return local, None


def _atomic_local_write(path: str, data: bytes) -> None:
    # Write next to the target and rename: a killed download never leaves a cache hit.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=TEMP_PREFIX)
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
    """One part's row metadata (label, uri, row group, row), memory-mapped from a local Arrow IPC file.

    A new generation that keeps the part shares this object (the mapping, never re-read).
    files: the local cache files the part uses (the cache bound keeps them while it is held);
    keep: the temporary folder holding the mapped file when there is no cache folder (removed
    when the last partition sharing it goes).
    """

    entry: PartEntry
    table: pa.Table  # _LOOKUP_SCHEMA
    files: tuple[str, ...] = ()
    keep: Optional[object] = None


class _LookupFolder:
    """A temporary folder for lookup files, removed when no PartLookup refers to it any more."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="sscq-lookups-")
        weakref.finalize(self, shutil.rmtree, self.path, True)


def _lookup_file(meta: pa.Table, store_dir: str, version: str, entry: PartEntry) -> tuple[pa.Table, str]:
    """(mapped lookup table, local path) of one part's row metadata."""
    path = os.path.join(store_dir, version, f"{entry.index_bytes}-{entry.part}{LOOKUP_SUFFIX}")
    try:
        mapped = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()  # zero copy: pages load on use
        touch(path)
    except FileNotFoundError:
        lookup = pa.table([meta.column(f.name).cast(f.type) for f in _LOOKUP_SCHEMA], schema=_LOOKUP_SCHEMA)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, _LOOKUP_SCHEMA) as writer:
            writer.write_table(lookup)
        _atomic_local_write(path, sink.getvalue().to_pybytes())
        mapped = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    if mapped.num_rows != meta.num_rows:
        raise IndexError_(f"{path} has {mapped.num_rows} rows, the part {meta.num_rows}; delete it")
    return mapped, path


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
    empty: Optional[bytes] = None  # this partition's index emptied (FAISS bytes): a next generation's template
    kept_parts: int = 0  # parts taken from the generation held before (not read again)
    read_parts: int = 0  # parts read from storage or the cache folder

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

    def cache_files(self) -> set[str]:
        """The local cache files this partition's parts use (pinned by the cache bound)."""
        return {f for lk in self.lookups for f in lk.files}

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


# --------------------------------------------------------------------------- one part, loaded or kept


@dataclass
class LoadedPart:
    """One part's rows as a partition merges them, in its file's row order.

    ids (n,) int64; codes (n, code_size) uint8 packed flat codes; lists (n,) int64 inverted
    list of each row (IVF; None for exhaustive parts); lookup: its per-row metadata.
    """

    ids: np.ndarray
    codes: np.ndarray
    lists: Optional[np.ndarray]
    lookup: PartLookup


def load_part(vloc: Location, snap: Snapshot, entry: PartEntry, cache_dir: Optional[str],
              store: str, keep: Optional[object] = None) -> LoadedPart:
    """Read one part from storage (or the cache folder): the ONE per-part loader a partition
    calls, so a change of part format changes this function only.

    Checks the file's size and row count against the snapshot entry. store: folder for its
    lookup file; keep: the object owning that folder (PartLookup.keep).
    """
    remote = vloc.join(entry.index_file)
    path, data = cached_bytes(remote, cache_dir, snap.model_version, entry.index_file, entry.index_bytes)
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
    rows: PartRows = parse_part(data, remote.uri, ivf=snap.index_type == "ivf_pq_fastscan")
    del data
    if len(rows.ids) != entry.indexed:
        raise IndexError_(f"part file {remote.uri} has {len(rows.ids)} rows, snapshot says {entry.indexed}")
    mapped, lookup_path = _lookup_file(rows.meta, store, snap.model_version, entry)
    files = (lookup_path,)
    if cache_dir is not None:
        files += (cache_path(cache_dir, snap.model_version, entry.index_file, entry.index_bytes),)
    return LoadedPart(rows.ids, rows.codes, rows.lists, PartLookup(entry, mapped, files, keep))


def _shares_codes(a: Snapshot, b: Snapshot) -> bool:
    """Whether parts of snapshot a can serve in b as they are: the same model, codebooks and quantizer."""
    return (a.model_version, a.codebook_checksum, a.index_type, a.coarse_checksum, a.M, a.K, a.bits) == \
        (b.model_version, b.codebook_checksum, b.index_type, b.coarse_checksum, b.M, b.K, b.bits)


def _kept_parts(previous: Optional["Partition"], snap: Snapshot, parts: list[PartEntry]) -> dict[int, int]:
    """{part number in `parts`: its number in `previous`} for the parts listed in both with
    the very same entry (files, sizes, rows), which can serve in `snap` as they are held."""
    if previous is None or previous.index is None or previous.empty is None \
            or not _shares_codes(previous.snapshot, snap):
        return {}
    held = {e.part: j for j, e in enumerate(previous.parts)}
    return {j: held[e.part] for j, e in enumerate(parts) if e.part in held and previous.parts[held[e.part]] == e}


def _code_size(index: faiss.Index) -> int:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return int(inner.get_CodePacker().code_size)


def _exhaustive_rows(index: faiss.IndexIDMap, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a merged exhaustive index as (hi - lo, code_size) flat codes (only
    the blocks that hold them are unpacked)."""
    base = faiss.downcast_index(index.index)
    packer = base.get_CodePacker()
    b0, b1 = lo // packer.nvec, (hi + packer.nvec - 1) // packer.nvec
    blocks = faiss.rev_swig_ptr(base.codes.data(), base.codes.size())[b0 * packer.block_size:b1 * packer.block_size]
    flat = fi._unpack_blocks(packer, blocks, (b1 - b0) * packer.nvec)
    return flat[lo - b0 * packer.nvec:hi - b0 * packer.nvec]


def _copy_kept_ivf_rows(previous: "Partition", moves: list[tuple[int, int]], offsets: np.ndarray,
                        flat: np.ndarray, lists: np.ndarray) -> None:
    """Scatter the codes and lists of the kept parts from `previous`'s IVF lists into their
    new positions (one pass over the lists; 8 bytes a previous row besides)."""
    remap = np.full(previous.ntotal, -1, np.int64)  # previous position -> new position (-1: not kept)
    for j_new, j_old in moves:
        lo, hi = int(previous.offsets[j_old]), int(previous.offsets[j_old + 1])
        remap[lo:hi] = np.arange(offsets[j_new], offsets[j_new] + hi - lo)
    index = previous.index
    packer = index.get_CodePacker()
    for list_no in range(index.nlist):
        list_ids, blocks = get_invlist(index.invlists, list_no)
        if len(list_ids) == 0:
            continue
        new_pos = remap[previous.positions_of(list_ids)]
        sel = new_pos >= 0
        if sel.any():
            flat[new_pos[sel]] = fi._unpack_blocks(packer, blocks, len(list_ids))[sel]
            lists[new_pos[sel]] = list_no


# --------------------------------------------------------------------------- merge


def load_partition(root: Location, snap: Snapshot, parts: list[PartEntry], number: int = 0, of: int = 1,
                   cache_dir: Optional[str] = None, nprobe: Optional[int] = None,
                   progress_every_s: float = 10.0, previous: Optional["Partition"] = None) -> Partition:
    """Read `parts` of `snap` and merge their codes into one copy of the version's trained index.

    cache_dir: local folder keeping part files and the lookup files between loads (without it
    the lookups go to a temporary folder removed with the last partition using it).
    previous: a partition this replica holds (the generation it serves): the parts both list
    unchanged are taken from its memory (codes, ids, the mapped lookups), not read again, and
    its emptied index is the template, so a swap reads only the parts it does not hold.
    `previous` is only read: it keeps serving.
    """
    t0 = time.perf_counter()
    vloc = version_loc(root, snap.model_version)
    folder = None if cache_dir else _LookupFolder()
    store = cache_dir or folder.path
    kept = _kept_parts(previous, snap, parts)
    # One trained empty index per load (codebooks + quantizer): the parts carry codes only.
    template: Optional[faiss.Index] = None
    if kept:
        template = fi.deserialize(previous.empty)
    elif parts:
        template = read_trained_index(vloc, snap.coarse_checksum, snap.index_type)
    total = sum(int(p.indexed) for p in parts)
    ids = np.empty(total, np.int64)
    flat: Optional[np.ndarray] = None
    lists = np.empty(total, np.int64) if snap.index_type == "ivf_pq_fastscan" else None
    offsets = np.zeros(len(parts) + 1, np.int64)
    lookups: list[PartLookup] = []
    moves: list[tuple[int, int]] = []  # (new part number, previous part number) of kept parts
    flat = np.empty((total, _code_size(template)), np.uint8) if template is not None else None
    last_log = time.perf_counter()
    for j, entry in enumerate(parts):
        lo = offsets[j]
        j_old = kept.get(j)
        if j_old is not None:  # the very same part is held: take it from memory
            hi = lo + int(entry.indexed)
            o_lo, o_hi = int(previous.offsets[j_old]), int(previous.offsets[j_old + 1])
            ids[lo:hi] = previous.ids[o_lo:o_hi]
            if lists is None:
                flat[lo:hi] = _exhaustive_rows(previous.index, o_lo, o_hi)
            moves.append((j, j_old))
            lookups.append(previous.lookups[j_old])
        else:
            lp = load_part(vloc, snap, entry, cache_dir, store, folder)
            if lp.codes.shape[1] != flat.shape[1]:
                raise IndexError_(f"part {entry.part} has {lp.codes.shape[1]}-byte codes, the trained index "
                                  f"{flat.shape[1]}")
            hi = lo + len(lp.ids)
            ids[lo:hi], flat[lo:hi] = lp.ids, lp.codes
            if lists is not None:
                lists[lo:hi] = lp.lists
            lookups.append(lp.lookup)
            del lp
        offsets[j + 1] = hi
        if time.perf_counter() - last_log >= progress_every_s:
            last_log = time.perf_counter()
            log.info("partition %d/%d of %s: %d/%d parts, %d/%d rows", number + 1, of, snap.name, j + 1,
                     len(parts), hi, total)
    if moves and lists is not None:
        _copy_kept_ivf_rows(previous, moves, offsets, flat, lists)
    empty = None
    if template is None:
        merged, ids_view = None, ids
    else:
        template.reset()
        empty = fi.serialize(template)  # what the next generation starts from (codebooks, quantizer, nprobe)
        if lists is None:
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
                     load_seconds=time.perf_counter() - t0, empty=empty, kept_parts=len(moves),
                     read_parts=len(parts) - len(moves))
    log.info("partition %d/%d of %s: %d parts (%d read, %d kept from %s), %d rows merged into one %s in %.1fs",
             number + 1, of, snap.name, len(parts), part.read_parts, part.kept_parts,
             previous.name if previous is not None else "none", total,
             type(merged).__name__ if merged is not None else "empty index", part.load_seconds)
    return part
