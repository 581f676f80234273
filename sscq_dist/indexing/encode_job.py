"""Batch encoding on Ray Data: image shards -> (source path, id, embedding) with an actor pool.

Each actor loads the model once (`num_gpus=1` per actor where GPUs exist) and encodes
decoded, eval-mode images in `map_batches`. Rows whose bytes do not decode come out with
ok=False so the caller can count them per source shard.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import torch

from sscq_dist.config import Config, DataConfig
from sscq_dist.data.augment import eval_view
from sscq_dist.data.decode import decode_batch

PATH_COLUMN = "path"
# Encoder input block = this many encode batches: small enough to keep every actor busy.
ENCODE_BLOCK_BATCHES = 4


class ShardEncoder:
    """Ray Data callable class: one model per actor, batches of encoded images -> embeddings."""

    def __init__(self, state_dict: dict, cfg_dict: dict, use_gpu: bool = False):
        from sscq_dist.config import from_dict
        from sscq_dist.model import build_model

        cfg = from_dict(cfg_dict)
        self.data: DataConfig = cfg.data
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one Ray CPU per actor
        self.model = build_model(cfg.model, cfg.data.channels)
        self.model.load_state_dict(state_dict)
        self.model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        imgs, ok = decode_batch(batch["image"], self.data.image_size, self.data.channels, self.data.max_image_pixels)
        x = eval_view(torch.from_numpy(imgs)).to(self.device)
        f = self.model.embed(x).float().cpu().numpy()
        return {PATH_COLUMN: np.asarray(batch[PATH_COLUMN]), "id": np.asarray(batch["id"], dtype=np.int64),
                "ok": ok, "f": f}


def encoder_actors(cfg: Config) -> int:
    """index.encode_concurrency, or the auto count for 0 (needs a running Ray)."""
    import ray

    if cfg.index.encode_concurrency > 0:
        return cfg.index.encode_concurrency
    res = ray.cluster_resources()
    if cfg.index.use_gpu:
        return max(1, int(res.get("GPU", 0)))
    cpus = int(res.get("CPU", 1)) - 1  # one CPU left for the Parquet read and block splits
    if len(ray.nodes()) == 1:  # a local Ray may advertise more CPUs than the cores under it
        cpus = min(cpus, os.cpu_count() or 1)
    return max(1, cpus)


def encode_stream(paths: list[str], fs, state_dict: dict, cfg: Config,
                  sample_fraction: Optional[float] = None, seed: int = 0) -> Iterator[dict]:
    """Encode the given Parquet files; yields numpy batches {path, id, ok, f}.

    sample_fraction: keep only a uniform random fraction of rows before encoding (the IVF
    coarse-quantizer training sample), instead of everything.
    """
    import ray

    ix = cfg.index
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True).select_columns([PATH_COLUMN, "id", "image"])
    # The Parquet reader merges small files into one big block, which one actor would then
    # encode alone (and emit only at the end); small streaming blocks spread the work.
    ds = ds.repartition(target_num_rows_per_block=ENCODE_BLOCK_BATCHES * ix.encode_batch_size)
    if sample_fraction is not None and sample_fraction < 1.0:
        ds = ds.random_sample(sample_fraction, seed=seed)
    use_gpu = bool(ix.use_gpu)
    ds = ds.map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"state_dict": state_dict, "cfg_dict": cfg.to_dict(), "use_gpu": use_gpu},
        batch_size=ix.encode_batch_size,
        batch_format="numpy",
        concurrency=encoder_actors(cfg),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    yield from ds.iter_batches(batch_size=ix.encode_batch_size, batch_format="numpy", prefetch_batches=2)
