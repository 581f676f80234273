"""FAISS glue for 4-bit PQ codes from the learned codebooks (SPEC section 6).

Plain functions, arrays in and arrays out. The model's codebooks C (M, K=16, d) become the
PQ centroids of a fast-scan index as they are: the PQ is never trained by FAISS, so the
codes FAISS assigns are the model's hard codes argmin_k ||f^m - C^m_k||^2. The IVF variant
uses `by_residual = False` for the same reason; only its coarse quantizer is trained.

Layout facts used here (checked by tests/test_faiss_index.py against the installed FAISS):
- `ProductQuantizer` with nbits=4 packs two codes per byte, subspace 2j in the low nibble
  and 2j+1 in the high nibble (the `IndexPQ` / `sa_encode` layout).
- Fast-scan indices store codes interleaved in blocks of `bbs` vectors; the index's
  `get_CodePacker()` unpacks one block into that flat layout.
- Setting `pq.centroids` needs no further sync: distance tables are computed from
  `pq.centroids` unless `pq.sync_transposed_centroids()` was called (it is not here), and
  the SDC table is only used by `search_sdc`, which fast-scan never calls.
"""

from __future__ import annotations

import hashlib
import time
from typing import Iterable, Optional

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist

NBITS = 4  # K = 16 codewords per subspace: FAISS fast-scan's only code width
KSUB = 1 << NBITS


def _check_codebooks(codebooks: np.ndarray) -> np.ndarray:
    """(M, 16, d) float32 C-contiguous, or a ValueError naming the problem."""
    c = np.ascontiguousarray(codebooks, dtype=np.float32)
    if c.ndim != 3 or c.shape[1] != KSUB:
        raise ValueError(f"codebooks must have shape (M, {KSUB}, d), got {tuple(c.shape)}")
    if not np.isfinite(c).all():
        raise ValueError("codebooks contain NaN or inf")
    return c


def codebook_checksum(codebooks: np.ndarray) -> str:
    """'sha256:<hex>' of the float32 C-contiguous bytes of C (M, K, d)."""
    c = np.ascontiguousarray(codebooks, dtype=np.float32)
    return "sha256:" + hashlib.sha256(c.tobytes()).hexdigest()


def assign_codes(embeddings: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Hard codes argmin_k ||f^m - C^m_k||^2.

    embeddings: (N, M*d) float; codebooks: (M, K, d). Returns (N, M) uint8.
    """
    c = _check_codebooks(codebooks)
    m, k, d = c.shape
    f = np.asarray(embeddings, dtype=np.float32).reshape(-1, m, 1, d)
    dist = ((f - c[None]) ** 2).sum(-1)  # (N, M, K)
    return dist.argmin(-1).astype(np.uint8)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(N, M) codes in [0, 16) -> (N, ceil(M/2)) uint8 in the PQ nbits=4 byte layout."""
    c = np.asarray(codes, dtype=np.uint8)
    if c.ndim != 2 or (c >= KSUB).any():
        raise ValueError(f"codes must be (N, M) with values < {KSUB}")
    if c.shape[1] % 2:
        c = np.concatenate([c, np.zeros((c.shape[0], 1), np.uint8)], axis=1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, m: int) -> np.ndarray:
    """Inverse of pack_codes: (N, ceil(M/2)) uint8 -> (N, M) uint8."""
    p = np.asarray(packed, dtype=np.uint8)
    return np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)[:, :m]


def _set_centroids(pq: faiss.ProductQuantizer, c: np.ndarray) -> None:
    if pq.M != c.shape[0] or pq.dsub != c.shape[2] or pq.ksub != c.shape[1]:
        raise ValueError(f"codebooks {c.shape} do not match PQ (M={pq.M}, ksub={pq.ksub}, dsub={pq.dsub})")
    faiss.copy_array_to_vector(c.ravel(), pq.centroids)


