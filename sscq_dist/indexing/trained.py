"""The version's one trained empty index, `models/<version>/trained.index` (SPEC section 6).

It holds the model's PQ codebooks and, for IVF, the coarse quantizer; parts hold codes only.
Written once per model version before any part is built (FAISS's `contrib/ondisk.py`
pattern: train the empty index once, every shard contributes its lists); builders assign
codes with it and every serving partition merges the parts' codes into a copy of it. Its
sha256 is recorded in each part record and in the snapshot, so codes assigned against
another trained index are never mixed.
"""

from __future__ import annotations

import faiss
import numpy as np

from sscq_dist import storage
from sscq_dist.config import Config
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.formats import TRAINED_FILE, SourceShard, sha256_hex
from sscq_dist.storage import Location

_TYPES = {"pq_fastscan": faiss.IndexIDMap, "ivf_pq_fastscan": faiss.IndexIVFPQFastScan}


def ensure_trained_index(vloc: Location, sources: list[SourceShard], model_uri: str, enc_cfg: Config,
                         codebooks: np.ndarray, model_ref=None) -> tuple[str, dict]:
    """(sha256 of trained.index, index params) of the version, writing trained.index first if absent."""
    from sscq_dist.indexing.ivf import ensure_coarse_quantizer

    kind = enc_cfg.index.index_type
    if kind == "ivf_pq_fastscan":
        checksum, nlist = ensure_coarse_quantizer(vloc, sources, model_uri, enc_cfg, codebooks, model_ref)
        return checksum, {"nlist": nlist, "nprobe": enc_cfg.index.nprobe}
    loc = vloc.join(TRAINED_FILE)
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        data = fi.serialize(fi.build_pq_fastscan(codebooks))
        storage.atomic_write_bytes(loc, data)
    check_type(fi.deserialize(data), kind, loc.uri)
    return sha256_hex(data), {}


def check_type(index: faiss.Index, kind: str, where: str) -> faiss.Index:
    """Refuse a trained index of another index type than the one asked for."""
    if not isinstance(index, _TYPES[kind]):
        raise IndexError_(f"{where} is a {type(index).__name__}, not a {kind} index; use a new index root to "
                          "change the index type")
    return index


def read_trained_index(vloc: Location, checksum: str, kind: str) -> faiss.Index:
    """The version's trained empty index, refused unless its sha256 is `checksum`."""
    loc = vloc.join(TRAINED_FILE)
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        raise IndexError_(f"{loc.uri} is missing; the index version is incomplete (rerun the reindex)") from None
    if sha256_hex(data) != checksum:
        raise IndexError_(f"{loc.uri} has sha256 {sha256_hex(data)[:16]}..., the snapshot expects "
                          f"{checksum[:16]}...; parts were assigned with another trained index")
    try:
        index = fi.deserialize(data)
    except RuntimeError as exc:
        raise IndexError_(f"{loc.uri}: not a readable FAISS index ({str(exc).splitlines()[0][:200]})") from None
    return check_type(index, kind, loc.uri)
