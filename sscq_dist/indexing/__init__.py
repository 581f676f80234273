"""Indexing: FAISS fast-scan indices from learned codebooks, the manifest, the index lock."""

from sscq_dist.indexing.faiss_index import (ReservoirSampler, add, assign_codes, build_ivf_pq_fastscan,
                                            build_pq_fastscan, codebook_checksum, deserialize, exhaustive_adc,
                                            index_codes, measure_qps, recall_at, reservoir_sample, serialize,
                                            set_nprobe)
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.manifest import (IndexManifest, IndexShard, SourceShard, check_codebooks, read_current,
                                         read_manifest, write_current, write_manifest)

__all__ = [
    "ReservoirSampler", "add", "assign_codes", "build_ivf_pq_fastscan", "build_pq_fastscan", "codebook_checksum",
    "deserialize", "exhaustive_adc", "index_codes", "measure_qps", "recall_at", "reservoir_sample", "serialize",
    "set_nprobe", "IndexLock", "IndexManifest", "IndexShard", "SourceShard", "check_codebooks", "read_current",
    "read_manifest", "write_current", "write_manifest",
]