def build_pq_fastscan(codebooks: np.ndarray) -> faiss.IndexIDMap:
    """Empty exhaustive fast-scan index with the learned codebooks, holding int64 ids.

    An `IndexIDMap` (not IDMap2: no reverse hash map, so 8 bytes per id in memory) around
    `IndexPQFastScan(D, M, 4)`. No training: the index is marked trained.
    """
    c = _check_codebooks(codebooks)
    m, _, d = c.shape
    base = faiss.IndexPQFastScan(m * d, m, NBITS)
    _set_centroids(base.pq, c)
    base.is_trained = True
    index = faiss.IndexIDMap(base)
    index.own_fields = True
    base.this.disown()  # the IDMap now frees it
    return index


def train_coarse_quantizer(train_sample: np.ndarray, nlist: int, seed: int, niter: int = 10,
                           gpu: bool = False) -> faiss.IndexFlatL2:
    """k-means on a (uniformly drawn) sample (n, D) -> IndexFlatL2 holding nlist centroids.

    gpu: run k-means on the GPUs when this FAISS build has them (faiss-gpu); else on the CPU.
    """
    x = np.ascontiguousarray(train_sample, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < nlist:
        raise ValueError(f"IVF training needs at least nlist={nlist} sample rows, got shape {tuple(x.shape)}")
    use_gpu = bool(gpu) and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    km = faiss.Kmeans(x.shape[1], nlist, niter=int(niter), seed=int(seed), gpu=use_gpu, verbose=False)
    km.train(x)
    quantizer = faiss.IndexFlatL2(x.shape[1])
    quantizer.add(np.ascontiguousarray(km.centroids, dtype=np.float32))
    return quantizer


def build_ivf_pq_fastscan(codebooks: np.ndarray, train_sample: np.ndarray, nlist: int, nprobe: int,
                          seed: int = 0, niter: int = 10, gpu: bool = False) -> faiss.IndexIVFPQFastScan:
    """Empty IVF fast-scan index: coarse quantizer trained on train_sample, PQ = codebooks.

    codebooks: (M, 16, d); train_sample: (n, M*d) float32, a uniform random sample of the
    embeddings (see ReservoirSampler). `by_residual = False`, so the stored PQ codes are
    the codes of the embedding itself, not of its residual to the coarse centroid.
    Index shards that must merge like one index share this trained, empty index
    (serialize it once and deserialize a copy per shard).
    """
    c = _check_codebooks(codebooks)
    m, _, d = c.shape
    dim = m * d
    if train_sample.shape[-1] != dim:
        raise ValueError(f"train_sample has dimension {train_sample.shape[-1]}, codebooks give {dim}")
    quantizer = train_coarse_quantizer(train_sample, nlist, seed, niter, gpu)
    index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, m, NBITS)
    index.by_residual = False
    _set_centroids(index.pq, c)
    # IndexIVF.train would also train the PQ; the quantizer is trained above and the PQ
    # is given, so mark the whole index trained instead of calling train().
    index.is_trained = True
    index.nprobe = int(nprobe)
    index.own_fields = True
    quantizer.this.disown()
    return index


def set_nprobe(index: faiss.Index, nprobe: Optional[int]) -> None:
    """Set nprobe on an IVF index (no-op for exhaustive indices or nprobe=None)."""
    if nprobe is None:
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)


