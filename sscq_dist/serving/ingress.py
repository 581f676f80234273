"""The HTTP ingress (FastAPI via @serve.ingress): decode and encode a query with the pinned
snapshot's model, fan out to the partitions, merge their top-k, resolve rows from the parts;
/thumb, /samples, /healthz, /version, /metrics and the web page (SPEC section 7)."""

# No `from __future__ import annotations`: Serve ships the ingress class by value, and FastAPI
# must see real annotations (a string 'Request' would not resolve in the replica).
import asyncio
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from sscq_dist import storage
from sscq_dist.config import Config
from sscq_dist.errors import SSCQError
from sscq_dist.indexing.formats import Snapshot, check_codebooks, read_current, read_snapshot
from sscq_dist.serving.searcher import merge_topk
from sscq_dist.serving import guard, metrics
from sscq_dist.serving.api import BadRequest, decode_query_image, json_query, parse_k, read_json
from sscq_dist.serving.auth import Secret
from sscq_dist.serving.limits import BodyTooLarge
from sscq_dist.serving.rows import RowGroupTooLarge, ShardChanged, ThumbnailReader
from sscq_dist.serving.runtime import apply_runtime, partition_name, reason as _reason

log = logging.getLogger(__name__)


# Helpers the deployments call are defined before them: @serve.ingress captures the class
# (and what its methods can see) when the class statement runs.
async def _args(*values):
    return values


async def _awaitable(response):
    return await response


async def _timed(number: int, call):
    """`call`'s answer, with its latency (or failure) counted for partition `number`."""
    t0 = time.perf_counter()
    label = partition_name(number)
    try:
        return await call
    except asyncio.TimeoutError:
        metrics.PARTITION_FAILURES.labels(label, "timeout").inc()
        raise
    except Exception:
        metrics.PARTITION_FAILURES.labels(label, "error").inc()
        raise
    finally:
        metrics.PARTITION_LATENCY.labels(label).observe(time.perf_counter() - t0)


def _embed(model, image: np.ndarray) -> np.ndarray:
    from sscq_dist.model.encoding import embed_images

    return np.ascontiguousarray(embed_images(model, np.array(image[None])), np.float32)


# --------------------------------------------------------------------------- ingress

web = FastAPI(title="sscq-dist image search", docs_url=None, redoc_url=None, openapi_url=None)
web.add_middleware(guard.ServiceGuard)  # auth, limits and metrics of every route (guard.py)


@dataclass
class Pinned:
    """What a request is answered with: one snapshot and the model that encodes its queries."""

    snapshot: Snapshot
    model: Any  # SSCQModel (eval mode)
    model_uri: str
    codebook_checksum: str
    image_size: int
    channels: int
    dim: int

    @property
    def name(self) -> str:
        return self.snapshot.name


class PartitionFailed(Exception):
    """No full answer: 503 (a partition failed), or 504 (one did not answer in time)."""

    def __init__(self, reason: str, status: int = 503):
        super().__init__(reason)
        self.status = status


def _json_error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def _web_file(name: str) -> str:
    return resources.files("sscq_dist.serving").joinpath("web", name).read_text()


