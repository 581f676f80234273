"""Answer nearest-neighbour queries over every part of the snapshot CURRENT names.

`Searcher.open(root)` reads `<root>/CURRENT`, that snapshot, its part files and id maps
(SPEC section 3; formats in `sscq_dist.indexing.formats`), optionally through a local cache
so a restart reads no part bytes from object storage again. A searcher holds what it opened:
it keeps answering from that snapshot while a reindex publishes the next generation, and
sees the new one only when opened again. `search` sends the query embeddings to every part
and merges the per-part top-k by distance; since the parts share the PQ codebooks (and, for
IVF, one trained coarse quantizer) and fast-scan look-up tables depend on the query only,
the merge equals one index holding all vectors.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import faiss
import numpy as np
import pyarrow as pa

from sscq_dist import storage
from sscq_dist.config import StorageConfig
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index
from sscq_dist.indexing.formats import Snapshot, check_codebooks, open_current, parse_idmap, read_snapshot, version_loc
from sscq_dist.storage import Location

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """ids (Q, k) int64 (-1 = fewer than k results), distances (Q, k) float32 (squared L2,
    inf where no result), uris: Q lists of k uri strings (None when unknown)."""

    ids: np.ndarray
    distances: np.ndarray
    uris: list[list[Optional[str]]]


# --------------------------------------------------------------------------- merge


def merge_topk(distances: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (each (Q, k_s)) into the global top-k by distance.

    Missing results (id -1) sort last; equal distances are ordered by id so the merge is
    deterministic. Returns (distances (Q, k) float32, ids (Q, k) int64).
    """
    d = np.concatenate([np.asarray(x, dtype=np.float32) for x in distances], axis=1)
    i = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids], axis=1)
    d = np.where(i < 0, np.inf, d).astype(np.float32)
    order = np.lexsort((i, d), axis=-1)[:, :k]
    d_k, i_k = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    if d_k.shape[1] < k:  # fewer candidates than k in total
        pad = k - d_k.shape[1]
        d_k = np.pad(d_k, ((0, 0), (0, pad)), constant_values=np.inf)
        i_k = np.pad(i_k, ((0, 0), (0, pad)), constant_values=-1)
    return d_k, i_k


# --------------------------------------------------------------------------- cache


def _cached_bytes(remote: Location, cache_dir: Optional[str], version: str, name: str, size: int) -> tuple[Optional[str], bytes | None]:
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
    os.makedirs(local_dir, exist_ok=True)
    # Write next to the target and rename: a killed download never leaves a cache hit.
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return local, None


def _check_size(remote: Location, data: bytes, size: int) -> None:
    if len(data) != size:
        raise IndexError_(f"{remote.uri} is {len(data)} bytes but the snapshot says {size}; "
                          "the index is inconsistent (a part rewritten after its snapshot?)")


# --------------------------------------------------------------------------- searcher