def add(index: faiss.Index, embeddings: np.ndarray, ids: np.ndarray) -> None:
    """Add (N, D) float32 embeddings under their int64 ids (the Parquet `id` column)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    i = np.ascontiguousarray(ids, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"embeddings must be (N, {index.d}), got {tuple(x.shape)}")
    if i.shape != (x.shape[0],):
        raise ValueError(f"ids must be ({x.shape[0]},), got {tuple(i.shape)}")
    index.add_with_ids(x, i)


def encode(trained: faiss.Index, embeddings: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """FAISS's own encoding by a trained (empty) index, without adding to it.

    trained: IDMap(PQFastScan) or IVFPQFastScan (by_residual = False); embeddings: (N, D).
    Returns (packed PQ codes (N, code_size) uint8 in the nbits=4 layout, IVF list numbers
    (N,) int64 or None): exactly what `add` would store, so a part can hold codes only.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != trained.d:
        raise ValueError(f"embeddings must be (N, {trained.d}), got {tuple(x.shape)}")
    if isinstance(trained, faiss.IndexIVFPQFastScan):
        if trained.by_residual:
            raise ValueError("IVF parts need by_residual = False (codes of the embedding, not of a residual)")
        pq = trained.pq
        lists = trained.quantizer.assign(x, 1)[:, 0].astype(np.int64) if len(x) else np.zeros(0, np.int64)
    else:
        base = faiss.downcast_index(trained.index) if isinstance(trained, (faiss.IndexIDMap, faiss.IndexIDMap2)) \
            else trained
        pq, lists = base.pq, None
    codes = pq.compute_codes(x) if len(x) else np.zeros((0, pq.code_size), np.uint8)
    return codes, lists


