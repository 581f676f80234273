"""Ray Data image pipeline: Parquet shards from any storage URI -> decoded, augmented views.

Undecodable rows are kept through `map_batches` with `ok = False` (zeros for pixels), so
every stage keeps fixed shapes and the consumer counts exactly what it dropped
(`DropCounter`); nothing is lost in a worker log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import ray
import torch

from sscq_dist.config import Config, DataConfig
from sscq_dist.data.augment import augment, eval_view
from sscq_dist.data.decode import decode_batch
from sscq_dist.data.schema import validate_shards
from sscq_dist.storage import resolve


def read_images(uri: str, cfg: Config, columns: Optional[list[str]] = None,
                override_num_blocks: Optional[int] = None) -> "ray.data.Dataset":
    """Validated `read_parquet` of the image shards under `uri` (local or s3://).

    Schema problems fail here, on the driver, naming the file and column, before any
    Ray task starts.
    """
    loc = resolve(uri, cfg.storage)
    files = validate_shards(loc)
    cols = columns or ["id", "image"]
    kwargs = {}
    if override_num_blocks:
        kwargs["override_num_blocks"] = override_num_blocks
    return ray.data.read_parquet([f.path for f in files], filesystem=loc.fs, **kwargs).select_columns(cols)


def _two_views(batch: dict, data_cfg: DataConfig) -> dict:
    torch.set_num_threads(1)  # one Ray CPU per task; avoid oversubscribing the node
    imgs, ok = decode_batch(batch["image"], data_cfg.image_size, data_cfg.channels, data_cfg.max_image_pixels)
    t = torch.from_numpy(imgs)
    return {
        "id": np.asarray(batch["id"], dtype=np.int64),
        "ok": ok,
        "view_a": augment(t, data_cfg.augment).numpy(),
        "view_b": augment(t, data_cfg.augment).numpy(),
    }


def _decode_only(batch: dict, data_cfg: DataConfig) -> dict:
    imgs, ok = decode_batch(batch["image"], data_cfg.image_size, data_cfg.channels, data_cfg.max_image_pixels)
    return {"id": np.asarray(batch["id"], dtype=np.int64), "ok": ok, "pixels": imgs}


def _augment_only(batch: dict, data_cfg: DataConfig) -> dict:
    torch.set_num_threads(1)
    t = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))
    return {"id": batch["id"], "ok": batch["ok"],
            "view_a": augment(t, data_cfg.augment).numpy(), "view_b": augment(t, data_cfg.augment).numpy()}


def repeat_blocks(ds: "ray.data.Dataset", passes: int, seed: int = 0) -> "ray.data.Dataset":
    """`passes` passes over a materialized dataset's blocks, each in a new seeded order.

    One input of `passes x blocks` references to the same blocks (no copies). A `union` of
    one dataset per pass makes every step of the streaming executor walk an operator per
    pass: streaming 3 passes out of a 60-pass union took 108 s against 9 s out of a 10-pass
    one; out of this single input, 7 s and 4.5 s (benchmarks/stream_passes.py).
    """
    blocks = ds.to_arrow_refs()  # zero-copy when the blocks are Arrow already (ours are)
    rng = np.random.default_rng(seed)
    return ray.data.from_arrow_refs([blocks[i] for _ in range(passes) for i in rng.permutation(len(blocks))])


def cached_epochs_dataset(ds: "ray.data.Dataset", cfg: Config, epochs: int, seed: int = 0) -> "ray.data.Dataset":
    """Decode once into the object store, then stream `epochs` passes of fresh two-view augmentation.

    For collections that fit in memory (uint8 pixels): one streaming execution serves the
    whole run, so no epoch pays the pipeline start-up, and each pass visits blocks in a new
    random order.
    """
    decoded = ds.map_batches(_decode_only, fn_kwargs={"data_cfg": cfg.data}, batch_size=cfg.data.decode_batch_size,
                             batch_format="numpy").materialize()
    return repeat_blocks(decoded, epochs, seed).map_batches(
        _augment_only, fn_kwargs={"data_cfg": cfg.data}, batch_size=cfg.data.decode_batch_size, batch_format="numpy")


def _eval_view(batch: dict, data_cfg: DataConfig) -> dict:
    torch.set_num_threads(1)
    imgs, ok = decode_batch(batch["image"], data_cfg.image_size, data_cfg.channels, data_cfg.max_image_pixels)
    out = {"id": np.asarray(batch["id"], dtype=np.int64), "ok": ok,
           "image": eval_view(torch.from_numpy(imgs)).numpy()}
    if "label" in batch:
        out["label"] = batch["label"]
    if "uri" in batch:
        out["uri"] = batch["uri"]
    return out


def two_view_dataset(ds: "ray.data.Dataset", cfg: Config) -> "ray.data.Dataset":
    """Decode + two independently augmented views: columns id, ok, view_a, view_b (float32 NCHW)."""
    return ds.map_batches(_two_views, fn_kwargs={"data_cfg": cfg.data}, batch_size=cfg.data.decode_batch_size,
                          batch_format="numpy")


def eval_dataset(ds: "ray.data.Dataset", cfg: Config) -> "ray.data.Dataset":
    """Deterministic single view (decode + resize + normalise): columns id, ok, image[, label, uri]."""
    return ds.map_batches(_eval_view, fn_kwargs={"data_cfg": cfg.data}, batch_size=cfg.data.decode_batch_size,
                          batch_format="numpy")


@dataclass
class DropCounter:
    """Counts rows seen and rows dropped because their bytes did not decode."""

    rows: int = 0
    dropped: int = 0
    dropped_ids: list = field(default_factory=list)
    max_ids_kept: int = 100

    def filter(self, batch: dict) -> dict:
        """Drop ok=False rows from a batch (numpy or torch), counting them."""
        ok = batch["ok"]
        ok_np = ok.cpu().numpy() if isinstance(ok, torch.Tensor) else np.asarray(ok)
        ok_np = ok_np.astype(bool)
        n_bad = int((~ok_np).sum())
        self.rows += len(ok_np)
        if n_bad:
            self.dropped += n_bad
            ids = batch["id"]
            ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
            room = self.max_ids_kept - len(self.dropped_ids)
            if room > 0:
                self.dropped_ids.extend(int(i) for i in ids[~ok_np][:room])
            keep = torch.from_numpy(ok_np) if isinstance(ok, torch.Tensor) else ok_np
            return {k: (v[keep] if hasattr(v, "__getitem__") and len(v) == len(ok_np) else v) for k, v in batch.items()}
        return batch

    def iterate(self, batches: Iterable[dict]) -> Iterator[dict]:
        for b in batches:
            yield self.filter(b)


@dataclass
class PipelineStats:
    rows: int
    dropped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def pipeline_pass(uri: str, cfg: Config, batch_size: int = 256, two_views: bool = True,
                  progress: bool = True) -> PipelineStats:
    """One full pass of the decode (+ two-view augment) pipeline; returns counts and rate."""
    from tqdm import tqdm

    ds = read_images(uri, cfg)
    ds = two_view_dataset(ds, cfg) if two_views else eval_dataset(ds, cfg)
    counter = DropCounter()
    t0 = time.perf_counter()
    bar = tqdm(desc="pipeline", unit="img", disable=not progress, mininterval=2.0)
    for batch in counter.iterate(ds.iter_batches(batch_size=batch_size, batch_format="numpy")):
        bar.update(len(batch["id"]))
    bar.close()
    return PipelineStats(rows=counter.rows, dropped=counter.dropped, seconds=time.perf_counter() - t0)