class Searcher:
    """Holds the parts and id maps of one snapshot; answers k-NN queries.

    Build it with `Searcher.open(...)`. `encoder` (optional) maps a batch of images to
    (Q, D) float32 embeddings for `search_images`.
    """

    def __init__(self, snapshot: Snapshot, parts: list[faiss.Index], idmap_ids: np.ndarray,
                 idmap_uris: pa.Array, root_uri: str = "",
                 encoder: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.snapshot = snapshot
        self.parts = parts
        self.root_uri = root_uri
        self.encoder = encoder
        order = np.argsort(idmap_ids, kind="stable")
        self._ids_sorted = idmap_ids[order]
        self._uris_sorted = idmap_uris.take(pa.array(order))
        self.dim: Optional[int] = parts[0].d if parts else None

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.parts))

    @property
    def version(self) -> str:
        """The snapshot served: '<model_version>/<generation>'."""
        return self.snapshot.name

    @classmethod
    def open(cls, index_root_uri: str, storage_cfg: Optional[StorageConfig] = None,
             cache_dir: Optional[str] = None, nprobe: Optional[int] = None,
             encoder: Optional[Callable[[np.ndarray], np.ndarray]] = None,
             codebooks: Optional[np.ndarray] = None, snapshot: Optional[str] = None) -> "Searcher":
        """Open the snapshot named by <root>/CURRENT (or `snapshot`, '<version>/<generation>').

        cache_dir: local directory keeping part and id-map files between opens;
        nprobe: overrides the IVF nprobe stored in the index; codebooks (M, K, d): when
        given, refused unless they match the snapshot's checksum (the query encoder must
        be the model that built the index).
        """
        root = storage.resolve(index_root_uri, storage_cfg)
        snap = read_snapshot(root, snapshot) if snapshot else open_current(root)
        if codebooks is not None:
            check_codebooks(snap, codebooks)
        vloc = version_loc(root, snap.model_version)
        parts, all_ids, all_uris = [], [], []
        for p in snap.parts:
            index = _load_index(vloc.join(p.index_file), cache_dir, snap.model_version, p.index_file, p.index_bytes)
            if index.ntotal != p.indexed:
                raise IndexError_(f"{vloc.join(p.index_file).uri} holds {index.ntotal} vectors, snapshot says {p.indexed}")
            faiss_index.set_nprobe(index, nprobe)
            parts.append(index)
            path, data = _cached_bytes(vloc.join(p.ids_file), cache_dir, snap.model_version, p.ids_file, p.ids_bytes)
            if path is not None:
                with open(path, "rb") as f:
                    data = f.read()
            table = parse_idmap(data, vloc.join(p.ids_file).uri, columns=["id", "uri"])
            if table.num_rows != p.indexed:
                raise IndexError_(f"id map {vloc.join(p.ids_file).uri} has {table.num_rows} rows, snapshot says {p.indexed}")
            all_ids.append(table.column("id").to_numpy())
            all_uris.append(table.column("uri").combine_chunks())
        ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
        uris = pa.concat_arrays(all_uris) if all_uris else pa.array([], pa.string())
        log.info("opened index %s snapshot %s: %d parts, %d vectors", root.uri, snap.name, len(parts), len(ids))
        return cls(snap, parts, ids, uris, root_uri=root.uri, encoder=encoder)

    def lookup_uris(self, ids: np.ndarray) -> list[list[Optional[str]]]:
        """(Q, k) int64 ids -> uris (None for -1 or an id absent from the id maps)."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        if len(self._ids_sorted) == 0:
            return [[None] * ids.shape[1] for _ in range(ids.shape[0])]
        pos = np.clip(np.searchsorted(self._ids_sorted, flat), 0, len(self._ids_sorted) - 1)
        found = (self._ids_sorted[pos] == flat) & (flat >= 0)
        taken = self._uris_sorted.take(pa.array(pos)).to_pylist()
        out = [u if ok else None for u, ok in zip(taken, found)]
        k = ids.shape[1]
        return [out[r * k:(r + 1) * k] for r in range(ids.shape[0])]

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """queries: (Q, D) float32 embeddings -> the k nearest over all parts."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or (self.dim is not None and q.shape[1] != self.dim):
            raise ValueError(f"queries must be (Q, {self.dim}) embeddings, got {tuple(q.shape)}")
        dists, ids = [], []
        for index in self.parts:
            if index.ntotal == 0:
                continue
            d, i = index.search(q, k)
            dists.append(d)
            ids.append(i)
        if not ids:
            d_k = np.full((q.shape[0], k), np.inf, np.float32)
            i_k = np.full((q.shape[0], k), -1, np.int64)
        else:
            d_k, i_k = merge_topk(dists, ids, k)
        return SearchResult(ids=i_k, distances=d_k, uris=self.lookup_uris(i_k))

    def search_images(self, images: np.ndarray, k: int) -> SearchResult:
        """Encode images with the searcher's encoder, then search."""
        if self.encoder is None:
            raise ValueError("this Searcher has no encoder; pass encoder= to Searcher.open or call search() with embeddings")
        return self.search(np.asarray(self.encoder(images), dtype=np.float32), k)


def _load_index(remote: Location, cache_dir: Optional[str], version: str, name: str, size: int) -> faiss.Index:
    path, data = _cached_bytes(remote, cache_dir, version, name, size)
    try:
        if path is not None:
            return faiss.read_index(path)
        return faiss_index.deserialize(data)
    except RuntimeError as exc:
        raise IndexError_(f"{remote.uri}: not a readable FAISS index ({str(exc).splitlines()[0][:200]})") from None
