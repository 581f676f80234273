"""One model on one device for the batch jobs: encoded image bytes -> embeddings.

Used by the part builders (one source shard per call) and by the IVF sample pass. Actors
get the model's resolved URI (a registry version, never a moving alias), its codebook
checksum, and the weights the driver already loaded, put once in the object store
(`model_object`): an actor then never imports MLflow nor asks the tracking server for the
model (~2 CPU-s and 98 artifact downloads per actor, and at scale a whole pool asking the
server at once). The object is owned by the driver, which outlives every actor of its job,
so an actor that Ray restarts on another node fetches it again from there. Without it
(`model_ref=None`) an actor loads the model by its URI itself. Either way a model that is not
the one planned is refused.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from sscq_dist.config import Config, DataConfig
from sscq_dist.data.augment import eval_view
from sscq_dist.data.decode import decode_batch


class ImageEncoder:
    """model_uri: `models:/<name>/<version>` or a model folder; cfg_dict: Config.to_dict() of the
    job (tracking settings, the model's input size); codebook_checksum: what the driver planned
    with; use_gpu: run on this actor's GPU when there is one."""

    def __init__(self, model_uri: str, cfg_dict: dict, codebook_checksum: str, use_gpu: bool = False,
                 model_ref=None):
        from sscq_dist.config import from_dict
        from sscq_dist.errors import IndexError_
        from sscq_dist.indexing.faiss_index import codebook_checksum as checksum_of
        from sscq_dist.registry import load_model

        cfg = from_dict(cfg_dict)
        self.cfg = cfg
        self.data: DataConfig = cfg.data
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one Ray CPU per actor
        loaded = from_model_object(model_ref, model_uri) if model_ref is not None else load_model(model_uri, cfg.tracking)
        if checksum_of(loaded.codebooks) != codebook_checksum:
            raise IndexError_(f"model {model_uri} loaded on a worker has codebooks {checksum_of(loaded.codebooks)}, "
                              f"the reindex planned with {codebook_checksum}")
        self.codebooks = loaded.codebooks
        self.model = loaded.model.eval().to(self.device)

    @torch.no_grad()
    def embed(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        """Encoded image bytes (N,) -> (embeddings f (N, M*d) float32, ok (N,) bool).

        Rows whose bytes do not decode get ok=False (their embedding rows are meaningless).
        """
        imgs, ok = decode_batch(images, self.data.image_size, self.data.channels, self.data.max_image_pixels)
        x = eval_view(torch.from_numpy(imgs)).to(self.device)
        return self.model.embed(x).float().cpu().numpy(), ok


def model_object(loaded) -> "ray.ObjectRef":  # noqa: F821
    """The loaded model's weights and config in the object store, for `ImageEncoder(model_ref=...)`."""
    import ray

    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    return ray.put({"state": state, "cfg": loaded.cfg.to_dict(), "name": loaded.name, "version": loaded.version})


def from_model_object(ref, model_uri: str):
    """A LoadedModel rebuilt from `model_object`'s payload (or its ObjectRef)."""
    import ray

    from sscq_dist.config import from_dict
    from sscq_dist.model import build_model
    from sscq_dist.registry import LoadedModel

    payload = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
    cfg = from_dict(payload["cfg"])
    model = build_model(cfg.model, cfg.data.channels)
    model.load_state_dict(payload["state"])
    return LoadedModel(model.eval(), cfg, payload["name"], payload["version"], model_uri)


def encoder_actors(cfg: Config, work_bytes: Optional[int] = None) -> int:
    """index.encode_concurrency, or the auto count for 0 (needs a running Ray).

    work_bytes: the source bytes the pool will encode; the auto count then starts no more
    than one actor per index.encode_bytes_per_actor of them (at least one).
    """
    import ray

    ix = cfg.index
    if ix.encode_concurrency > 0:
        return ix.encode_concurrency
    res = ray.cluster_resources()
    if ix.use_gpu:
        n = int(res.get("GPU", 0))
    else:
        n = int(res.get("CPU", 1)) - 1  # one CPU left for reads and the driver's own work
        if len(ray.nodes()) == 1:  # a local Ray may advertise more CPUs than the cores under it
            n = min(n, os.cpu_count() or 1)
    if work_bytes is not None and ix.encode_bytes_per_actor > 0:
        n = min(n, math.ceil(work_bytes / ix.encode_bytes_per_actor))
    return max(1, n)


def actor_pool(cfg: Config, n: Optional[int] = None) -> dict:
    """map_batches arguments for a pool of encoder actors (one GPU each with index.use_gpu)."""
    from ray.data import ActorPoolStrategy

    use_gpu = bool(cfg.index.use_gpu)
    return {"compute": ActorPoolStrategy(size=n or encoder_actors(cfg)), "num_gpus": 1 if use_gpu else 0,
            "num_cpus": 1}
