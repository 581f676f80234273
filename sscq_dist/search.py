"""Serve nearest-neighbour queries over every shard of the version named by CURRENT.

`Searcher.open(root)` reads `<root>/CURRENT`, that version's manifest, its index shards
and id maps (SPEC section 3), optionally through a local cache so a restart reads no
shard bytes from object storage again. `search` sends the query embeddings to every shard
and merges the per-shard top-k by distance; since the shards share the PQ codebooks (and,
for IVF, one trained coarse quantizer) and fast-scan look-up tables depend on the query
only, the merge equals one index holding all vectors.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sscq_dist import storage
from sscq_dist.config import StorageConfig
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index
from sscq_dist.indexing.manifest import (IndexManifest, check_codebooks, read_current, read_manifest,
                                         version_loc)
from sscq_dist.storage import Location

log = logging.getLogger(__name__)

IDMAP_SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("uri", pa.string())])


@dataclass
class SearchResult:
    """ids (Q, k) int64 (-1 = fewer than k results), distances (Q, k) float32 (squared L2,
    inf where no result), uris: Q lists of k uri strings (None when unknown)."""

    ids: np.ndarray
    distances: np.ndarray
    uris: list[list[Optional[str]]]


# --------------------------------------------------------------------------- id maps


def idmap_name(shard_no: int) -> str:
    return f"idmap-{shard_no:05d}.parquet"


def index_shard_name(shard_no: int) -> str:
    return f"shard-{shard_no:05d}.index"


def write_idmap(loc: Location, ids: np.ndarray, uris: list[Optional[str]] | pa.Array) -> int:
    """Write the Parquet id map (id int64, uri string) atomically; returns its size in bytes."""
    table = pa.table({"id": pa.array(np.asarray(ids, dtype=np.int64), pa.int64()),
                      "uri": pa.array(uris, pa.string())}, schema=IDMAP_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    storage.atomic_write_bytes(loc, data)
    return len(data)


def _parse_idmap(data: bytes, what: str) -> tuple[np.ndarray, pa.Array]:
    table = pq.read_table(pa.BufferReader(data))
    for name, tp in (("id", pa.int64()), ("uri", pa.string())):
        if name not in table.column_names:
            raise IndexError_(f"id map {what}: missing column '{name}'")
        if table.schema.field(name).type != tp:
            raise IndexError_(f"id map {what}: column '{name}' is {table.schema.field(name).type}, expected {tp}")
    return table.column("id").to_numpy(), table.column("uri").combine_chunks()


def read_idmap(loc: Location) -> tuple[np.ndarray, pa.Array]:
    """(ids (N,) int64, uris pyarrow string array of length N)."""
    return _parse_idmap(storage.read_bytes(loc), loc.uri)


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
    local = os.path.join(local_dir, f"{size}-{name}")
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
        raise IndexError_(f"{remote.uri} is {len(data)} bytes but the manifest says {size}; "
                          "the index version is inconsistent (rewritten after its manifest?)")


# --------------------------------------------------------------------------- searcher


class Searcher:
    """Holds the shards and id map of one index version; answers k-NN queries.

    Build it with `Searcher.open(...)`. `encoder` (optional) maps a batch of images to
    (Q, D) float32 embeddings for `search_images`.
    """

    def __init__(self, manifest: IndexManifest, shards: list[faiss.Index], idmap_ids: np.ndarray,
                 idmap_uris: pa.Array, root_uri: str = "",
                 encoder: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.manifest = manifest
        self.shards = shards
        self.root_uri = root_uri
        self.encoder = encoder
        order = np.argsort(idmap_ids, kind="stable")
        self._ids_sorted = idmap_ids[order]
        self._uris_sorted = idmap_uris.take(pa.array(order))
        self.dim: Optional[int] = shards[0].d if shards else None

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @classmethod
    def open(cls, index_root_uri: str, storage_cfg: Optional[StorageConfig] = None,
             cache_dir: Optional[str] = None, nprobe: Optional[int] = None,
             encoder: Optional[Callable[[np.ndarray], np.ndarray]] = None,
             codebooks: Optional[np.ndarray] = None) -> "Searcher":
        """Open the version named by <root>/CURRENT.

        cache_dir: local directory keeping shard and id-map files between opens;
        nprobe: overrides the IVF nprobe stored in the index; codebooks (M, K, d): when
        given, refused unless they match the manifest's checksum (the query encoder must
        be the model that built the index).
        """
        root = storage.resolve(index_root_uri, storage_cfg)
        version = read_current(root)
        if version is None:
            raise IndexError_(f"index root {root.uri} has no CURRENT; run a reindex first")
        manifest = read_manifest(root, version)
        if manifest is None:
            raise IndexError_(f"index root {root.uri}: CURRENT names version {version}, which has no manifest.json")
        if not manifest.complete:
            raise IndexError_(f"index root {root.uri}: version {version} is incomplete (manifest complete=false)")
        if codebooks is not None:
            check_codebooks(manifest, codebooks)
        vloc = version_loc(root, version)
        shards, all_ids, all_uris = [], [], []
        for sh in manifest.index_shards:
            index = _load_index(vloc.join(sh.file), cache_dir, version, sh.file, sh.bytes)
            if index.ntotal != sh.rows:
                raise IndexError_(f"{vloc.join(sh.file).uri} holds {index.ntotal} vectors, manifest says {sh.rows}")
            faiss_index.set_nprobe(index, nprobe)
            shards.append(index)
            path, data = _cached_bytes(vloc.join(sh.idmap_file), cache_dir, version, sh.idmap_file, sh.idmap_bytes)
            if path is not None:
                with open(path, "rb") as f:
                    data = f.read()
            ids, uris = _parse_idmap(data, vloc.join(sh.idmap_file).uri)
            if len(ids) != sh.rows:
                raise IndexError_(f"id map {vloc.join(sh.idmap_file).uri} has {len(ids)} rows, manifest says {sh.rows}")
            all_ids.append(ids)
            all_uris.append(uris)
        ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
        uris = pa.concat_arrays(all_uris) if all_uris else pa.array([], pa.string())
        log.info("opened index %s version %s: %d shards, %d vectors", root.uri, version, len(shards), len(ids))
        return cls(manifest, shards, ids, uris, root_uri=root.uri, encoder=encoder)

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
        """queries: (Q, D) float32 embeddings -> the k nearest over all shards."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or (self.dim is not None and q.shape[1] != self.dim):
            raise ValueError(f"queries must be (Q, {self.dim}) embeddings, got {tuple(q.shape)}")
        dists, ids = [], []
        for index in self.shards:
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