def _unpack_blocks(packer: faiss.CodePacker, blocks: np.ndarray, n: int) -> np.ndarray:
    """Packed fast-scan blocks (bytes) holding n vectors -> (n, code_size) flat codes."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8).ravel()
    nblocks = (n + packer.nvec - 1) // packer.nvec
    out = np.empty(nblocks * packer.nvec * packer.code_size, dtype=np.uint8)
    for b in range(nblocks):
        packer.unpack_all(faiss.swig_ptr(blocks[b * packer.block_size:]),
                          faiss.swig_ptr(out[b * packer.nvec * packer.code_size:]))
    return out[: n * packer.code_size].reshape(n, packer.code_size)


def index_codes(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """The (ids (N,) int64, codes (N, M) uint8) an index actually stores, in storage order.

    Reads FAISS's own storage (fast-scan blocks unpacked with the index's CodePacker,
    IVF lists one by one), so it proves what search will scan, not what an encoder
    would produce. Supports IDMap(PQFastScan), IVFPQFastScan and IDMap(IndexPQ).
    """
    if type(index) is faiss.Index:  # a generic wrapper; the caller keeps ownership
        index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        base = faiss.downcast_index(index.index)
        if isinstance(base, faiss.IndexPQFastScan):
            raw = np.empty(base.codes.size(), dtype=np.uint8)
            if raw.size:
                faiss.memcpy(faiss.swig_ptr(raw), base.codes.data(), raw.nbytes)
            flat = _unpack_blocks(base.get_CodePacker(), raw, base.ntotal)
            return ids, unpack_codes(flat, base.pq.M)
        if isinstance(base, faiss.IndexPQ):
            flat = faiss.vector_to_array(base.codes).reshape(base.ntotal, base.code_size)
            return ids, unpack_codes(flat, base.pq.M)
        raise TypeError(f"index_codes: unsupported base index {type(base).__name__}")
    if isinstance(index, faiss.IndexIVFPQFastScan):
        packer = index.get_CodePacker()
        all_ids, all_codes = [], []
        for list_no in range(index.nlist):
            list_ids, blocks = get_invlist(index.invlists, list_no)
            if len(list_ids) == 0:
                continue
            all_ids.append(list_ids)
            all_codes.append(unpack_codes(_unpack_blocks(packer, blocks, len(list_ids)), index.pq.M))
        if not all_ids:
            return np.zeros(0, np.int64), np.zeros((0, index.pq.M), np.uint8)
        return np.concatenate(all_ids), np.concatenate(all_codes)
    raise TypeError(f"index_codes: unsupported index {type(index).__name__}")


def serialize(index: faiss.Index) -> bytes:
    """FAISS's own binary format (faiss.serialize_index); never pickle."""
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    """Inverse of serialize; returns the concrete index type (read_index downcasts).

    No extra downcast_index here: it would wrap the same object without ownership while
    the owning wrapper is dropped, freeing the index under the caller.
    """
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def exhaustive_adc(codebooks: np.ndarray, codes: np.ndarray, ids: np.ndarray) -> faiss.IndexIDMap:
    """Reference for recall: plain IndexPQ (float ADC, exhaustive) holding the same codes.

    codebooks: (M, 16, d); codes: (N, M) uint8 (e.g. from index_codes); ids: (N,) int64.
    """
    c = _check_codebooks(codebooks)
    m, _, d = c.shape
    base = faiss.IndexPQ(m * d, m, NBITS)
    _set_centroids(base.pq, c)
    base.is_trained = True
    index = faiss.IndexIDMap(base)
    index.own_fields = True
    base.this.disown()
    index.add_sa_codes(pack_codes(codes), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def recall_at(found_ids: np.ndarray, reference_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:, :k] ∩ reference[:, :k]| / |reference[:, :k]|.

    found_ids, reference_ids: (Q, >=k) int64; -1 entries (no result) are ignored.
    """
    f, r = np.asarray(found_ids)[:, :k], np.asarray(reference_ids)[:, :k]
    hits, total = 0, 0
    for fi, ri in zip(f, r):
        ri = ri[ri >= 0]
        hits += len(np.intersect1d(fi[fi >= 0], ri))
        total += len(ri)
    return hits / total if total else 1.0


def measure_qps(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 3) -> float:
    """Queries per second of index.search on (Q, D) queries: the best of `repeats` runs."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    return q.shape[0] / max(best, 1e-9)


class ReservoirSampler:
    """Streaming uniform sample of at most n rows across batches (Algorithm R, vectorized).

    Every row seen has the same probability min(1, n / seen) of being in `sample()`.
    Seeded, so a rerun over the same stream keeps the same rows.
    """

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"reservoir size must be >= 1, got {n}")
        self.n = int(n)
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._buf: Optional[np.ndarray] = None

    def add(self, batch: np.ndarray) -> None:
        """batch: (B, D) rows, in stream order."""
        x = np.asarray(batch)
        if x.ndim != 2 or x.shape[0] == 0:
            if x.ndim != 2:
                raise ValueError(f"batch must be (B, D), got {tuple(x.shape)}")
            return
        if self._buf is None:
            self._buf = np.empty((self.n, x.shape[1]), dtype=x.dtype)
        fill = min(max(self.n - self.seen, 0), x.shape[0])
        if fill:
            self._buf[self.seen:self.seen + fill] = x[:fill]
        rest = x[fill:]
        if len(rest):
            # Row with stream index t replaces slot j ~ U[0, t] when j < n; later rows win.
            t = self.seen + fill + np.arange(len(rest))
            j = self._rng.integers(0, t + 1)
            keep = np.nonzero(j < self.n)[0]
            slots = j[keep]
            _, last = np.unique(slots[::-1], return_index=True)
            chosen = keep[::-1][last]
            self._buf[j[chosen]] = rest[chosen]
        self.seen += x.shape[0]

    def sample(self) -> np.ndarray:
        """(min(n, seen), D) rows."""
        if self._buf is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._buf[: min(self.n, self.seen)].copy()


def reservoir_sample(batches: Iterable[np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """Uniform sample of at most n rows from an iterable of (B, D) batches."""
    sampler = ReservoirSampler(n, seed)
    for b in batches:
        sampler.add(b)
    return sampler.sample()


def synthetic_embeddings(codebooks: np.ndarray, n: int, noise: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Test/benchmark data around given codebooks: a uniform random code per subspace plus
    isotropic Gaussian noise of std `noise`.

    codebooks: (M, K, d). Returns (embeddings (n, M*d) float32, generating codes (n, M) uint8).
    """
    c = _check_codebooks(codebooks)
    m, k, d = c.shape
    codes = rng.integers(0, k, size=(n, m), dtype=np.uint8)
    x = c[np.arange(m)[None, :], codes]  # (n, M, d)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(noise)
    return x.reshape(n, m * d), codes
