"""Answer nearest-neighbour queries over every part of the snapshot CURRENT names, in process.

`Searcher.open(root)` reads `<root>/CURRENT`, that snapshot, the version's trained index and
its lean part files (SPEC section 3; formats in `sscq_dist.indexing.formats`), optionally
through a local cache so a restart reads no part bytes from object storage again, and
merges every part's codes into one in-memory index: the same partition code the search service runs (`sscq_dist.serving`),
here as a single partition, so per-query cost does not grow with the number of parts. A
searcher holds what it opened: it keeps answering from that snapshot while a reindex
publishes the next generation, and sees the new one only when opened again.

Answers are canonical (the k smallest (distance, id) pairs), so they equal what the
partitioned service answers for the same query. Uris and labels come from the parts: a
search never reads the source images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import faiss
import numpy as np

from sscq_dist import storage
from sscq_dist.config import StorageConfig
from sscq_dist.indexing.formats import Snapshot, check_codebooks, open_current, read_snapshot
from sscq_dist.serving.partition import Partition, load_partition

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """ids (Q, k) int64 (-1 = fewer than k results), distances (Q, k) float32 (squared L2,
    inf where no result), uris and labels: Q lists of k values from the parts (None when
    unknown; a label is a list of ints)."""

    ids: np.ndarray
    distances: np.ndarray
    uris: list[list[Optional[str]]]
    labels: list[list[Optional[list]]] = None


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


# --------------------------------------------------------------------------- searcher


class Searcher:
    """One snapshot merged into one partition; answers k-NN queries.

    Build it with `Searcher.open(...)`. `encoder` (optional) maps a batch of images to
    (Q, D) float32 embeddings for `search_images`.
    """

    def __init__(self, partition: Partition, root_uri: str = "",
                 encoder: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.partition = partition
        self.snapshot: Snapshot = partition.snapshot
        self.root_uri = root_uri
        self.encoder = encoder
        self.dim: Optional[int] = partition.dim

    @property
    def parts(self) -> list[faiss.Index]:
        """The in-memory FAISS indices searched: one merged index holding every part's
        (id, code) entries (empty for an empty snapshot). `fi.index_codes` reads them."""
        return [self.partition.index] if self.partition.index is not None else []

    @property
    def ntotal(self) -> int:
        return self.partition.ntotal

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

        cache_dir: local directory keeping part files between opens;
        nprobe: overrides the IVF nprobe stored in the index; codebooks (M, K, d): when
        given, refused unless they match the snapshot's checksum (the query encoder must
        be the model that built the index).
        """
        root = storage.resolve(index_root_uri, storage_cfg)
        snap = read_snapshot(root, snapshot) if snapshot else open_current(root)
        if codebooks is not None:
            check_codebooks(snap, codebooks)
        part = load_partition(root, snap, snap.parts, cache_dir=cache_dir, nprobe=nprobe)
        log.info("opened index %s snapshot %s: %d parts, %d vectors", root.uri, snap.name, len(snap.parts),
                 part.ntotal)
        return cls(part, root_uri=root.uri, encoder=encoder)

    def lookup_uris(self, ids: np.ndarray) -> list[list[Optional[str]]]:
        """(Q, k) int64 ids -> uris (None for -1 or an id absent from the parts)."""
        ids = np.asarray(ids, dtype=np.int64)
        infos = self.partition.row_info(self.partition.positions_of(ids))
        k = ids.shape[1]
        return [[i.uri for i in infos[r * k:(r + 1) * k]] for r in range(ids.shape[0])]

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """queries: (Q, D) float32 embeddings -> the k nearest over all parts."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or (self.dim is not None and q.shape[1] != self.dim):
            raise ValueError(f"queries must be (Q, {self.dim}) embeddings, got {tuple(q.shape)}")
        hits = self.partition.search(q, k)
        infos = self.partition.row_info(hits.positions)
        rows = [infos[r * k:(r + 1) * k] for r in range(q.shape[0])]
        return SearchResult(ids=hits.ids, distances=hits.distances, uris=[[i.uri for i in row] for row in rows],
                            labels=[[i.label for i in row] for row in rows])

    def search_images(self, images: np.ndarray, k: int) -> SearchResult:
        """Encode images with the searcher's encoder, then search."""
        if self.encoder is None:
            raise ValueError("this Searcher has no encoder; pass encoder= to Searcher.open or call search() with embeddings")
        return self.search(np.asarray(self.encoder(images), dtype=np.float32), k)
