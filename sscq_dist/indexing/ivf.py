"""The IVF coarse quantizer of a model version: trained once, on workers, from a shard sample.

A seeded random subset of source shards is read (only those), a uniform row fraction of them
is encoded by the encoder actor pool into the object store, and one Ray task (on a GPU with
faiss-gpu when index.use_gpu and a GPU exist) runs k-means and writes `trained.index`
beside the parts. The driver reads one Parquet footer (to size the sample) and the small
trained file; it never holds the sample.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow.parquet as pq

from sscq_dist import storage
from sscq_dist.config import Config
from sscq_dist.data.parquet_read import read_parquet_files
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.encoder import ImageEncoder, actor_pool, encoder_actors
from sscq_dist.indexing.formats import TRAINED_FILE, SourceShard, sha256_hex
from sscq_dist.storage import Location, resolve

log = logging.getLogger(__name__)

FAISS_POINTS_PER_CENTROID = 39  # FAISS warns below ~39 training points per list


class SampleEncoder:
    """Ray Data callable class: {image} -> {f} for rows that decode."""

    def __init__(self, model_uri: str, cfg_dict: dict, codebook_checksum: str, use_gpu: bool, model_ref=None):
        self.encoder = ImageEncoder(model_uri, cfg_dict, codebook_checksum, use_gpu, model_ref=model_ref)

    def __call__(self, batch: dict) -> dict:
        f, ok = self.encoder.embed(list(batch["image"]))
        return {"f": f[ok]}


def sample_plan(sources: list[SourceShard], want: int, seed: int, rows_per_shard: int) -> tuple[list[SourceShard], float]:
    """(shards to read, row fraction to keep): a seeded random subset holding ~1.25 x want rows."""
    order = np.random.default_rng(seed).permutation(len(sources))
    k = min(len(sources), max(1, math.ceil(1.25 * want / max(1, rows_per_shard))))
    fraction = min(1.0, 1.25 * want / max(1, k * rows_per_shard))
    return [sources[i] for i in order[:k]], fraction


def _train_task(sample_ds, want: int, nlist: int, seed: int, niter: int, codebooks: np.ndarray, nprobe: int,
                use_gpu: bool, out_uri: str, storage_cfg: dict) -> tuple[str, int, int]:
    """Runs as a Ray task: reservoir-sample the encoded rows, k-means, write the trained empty index."""
    from sscq_dist.config import StorageConfig

    sampler = fi.ReservoirSampler(want, seed=seed)
    for batch in sample_ds.iter_batches(batch_format="numpy", batch_size=4096):
        if len(batch["f"]):
            sampler.add(np.stack(batch["f"]) if batch["f"].dtype == object else batch["f"])
    sample = sampler.sample()
    nlist = min(nlist, max(1, len(sample) // FAISS_POINTS_PER_CENTROID))
    index = fi.build_ivf_pq_fastscan(codebooks, sample, nlist, nprobe, seed=seed, niter=niter, gpu=use_gpu)
    data = fi.serialize(index)
    storage.atomic_write_bytes(resolve(out_uri, StorageConfig(**storage_cfg)), data)
    return sha256_hex(data), nlist, len(sample)


def ensure_coarse_quantizer(vloc: Location, sources: list[SourceShard], model_uri: str, enc_cfg: Config,
                            codebooks: np.ndarray, model_ref=None) -> tuple[str, int]:
    """(sha256, nlist) of the version's trained coarse quantizer, training it first if absent."""
    import ray

    loc = vloc.join(TRAINED_FILE)
    try:
        data = storage.read_bytes(loc)
        from sscq_dist.indexing.trained import check_type

        return sha256_hex(data), int(check_type(fi.deserialize(data), "ivf_pq_fastscan", loc.uri).nlist)
    except storage.NotFound:
        pass
    ix, seed = enc_cfg.index, enc_cfg.train.seed
    want = max(ix.ivf_train_sample, ix.nlist * FAISS_POINTS_PER_CENTROID)
    first = resolve(sources[np.random.default_rng(seed).permutation(len(sources))[0]].uri, enc_cfg.storage)

    def footer_rows():
        with first.fs.open_input_file(first.path) as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    rows_est = storage.with_retries(footer_rows, f"read footer of {first.uri}", first.storage)
    shards, fraction = sample_plan(sources, want, seed, rows_est)
    fs = resolve(shards[0].uri, enc_cfg.storage).fs
    paths = [resolve(s.uri, enc_cfg.storage).path for s in shards]
    ds = read_parquet_files(paths, fs).select_columns(["image"])
    if fraction < 1.0:
        ds = ds.random_sample(fraction, seed=seed)
    kwargs = {"model_uri": model_uri, "cfg_dict": enc_cfg.to_dict(), "codebook_checksum": fi.codebook_checksum(codebooks),
              "use_gpu": bool(ix.use_gpu), "model_ref": model_ref}
    actors = encoder_actors(enc_cfg, work_bytes=int(sum(s.size for s in shards) * fraction))
    ds = ds.map_batches(SampleEncoder, fn_constructor_kwargs=kwargs,
                        batch_size=ix.encode_batch_size, batch_format="numpy", **actor_pool(enc_cfg, actors))
    sample = ds.materialize()  # embeddings stay in the object store
    task = ray.remote(_train_task).options(num_cpus=1, num_gpus=1 if ix.use_gpu else 0)
    checksum, nlist, n = ray.get(task.remote(sample, want, ix.nlist, seed, ix.kmeans_iters, codebooks,
                                             ix.nprobe, bool(ix.use_gpu), loc.uri, enc_cfg.storage.__dict__))
    log.info("trained the IVF coarse quantizer of %s: nlist=%d on %d embeddings from %d of %d shards",
             vloc.uri, nlist, n, len(shards), len(sources))
    return checksum, nlist