@serve.deployment
@serve.ingress(web)
class SearchIngress:
    async def __init__(self, partitions: list[DeploymentHandle], index_root: str, cfg: Config,
                       model_uri: Optional[str] = None, token: Optional[Secret] = None):
        import torch

        self.cfg = cfg
        self.sv = cfg.serve
        self.token = token
        guard.install(self._guard_settings())
        torch.set_num_threads(self.sv.torch_threads)
        self.partitions = partitions
        self.root = storage.resolve(index_root, cfg.storage)
        self.model_override = model_uri
        self.thumbs = ThumbnailReader(cfg.storage, self.sv.thumb_max_chunk_bytes, self.sv.thumb_cache_mb,
                                      self.sv.thumb_size, cfg.data.max_image_pixels)
        self.last_error: Optional[str] = None
        self._refused: Optional[str] = None  # a CURRENT this replica refused (its reason is last_error)
        name = await asyncio.to_thread(read_current, self.root)
        if name is None:
            raise SSCQError(f"index root {self.root.uri} has no CURRENT; run a reindex first")
        self.pinned: Pinned = await asyncio.to_thread(self._pin, name, None)
        self.previous: Optional[Pinned] = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        metrics.set_serving(name, self.pinned.snapshot.generation)
        log.info("search ingress: serving %s (%d rows)", name, self.pinned.snapshot.total_rows)

    def reconfigure(self, user_config: dict) -> None:
        self.sv = apply_runtime(self.sv, user_config)
        self.thumbs.thumb_size = self.sv.thumb_size
        guard.install(self._guard_settings())

    def _guard_settings(self) -> guard.GuardSettings:
        sv = self.sv
        return guard.GuardSettings(self.token, sv.rate_limit_per_s, sv.rate_limit_burst, sv.max_in_flight,
                                   sv.request_timeout_s, sv.max_upload_bytes)

    # ---------------------------------------------------------------- snapshots and models

    def _pin(self, name: str, current: Optional[Pinned]) -> Pinned:
        """Read snapshot `name` and the model for it; refuse a model whose codebooks differ."""
        from sscq_dist.registry import load_model

        snap = read_snapshot(self.root, name)
        uri = self.model_override or snap.model_uri
        if current is not None and current.model_uri == uri and current.codebook_checksum == snap.codebook_checksum \
                and not self.model_override:
            model, image_size, channels, dim = current.model, current.image_size, current.channels, current.dim
        else:
            loaded = load_model(uri, self.cfg.tracking)
            check_codebooks(snap, loaded.codebooks)  # the query encoder must be the model that built the index
            model, dim = loaded.model, loaded.cfg.model.embedding_dim
            image_size, channels = loaded.cfg.data.image_size, loaded.cfg.data.channels
        return Pinned(snap, model, uri, snap.codebook_checksum, image_size, channels, dim)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.sv.watch_interval_s)
            try:
                await self._follow_current()
            except Exception as exc:  # keep serving the pinned snapshot; /healthz shows the error
                self.last_error = _reason(exc)
                log.error("search ingress: watcher: %s", self.last_error)

    async def _follow_current(self) -> None:
        name = await asyncio.to_thread(read_current, self.root)
        if name is None or name == self.pinned.name or name == self._refused:
            return
        t0 = time.perf_counter()
        try:
            new = await asyncio.to_thread(self._pin, name, self.pinned)
        except Exception as exc:
            self._refused, self.last_error = name, f"not serving {name}: {_reason(exc)}"
            log.error("search ingress: %s; still serving %s", self.last_error, self.pinned.name)
            return
        answers = await asyncio.gather(*[_awaitable(h.prepare.remote(name)) for h in self.partitions],
                                       return_exceptions=True)
        bad = [(i, a) for i, a in enumerate(answers) if isinstance(a, BaseException) or not a.get("ok")]
        if bad:
            i, a = bad[0]
            why = _reason(a) if isinstance(a, BaseException) else a["reason"]
            self.last_error = f"not serving {name} yet: partition {i + 1} cannot load it ({why})"
            log.error("search ingress: %s", self.last_error)
            return  # tried again next interval
        self.previous, self.pinned = self.pinned, new  # one assignment: the next request is pinned to `new`
        self.last_error = None
        metrics.SWAPS.inc()
        metrics.SWAP_SECONDS.observe(time.perf_counter() - t0)
        metrics.set_serving(name, new.snapshot.generation, previous=self.previous.name)
        log.info("search ingress: now serving %s (previous %s)", name, self.previous.name)

    # ---------------------------------------------------------------- fan-out

    async def _call_all(self, method: str, *args) -> list[dict]:
        """Every partition's answer to `method(*args)`; NotReady answers are returned, failures raise."""
        reasons = []
        for attempt in range(self.sv.partition_retries + 1):
            timeout = self.sv.partition_timeout_s
            waits = [_timed(i, asyncio.wait_for(_awaitable(getattr(h, method).remote(*args)), timeout))
                     for i, h in enumerate(self.partitions)]
            answers = await asyncio.gather(*waits, return_exceptions=True)
            failed = [(i, a) for i, a in enumerate(answers) if isinstance(a, BaseException)]
            if not failed:
                return answers
            i, exc = failed[0]
            late = isinstance(exc, asyncio.TimeoutError)
            why = f"did not answer within {self.sv.partition_timeout_s:g}s" if late else _reason(exc)
            reasons.append((f"partition {i + 1}/{len(self.partitions)} ({partition_name(i)}) "
                            f"{'too slow' if late else 'unavailable'} ({why})", 504 if late else 503))
            await asyncio.sleep(0.2 * (attempt + 1))
        raise PartitionFailed(*reasons[-1])

    async def _pinned_call(self, method: str, args_for) -> tuple[Pinned, list[dict]]:
        """Call every partition with the pinned snapshot; if one does not hold it yet, with the
        previous pin. Returns the pin that every partition answered for."""
        pins = [self.pinned] + ([self.previous] if self.previous is not None else [])
        not_ready = ""
        for pin in pins:
            answers = await self._call_all(method, pin.name, *(await args_for(pin)))
            missing = [a["reason"] for a in answers if not a.get("ok")]
            if not missing:
                return pin, answers
            not_ready = missing[0]
        raise PartitionFailed(not_ready)

    # ---------------------------------------------------------------- routes

    @web.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(_web_file("index.html"))

    @web.get("/app.js")
    async def script(self) -> Response:
        return Response(_web_file("app.js"), media_type="application/javascript")

    @web.get("/metrics")
    async def metrics_page(self) -> Response:
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    @web.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            answers = await self._call_all("status")
        except PartitionFailed as exc:
            return JSONResponse({"status": "unavailable", "version": self.pinned.name, "reason": str(exc)}, exc.status)
        lagging = [a["partition"] + 1 for a in answers if self.pinned.name not in a["held"]]
        body = {"status": "ok" if not lagging else "degraded", "version": self.pinned.name,
                "previous": self.previous.name if self.previous else None, "last_error": self.last_error,
                "partitions": answers}
        if lagging:
            body["reason"] = f"partition(s) {lagging} do not hold {self.pinned.name}"
        return JSONResponse(body, 200 if not lagging else 503)

    @web.get("/version")
    async def version(self) -> dict:
        snap = self.pinned.snapshot
        return {"version": snap.name, "model_version": snap.model_version, "generation": snap.generation,
                "model_uri": storage.redact_uri(self.pinned.model_uri), "rows": snap.total_rows,
                "parts": len(snap.parts), "partitions": len(self.partitions), "index_type": snap.index_type,
                "dim": self.pinned.dim, "default_k": self.sv.default_k, "max_k": self.sv.max_k}

    @web.get("/samples")
    async def samples(self, n: int = 6) -> JSONResponse:
        n = max(1, min(int(n), 24))
        try:
            pin, answers = await self._pinned_call("sample", lambda pin: _args(n))
        except PartitionFailed as exc:
            return _json_error(exc.status, str(exc))
        ids = [i for group in zip(*[a["ids"] for a in answers if a["ids"]]) for i in group]
        return JSONResponse({"version": pin.name, "ids": ids[:n]})

    @web.get("/thumb/{image_id}")
    async def thumb(self, image_id: str) -> Response:
        try:
            iid = int(image_id)
        except ValueError:
            return _json_error(422, f"id must be an integer, got {image_id[:40]!r}")
        try:
            pin, answers = await self._pinned_call("locate", lambda pin: _args([iid]))
        except PartitionFailed as exc:
            return _json_error(exc.status, str(exc))
        found = next((a["info"][0] for a in answers if a["info"][0] is not None), None)
        if found is None:
            return _json_error(404, f"id {iid} is not in snapshot {pin.name}")
        _, _, shard, etag, row_group, row = found
        try:  # one HEAD, then (on a cache miss) one column chunk of one row group, off the event loop
            th = await asyncio.to_thread(self.thumbs.thumbnail, shard, etag, int(row_group), int(row))
        except ShardChanged as exc:
            return _json_error(410, f"id {iid}: {exc}")
        except RowGroupTooLarge as exc:
            return _json_error(422, f"id {iid}: {exc}")
        except SSCQError as exc:
            return _json_error(404 if isinstance(exc, storage.NotFound) else 500, f"id {iid}: {exc}")
        return Response(th.png, media_type="image/png", headers={
            "Cache-Control": "public, max-age=3600", "X-Snapshot": pin.name,
            "X-Source-Bytes-Read": str(th.bytes_read)})

    @web.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                k = parse_k(request.query_params.get("k"), self.sv.default_k, self.sv.max_k)
                image = await self._read_upload(request)
                arr_for = lambda pin: decode_query_image(image, pin.image_size, pin.channels,  # noqa: E731
                                                         self.cfg.data.max_image_pixels, self.sv.max_upload_bytes)
                embed = True
            elif ctype.startswith("application/json") or not ctype:
                obj = await asyncio.to_thread(read_json, await request.body())  # parsed once, off the event loop
                arr_for = lambda pin: json_query(obj, pin.dim, self.sv.default_k,  # noqa: E731
                                                 self.sv.max_k, request.query_params.get("k"))
                embed = False
                k = arr_for(self.pinned)[1]
            else:
                raise BadRequest(415, f"content type {ctype.split(';')[0]!r}: send multipart/form-data with an "
                                      "'image' field, or JSON {\"embedding\": [...]}")

            async def args_for(pin: Pinned):
                if embed:  # decoding a large upload and the forward pass both stay off the event loop
                    arr = await asyncio.to_thread(arr_for, pin)
                    q = await asyncio.to_thread(_embed, pin.model, arr)
                else:
                    q = arr_for(pin)[0]
                return q, k

            pin, answers = await self._pinned_call("search", args_for)
        except BadRequest as exc:
            return _json_error(exc.status, exc.reason)
        except PartitionFailed as exc:
            return _json_error(exc.status, str(exc))
        results = await asyncio.to_thread(self._merge, answers, k)
        metrics.ROWS.inc(len(results))
        return JSONResponse({"version": pin.name, "k": k, "results": results,
                             "took_ms": round(1000 * (time.perf_counter() - t0), 2)})

    async def _read_upload(self, request: Request) -> bytes:
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=self.sv.max_upload_bytes)
        except BodyTooLarge:
            raise  # the guard answers 413
        except Exception as exc:
            raise BadRequest(400, f"multipart body does not parse ({_reason(exc)})") from None
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise BadRequest(400, "multipart body has no file field 'image'")
        data = await field.read(self.sv.max_upload_bytes + 1)
        if len(data) > self.sv.max_upload_bytes:
            raise BadRequest(413, f"image is larger than the limit of {self.sv.max_upload_bytes} bytes")
        return data

    def _merge(self, answers: list[dict], k: int) -> list[dict]:
        """Merged top-k of the partitions, with uri and label of each result (from the parts)."""
        d, ids = merge_topk([a["distances"] for a in answers], [a["ids"] for a in answers], k)
        info = {}
        for a in answers:
            for i, inf in zip(a["ids"].ravel().tolist(), a["info"]):
                if i >= 0:
                    info[i] = inf
        out = []
        for dist, i in zip(d[0].tolist(), ids[0].tolist()):
            if i < 0:
                continue
            uri, label = info[i][:2]
            out.append({"id": i, "distance": dist, "uri": uri, "label": label})
        return out
