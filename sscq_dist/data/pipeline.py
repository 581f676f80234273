"""Ray Data image pipeline: Parquet shards from any storage URI -> decoded uint8 images.

Training stream (SPEC section 4, "Input pipeline at GPU scale"): Ray Data reads, decodes
and resizes once and ships uint8 images, NHWC (H x W x C bytes per image), with three
small columns: `id` (int64), `ok` (bool: False = the bytes did not decode, pixels are
zeros) and `shard` (int32: index of the source file in `TrainData.shard_uris`). The two
augmented views are made inside the training worker (`sscq_dist.data.augment.two_views`),
so floats and second views never cross the object store.

- Cached path (`cached_train_data`): a collection of at most `data.cache_max_rows` rows is
  decoded once and materialised in the object store; every epoch each rank takes its equal
  share of those blocks in a layout seeded by (seed, epoch) and shuffles its rows
  (`cached_shard.py`): no split coordinator, no executor per epoch, and a resumed epoch
  skips exactly the batches already trained on.
- Streaming path (`streaming_train_data`): larger collections are read and decoded again
  every epoch, with the file order shuffled per execution, seeded by (seed, epoch index).

Undecodable rows stay in the stream with `ok = False`, so every stage keeps fixed shapes
and the consumer counts exactly what it dropped and from which file (`DropCounter`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import ray
import torch

from sscq_dist.config import Config, DataConfig
from sscq_dist.data.augment import eval_view, two_views
# The Ray Data map functions live in decode.py: their tasks then never import torch.
from sscq_dist.data.decode import decode_batch, decode_train_batch, drop_stats
from sscq_dist.data.parquet_read import read_parquet_files
from sscq_dist.data.schema import validate_shards
from sscq_dist.errors import TrainingError
from sscq_dist.storage import resolve

# Training stream columns besides the image: id int64, ok bool, shard int32.
META_COLUMNS = ("id", "ok", "shard")
# Example files named by the drop-ceiling error.
DROP_EXAMPLE_FILES = 3


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
    return read_parquet_files([f.path for f in files], loc.fs, **kwargs).select_columns(cols)


@dataclass
class TrainData:
    """The training dataset handed to Ray Train and what the workers need to read it.

    dataset: rows id, ok, shard, image (uint8 (H, W, C)); shard_uris: source file of each
    shard index; cached: materialised once (True) or streamed per epoch (False);
    rows / dropped: counted on the driver for the cached path, None when streaming;
    blocks: the cached set's block refs, which the workers deal out themselves (then the
    dataset only keeps them alive and is not handed to Ray Train).
    """

    dataset: "ray.data.Dataset"
    shard_uris: list[str]
    cached: bool
    rows: Optional[int] = None
    dropped: Optional[int] = None
    dropped_by_shard: dict = field(default_factory=dict)
    blocks: Optional["CachedBlocks"] = None  # noqa: F821


def decoded_images(uri: str, cfg: Config, shuffle_seed: Optional[int] = None) -> tuple["ray.data.Dataset", list[str]]:
    """(lazy dataset of id, ok, shard, uint8 NHWC image, source file uris).

    shuffle_seed: the file order is shuffled at every execution, seeded by
    (shuffle_seed, execution index); None keeps the listed order.
    """
    from ray.data import FileShuffleConfig

    loc = resolve(uri, cfg.storage)
    files = validate_shards(loc)
    index = {f.path: i for i, f in enumerate(files)}
    index.update({os.path.basename(f.path): i for i, f in enumerate(files)})
    shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
    # The projection is pushed down into the Parquet read: only these columns leave storage.
    ds = read_parquet_files([f.path for f in files], loc.fs, include_paths=True,
                            shuffle=shuffle).select_columns(["id", "image", "path"])
    ds = ds.map_batches(decode_train_batch, fn_kwargs={"data_cfg": cfg.data, "shard_index": index},
                        batch_size=cfg.data.decode_batch_size, batch_format="numpy")
    return ds, [f.uri for f in files]


def count_dropped(ds: "ray.data.Dataset") -> tuple[int, int, dict[int, int]]:
    """(rows, undecodable rows, {shard index: undecodable rows}) of a decoded dataset."""
    rows, dropped, by_shard = 0, 0, Counter()
    stats = ds.select_columns(["ok", "shard"]).map_batches(drop_stats, batch_size=None, batch_format="numpy")
    for b in stats.iter_batches(batch_size=None, batch_format="numpy"):
        rows += int(np.sum(b["rows"]))
        dropped += int(np.sum(b["dropped"]))
        for shards, counts in zip(b["shards"], b["counts"]):
            for s, c in zip(shards, counts):
                by_shard[int(s)] += int(c)
    return rows, dropped, dict(by_shard)


def cached_train_data(uri: str, cfg: Config, seed: int) -> TrainData:
    """Decode once into the object store; the workers deal every epoch out of its blocks
    themselves (`sscq_dist.data.cached_shard`: a block order seeded by (seed, epoch), equal
    rows per rank, each rank's rows shuffled). Undecodable rows are counted here, once.

    Should the materialised dataset hold a partial block, the workers read it through Ray
    Train's split instead, in a block order seeded per execution (`RandomSeedConfig` with
    `reseed_after_execution`) plus their local shuffle.
    """
    from ray.data import RandomSeedConfig

    from sscq_dist.data.cached_shard import cached_blocks

    ds, shard_uris = decoded_images(uri, cfg)
    # Blocks of one decode batch: the per-epoch block permutation then mixes at that
    # granularity, not at the granularity of whole files (Ray Data merges small files).
    decoded = ds.repartition(target_num_rows_per_block=cfg.data.decode_batch_size).materialize()
    rows, dropped, by_shard = count_dropped(decoded)
    blocks = cached_blocks(decoded, seed)
    if blocks is None:
        decoded = decoded.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return TrainData(decoded, shard_uris, cached=True, rows=rows, dropped=dropped, dropped_by_shard=by_shard,
                     blocks=blocks)


def streaming_train_data(uri: str, cfg: Config, seed: int) -> TrainData:
    """Read and decode every epoch, the file order shuffled per epoch, seeded by (seed, epoch index)."""
    ds, shard_uris = decoded_images(uri, cfg, shuffle_seed=seed)
    return TrainData(ds, shard_uris, cached=False)


def check_drop_ceiling(rows: int, dropped: int, by_shard: dict[int, int], shard_uris: list[str],
                       max_fraction: float) -> None:
    """Raise one TrainingError line when more than max_fraction of the rows did not decode.

    The line names the count, the share, the ceiling and the files with the most drops.
    """
    if rows <= 0 or dropped / rows <= max_fraction:
        return
    worst = sorted(by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:DROP_EXAMPLE_FILES]
    names = ", ".join(f"{shard_uris[s] if 0 <= s < len(shard_uris) else '?'} ({c})" for s, c in worst)
    raise TrainingError(f"{dropped} of {rows} training images ({100 * dropped / rows:.1f}%) did not decode, "
                        f"above data.max_drop_fraction={max_fraction}; e.g. {names}")


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


def eval_dataset(ds: "ray.data.Dataset", cfg: Config) -> "ray.data.Dataset":
    """Deterministic single view (decode + resize + normalise): columns id, ok, image[, label, uri]."""
    return ds.map_batches(_eval_view, fn_kwargs={"data_cfg": cfg.data}, batch_size=cfg.data.decode_batch_size,
                          batch_format="numpy")


@dataclass
class DropCounter:
    """Counts rows seen and rows dropped because their bytes did not decode (per source shard)."""

    rows: int = 0
    dropped: int = 0
    dropped_ids: list = field(default_factory=list)
    by_shard: Counter = field(default_factory=Counter)
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
            if "shard" in batch:
                sh = batch["shard"]
                sh = sh.cpu().numpy() if isinstance(sh, torch.Tensor) else np.asarray(sh)
                self.by_shard.update(int(s) for s in sh[~ok_np])
            keep = torch.from_numpy(ok_np).to(ok.device) if isinstance(ok, torch.Tensor) else ok_np
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


def pipeline_pass(uri: str, cfg: Config, batch_size: int = 256, two_views_on_consumer: bool = True,
                  progress: bool = True) -> PipelineStats:
    """One full pass of the training input: Ray Data decode to uint8, then (optionally) the
    two augmented views made in this process, as a training worker makes them."""
    from tqdm import tqdm

    from sscq_dist.console import CONSOLE

    ds, _ = decoded_images(uri, cfg)
    counter = DropCounter()
    t0 = time.perf_counter()
    bar = tqdm(desc="pipeline", unit="img", disable=not progress, file=CONSOLE.err, mininterval=2.0)
    for step, batch in enumerate(counter.iterate(ds.iter_torch_batches(batch_size=batch_size))):
        if two_views_on_consumer and len(batch["id"]):
            two_views(batch["image"], cfg.data.augment, cfg.train.seed, 0, step)
        bar.update(len(batch["id"]))
    bar.close()
    return PipelineStats(rows=counter.rows, dropped=counter.dropped, seconds=time.perf_counter() - t0)
