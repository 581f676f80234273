"""Answer image queries in process: image file in, ids/uris/distances out.

A Searcher (the snapshot's parts merged into one partition, as each partition of the search
service holds them) plus the model that built the snapshot, to encode the query images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from sscq_dist.config import Config
from sscq_dist.data.decode import decode_image
from sscq_dist.errors import SSCQError
from sscq_dist.indexing.formats import check_codebooks
from sscq_dist.registry import load_model
from sscq_dist.serving.searcher import Searcher, SearchResult


@dataclass
class QueryService:
    """A Searcher over CURRENT plus the model that built it (to encode query images)."""

    searcher: Searcher
    model: torch.nn.Module
    cfg: Config

    @classmethod
    def open(cls, index_root_uri: str, cfg: Config, cache_dir: Optional[str] = None,
             nprobe: Optional[int] = None) -> "QueryService":
        searcher = Searcher.open(index_root_uri, cfg.storage, cache_dir=cache_dir, nprobe=nprobe)
        loaded = load_model(searcher.snapshot.model_uri, cfg.tracking)
        check_codebooks(searcher.snapshot, loaded.codebooks)  # the encoder must be the model that built the index
        return cls(searcher, loaded.model, loaded.cfg)

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        from sscq_dist.model.encoding import embed_images

        return embed_images(self.model, images_u8)

    def search_bytes(self, images: list[bytes], k: int) -> SearchResult:
        """Encoded image bytes (any format) -> top-k over all parts."""
        arrs = []
        for i, data in enumerate(images):
            a = decode_image(data, self.cfg.data.image_size, self.cfg.data.channels, self.cfg.data.max_image_pixels)
            if a is None:
                raise SSCQError(f"query image {i} does not decode as an image")
            arrs.append(a)
        return self.searcher.search(self.embed(np.stack(arrs)), k)

    def search_file(self, path: str, k: int) -> SearchResult:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SSCQError(f"cannot read query image {path}: {exc.strerror}") from None
        return self.search_bytes([data], k)
