"""Decode encoded image bytes into fixed-size uint8 arrays, never raising on bad bytes."""

from __future__ import annotations

import io
import os
import warnings
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from sscq_dist.config import DataConfig


def decode_image(data: Optional[bytes], size: int, channels: int, max_pixels: int) -> Optional[np.ndarray]:
    """Bytes (PNG/JPEG/WebP/..., any mode) -> uint8 array (channels, size, size), or None.

    None means the row is unusable (empty, not an image, truncated, or declaring more than
    `max_pixels` pixels: a decompression-bomb guard checked before pixels are decoded).
    Grey, RGB, RGBA (composited on white), palette, CMYK and 16-bit images are converted.
    """
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                return None
            im = ImageOps.exif_transpose(im) if hasattr(im, "getexif") else im
            im = _to_mode(im, "L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # any decoder failure is a counted skip, not a crash
        return None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: rescale to 8 bits by the image's own range.
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert(mode)


def decode_batch(images, size: int, channels: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """A sequence of bytes -> (uint8 array (N, C, size, size), ok mask (N,) bool).

    Rows that do not decode are zeros with ok=False, so batch shapes stay fixed and the
    consumer counts the drops.
    """
    n = len(images)
    out = np.zeros((n, channels, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    for i, data in enumerate(images):
        arr = decode_image(data, size, channels, max_pixels)
        if arr is not None:
            out[i] = arr
            ok[i] = True
    return out, ok


# Ray Data map functions of the training stream (sscq_dist.data.pipeline). They live in this
# torch-free module so a decode task imports PIL and numpy only: importing torch costs
# each new Ray Data worker seconds of CPU and hundreds of MB of memory.

def _shard_index(paths, index: dict[str, int]) -> np.ndarray:
    """Source-file index per row from Ray Data's `path` column (basename as the fallback key)."""
    out = np.empty(len(paths), dtype=np.int32)
    for i, p in enumerate(paths):
        out[i] = index.get(p, index.get(os.path.basename(str(p)), -1))
    return out


def decode_train_batch(batch: dict, data_cfg: "DataConfig", shard_index: dict[str, int]) -> dict:
    """Ray Data batch (id, image bytes, path) -> id, ok, shard, image uint8 (N, H, W, C)."""
    imgs, ok = decode_batch(batch["image"], data_cfg.image_size, data_cfg.channels, data_cfg.max_image_pixels)
    return {"id": np.asarray(batch["id"], dtype=np.int64), "ok": ok,
            "shard": _shard_index(batch["path"], shard_index),
            "image": np.ascontiguousarray(imgs.transpose(0, 2, 3, 1))}


def drop_stats(batch: dict) -> dict:
    """One row per batch: rows, undecodable rows, and the undecodable count per shard index."""
    bad = ~np.asarray(batch["ok"], dtype=bool)
    shards, counts = np.unique(np.asarray(batch["shard"])[bad], return_counts=True)
    return {"rows": np.array([len(bad)]), "dropped": np.array([int(bad.sum())]),
            "shards": np.array([shards.astype(np.int64)], dtype=object),
            "counts": np.array([counts.astype(np.int64)], dtype=object)}
