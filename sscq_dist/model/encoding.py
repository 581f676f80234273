"""In-process encoding of an image-shard set with a model (evaluation and gate sets).

The Ray batch encoder for whole collections lives in `sscq_dist.indexing.build`;
this one serves sets that fit one process (held-out queries, a gate database), shard by
shard so memory stays bounded by a shard plus the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from sscq_dist.config import Config
from sscq_dist.data.augment import eval_view
from sscq_dist.data.decode import decode_batch
from sscq_dist.data.schema import validate_shards
from sscq_dist.storage import resolve, with_retries


@dataclass
class ImageSet:
    """Decoded images of a shard set: ids (N,), images uint8 (N, C, H, W), labels list, uris list."""

    ids: np.ndarray
    images: np.ndarray
    labels: list
    uris: list
    dropped: int


@dataclass
class EncodedSet:
    ids: np.ndarray  # (N,) int64
    f: np.ndarray  # (N, M*d) float32 embeddings
    codes: np.ndarray  # (N, M) uint8 hard codes
    labels: list  # per row: list of ints or None
    uris: list
    dropped: int


def iter_shard_tables(uri: str, cfg: Config, columns=("id", "image", "uri", "label")) -> Iterator:
    for f in validate_shards(resolve(uri, cfg.storage)):
        def _read(f=f):
            with f.fs.open_input_file(f.path) as fh:
                schema = pq.read_schema(fh)
                cols = [c for c in columns if c in schema.names]
                return pq.read_table(fh, columns=cols)
        yield f, with_retries(_read, f"read {f.uri}", cfg.storage)


def load_images(uri: str, cfg: Config, limit: Optional[int] = None) -> ImageSet:
    """Decode every row of a shard set at the config's size (eval mode: no augmentation)."""
    ids, imgs, labels, uris, dropped = [], [], [], [], 0
    n = 0
    for _, table in iter_shard_tables(uri, cfg):
        cols = table.column_names
        arr, ok = decode_batch(table.column("image").to_pylist(), cfg.data.image_size, cfg.data.channels,
                               cfg.data.max_image_pixels)
        t_ids = table.column("id").to_numpy()
        t_labels = table.column("label").to_pylist() if "label" in cols else [None] * len(t_ids)
        t_uris = table.column("uri").to_pylist() if "uri" in cols else [None] * len(t_ids)
        dropped += int((~ok).sum())
        ids.append(t_ids[ok])
        imgs.append(arr[ok])
        labels.extend(lab for lab, good in zip(t_labels, ok) if good)
        uris.extend(u for u, good in zip(t_uris, ok) if good)
        n += int(ok.sum())
        if limit and n >= limit:
            break
    ids_a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    imgs_a = np.concatenate(imgs) if imgs else np.zeros((0, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), np.uint8)
    if limit:
        ids_a, imgs_a, labels, uris = ids_a[:limit], imgs_a[:limit], labels[:limit], uris[:limit]
    return ImageSet(ids_a, imgs_a, labels, uris, dropped)


@torch.no_grad()
def embed_images(model: torch.nn.Module, images_u8: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """uint8 (N, C, H, W) -> embeddings f (N, M*d) float32, model in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = eval_view(torch.from_numpy(images_u8[i:i + batch_size]))
        out.append(model.embed(x).float().numpy())
    dim = model.cfg.embedding_dim
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def codes_from_embeddings(f: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Hard codes (N, M) uint8: the same argmin FAISS indexing uses (one implementation)."""
    from sscq_dist.indexing.faiss_index import assign_codes

    return assign_codes(f, codebooks)


def encode_set(model: torch.nn.Module, uri: str, cfg: Config, batch_size: int = 512,
               limit: Optional[int] = None) -> EncodedSet:
    imgs = load_images(uri, cfg, limit)
    f = embed_images(model, imgs.images, batch_size)
    cb = model.quantizer.codebooks.detach().cpu().float().numpy()
    return EncodedSet(imgs.ids, f, codes_from_embeddings(f, cb), imgs.labels, imgs.uris, imgs.dropped)
