"""The HTTP contract's input checks, as plain functions (the ingress maps BadRequest to 4xx).

    POST /search?k=10   multipart field `image` (any format Pillow decodes), or JSON
                        {"embedding": [...], "k": 10}
    -> {"version": "<model_version>/<generation>",
        "results": [{"id", "distance", "uri", "label"}, ...]}

Every refusal is one line naming the cause; nothing here raises anything else.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from typing import Any, Optional

import numpy as np
from PIL import Image

from sscq_dist.data.decode import decode_image


class BadRequest(Exception):
    """A request the service refuses: `status` (4xx) and a one-line `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_k(raw: Any, default_k: int, max_k: int) -> int:
    """k from the query string (text) or the JSON body (an integer); default when absent."""
    if raw is None or raw == "":
        return default_k
    if isinstance(raw, int) and not isinstance(raw, bool):
        k = raw
    elif isinstance(raw, str) and raw.strip().lstrip("+-").isdigit():
        k = int(raw)
    else:
        raise BadRequest(422, f"k must be an integer in [1, {max_k}], got {str(raw)[:40]!r}")
    if not 1 <= k <= max_k:
        raise BadRequest(422, f"k={k} is out of range [1, {max_k}]")
    return k


def decode_query_image(data: Optional[bytes], size: int, channels: int, max_pixels: int,
                       max_bytes: int) -> np.ndarray:
    """Upload bytes -> uint8 (channels, size, size), or BadRequest saying why not."""
    if not data:
        raise BadRequest(400, "the 'image' field is empty")
    if len(data) > max_bytes:
        raise BadRequest(413, f"image is {len(data)} bytes, above the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data)).size  # reads the header only
    except Image.DecompressionBombError:
        raise BadRequest(413, "image declares too many pixels (decompression bomb)") from None
    except Exception:
        raise BadRequest(400, "the upload is not an image this service can decode") from None
    if w * h > max_pixels:
        raise BadRequest(413, f"image declares {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                              "(decompression-bomb guard)")
    arr = decode_image(data, size, channels, max_pixels)
    if arr is None:
        raise BadRequest(400, "the image does not decode (truncated or corrupt)")
    return arr


def parse_json_query(body: bytes, dim: int, default_k: int, max_k: int, k_param: Any = None) -> tuple[np.ndarray, int]:
    """JSON {"embedding": [...], "k": n} -> ((1, dim) float32, k)."""
    return json_query(read_json(body), dim, default_k, max_k, k_param)


def read_json(body: bytes) -> Any:
    """The parsed body (the ingress calls this once per request, in a thread)."""
    try:
        return json.loads(body or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest(400, "the body is not valid JSON") from None


def json_query(obj: Any, dim: int, default_k: int, max_k: int, k_param: Any = None) -> tuple[np.ndarray, int]:
    """A parsed JSON body {"embedding": [...], "k": n} -> ((1, dim) float32, k)."""
    if not isinstance(obj, dict) or "embedding" not in obj:
        raise BadRequest(400, 'JSON body must be an object {"embedding": [...], "k": 10}')
    emb = obj["embedding"]
    if not isinstance(emb, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in emb):
        raise BadRequest(422, "'embedding' must be a flat list of numbers")
    if len(emb) != dim:
        raise BadRequest(422, f"'embedding' has {len(emb)} values; this index expects {dim}")
    if not all(math.isfinite(float(v)) for v in emb):
        raise BadRequest(422, "'embedding' contains NaN or infinity")
    k = parse_k(obj.get("k", k_param), default_k, max_k)
    return np.asarray(emb, np.float32)[None, :], k
