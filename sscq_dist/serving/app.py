"""The search service as a Ray Serve application (SPEC section 7).

    HTTP -> SearchIngress (FastAPI via @serve.ingress): decode + encode the query with the
            snapshot's model, pin ONE snapshot name for the request, fan out through
            DeploymentHandles, merge the partitions' top-k (label and uri come from the parts:
            a search never reads the source bucket; /thumb reads one row group of one column)
         -> Partition0 .. Partition{P-1} (one deployment each, `replicas_per_partition`
            replicas): a share of the parts merged into one in-memory index (partition.py)

Both kinds of replica watch CURRENT (holder.py / the ingress watcher). The ingress moves its
pin to a new snapshot only after every partition answered `prepare` for it and the query
encoder's codebook checksum matched it; a replica that does not hold the pinned name yet
answers 'not ready', and the ingress then answers from the previous pin, so no answer mixes
snapshots and no request fails during a swap. A partition that fails (a replica died) makes
the request a 503 with the reason: an answer never silently omits a partition.

`build_app(args)` is the Serve application builder (`serve run` / `serve deploy`, see
configs/serve.yaml); `start_local` is what jobs/serve.py, the demo and the tests call.
"""

# No `from __future__ import annotations`: Serve ships the ingress class by value, and FastAPI
# must see real annotations (a string 'Request' would not resolve in the replica).
import asyncio
import dataclasses
import logging
import os
import threading
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
from sscq_dist.config import Config, ServeConfig, load_config, validate_serve
from sscq_dist.errors import SSCQError
from sscq_dist.indexing.formats import Snapshot, check_codebooks, read_current, read_snapshot
from sscq_dist.search import merge_topk
from sscq_dist.serving import guard, metrics
from sscq_dist.serving.api import BadRequest, decode_query_image, json_query, parse_k, read_json
from sscq_dist.serving.auth import Secret, decide_auth, load_token
from sscq_dist.serving.holder import NotReady, SnapshotHolder
from sscq_dist.serving.limits import BodyTooLarge
from sscq_dist.serving.rows import RowGroupTooLarge, ShardChanged, ThumbnailReader
from sscq_dist.tracking import absolute_store_uri, tracking_uri

log = logging.getLogger(__name__)

APP_NAME = "sscq-search"
INGRESS_NAME = "SearchIngress"
# ServeConfig fields that are the deployments' user_config (changed at run time by reconfigure).
RUNTIME_FIELDS = ("watch_interval_s", "retain_previous_s", "default_k", "max_k", "nprobe", "partition_timeout_s",
                  "partition_retries", "max_upload_bytes", "thumb_size", "rate_limit_per_s", "rate_limit_burst",
                  "max_in_flight", "request_timeout_s")


def partition_name(number: int) -> str:
    return f"Partition{number}"


def runtime_settings(sv: ServeConfig) -> dict:
    return {f: getattr(sv, f) for f in RUNTIME_FIELDS}


def apply_runtime(sv: ServeConfig, user_config: Optional[dict]) -> ServeConfig:
    """The serve settings with a user_config applied; unknown keys or bad values are one error line."""
    unknown = set(user_config or {}) - set(RUNTIME_FIELDS)
    if unknown:
        raise SSCQError(f"serve user_config: unknown key(s) {sorted(unknown)} (run-time keys: {', '.join(RUNTIME_FIELDS)})")
    return validate_serve(dataclasses.replace(sv, **(user_config or {})))


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    from sscq_dist.encoding import embed_images

    return np.ascontiguousarray(embed_images(model, np.array(image[None])), np.float32)



# --------------------------------------------------------------------------- partitions


@serve.deployment
class PartitionServer:
    """One partition of whatever snapshot a request names (see holder.py)."""

    async def __init__(self, number: int, of: int, index_root: str, cfg: Config):
        import faiss

        self.sv = cfg.serve
        faiss.omp_set_num_threads(self.sv.search_threads)
        self.holder = SnapshotHolder(storage.resolve(index_root, cfg.storage), number, of, self.sv.cache_dir,
                                     self.sv.nprobe, self.sv.retain_previous_s,
                                     cache_max_bytes=self.sv.cache_max_bytes)
        await asyncio.to_thread(self.holder.load_current)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def reconfigure(self, user_config: dict) -> None:
        self.sv = apply_runtime(self.sv, user_config)
        self.holder.retain_previous_s = self.sv.retain_previous_s
        if self.sv.nprobe is not None and self.sv.nprobe != self.holder.nprobe:
            from sscq_dist.indexing.faiss_index import set_nprobe

            self.holder.nprobe = self.sv.nprobe
            for part in list(self.holder._held.values()):
                if part.index is not None:
                    set_nprobe(part.index, self.sv.nprobe)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.sv.watch_interval_s)
            try:
                await asyncio.to_thread(self.holder.load_current)
            except Exception as exc:  # keep serving what is held; the error shows in status()
                self.holder.last_error = _reason(exc)
                log.error("partition %d/%d: watcher: %s", self.holder.number + 1, self.holder.of, self.holder.last_error)

    def _load_in_background(self, name: str) -> None:
        threading.Thread(target=self._load_quietly, args=(name,), daemon=True).start()

    def _load_quietly(self, name: str) -> None:
        try:
            self.holder.load(name)
        except Exception:
            pass  # recorded by the holder; the next request for it reports the reason

    # Sync methods run in Serve's thread pool; FAISS releases the GIL while it scans.
    def search(self, name: str, queries: np.ndarray, k: int) -> dict:
        try:
            part = self.holder.get(name, self._load_in_background)
        except NotReady as exc:
            return {"ok": False, "reason": str(exc)}
        hits = part.search(queries, k)
        infos = part.row_info(hits.positions)
        return {"ok": True, "distances": hits.distances, "ids": hits.ids, "info": [i.as_tuple() for i in infos]}

    def locate(self, name: str, ids: list[int]) -> dict:
        try:
            part = self.holder.get(name, self._load_in_background)
        except NotReady as exc:
            return {"ok": False, "reason": str(exc)}
        pos = part.positions_of(np.asarray(ids, np.int64))
        return {"ok": True, "info": [i.as_tuple() if p >= 0 else None for p, i in zip(pos.tolist(), part.row_info(pos))]}

    def sample(self, name: str, n: int) -> dict:
        try:
            part = self.holder.get(name, self._load_in_background)
        except NotReady as exc:
            return {"ok": False, "reason": str(exc)}
        if part.ntotal == 0:
            return {"ok": True, "ids": []}
        pos = np.unique(np.linspace(0, part.ntotal - 1, num=min(n, part.ntotal)).astype(np.int64))
        return {"ok": True, "ids": part.ids[pos].tolist()}

    def prepare(self, name: str) -> dict:
        """Load `name` beside what serves (the ingress calls this before it moves its pin)."""
        try:
            part = self.holder.load(name)
        except Exception as exc:
            return {"ok": False, "reason": _reason(exc)}
        return {"ok": True, "rows": part.ntotal}

    def status(self) -> dict:
        s = self.holder.status()
        return {"partition": self.holder.number, "current": s.current, "held": s.held, "loading": s.loading,
                "rows": s.rows, "last_error": s.last_error}

    def memory(self, name: str) -> dict:
        """Bytes held for `name` by structure, and this process's resident set (benchmarks)."""
        import psutil

        part = self.holder.get(name, self._load_in_background)
        return {**part.resident_bytes(), "rss": psutil.Process().memory_info().rss, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()


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


# --------------------------------------------------------------------------- building and running


def build_application(index_root: str, cfg: Config, model_uri: Optional[str] = None,
                      token: Optional[Secret] = None):
    """The bound application: P partition deployments and the ingress that fans out to them
    (the ingress enforces `token` when one is given; see auth.py)."""
    sv = cfg.serve
    storage.validate_uri(index_root)
    if not storage.resolve(index_root, cfg.storage).is_s3:
        index_root = os.path.abspath(index_root)  # replicas need not share the caller's working directory
    if sv.cache_dir and "://" not in sv.cache_dir:
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(sv, cache_dir=os.path.abspath(sv.cache_dir)))
        sv = cfg.serve
    # The ingress loads the query encoder from the registry: resolve the store here, not in the replica's cwd.
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, tracking_uri=absolute_store_uri(tracking_uri(cfg.tracking))))
    health = {"health_check_period_s": sv.health_check_period_s, "health_check_timeout_s": sv.health_check_timeout_s}
    runtime = runtime_settings(sv)
    parts = [PartitionServer.options(name=partition_name(i), num_replicas=sv.replicas_per_partition,
                                     ray_actor_options={"num_cpus": sv.partition_cpus}, user_config=runtime,
                                     max_ongoing_requests=32, **health).bind(i, sv.partitions, index_root, cfg)
             for i in range(sv.partitions)]
    return SearchIngress.options(name=INGRESS_NAME, num_replicas=sv.ingress_replicas,
                                 ray_actor_options={"num_cpus": sv.ingress_cpus}, user_config=runtime,
                                 max_ongoing_requests=max(100, sv.max_in_flight + 8),  # room for the guard's 503s
                                 max_queued_requests=sv.max_queued_requests,
                                 **health).bind(parts, index_root, cfg, model_uri, token)


def build_app(args: dict):
    """Serve application builder: `serve run sscq_dist.serving.app:build_app index_root=...`, or
    `import_path` in a Serve config file. args: index_root (required), config (YAML path,
    default configs/digits.yaml), model (optional model URI), overrides (list of key=value)."""
    args = dict(args or {})
    if not args.get("index_root"):
        raise SSCQError("build_app: 'index_root' is required (the index root URI to serve)")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(_local_path(args.get("config") or "configs/digits.yaml"), list(overrides))
    # Serve's http_options hold the bind, not this builder: serve.host must name it (0.0.0.0 on Kubernetes).
    token = decide_auth(cfg.serve.host, load_token(cfg.serve.token_file), cfg.serve.insecure_no_auth)
    return build_application(_local_path(args["index_root"]), cfg, args.get("model") or None, token)


def _local_path(path: str) -> str:
    """A relative local path as given when it exists in the working directory, else relative to
    the checkout that holds sscq_dist (Serve may build the app in a process started elsewhere)."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(checkout, path)


def start_local(index_root: str, cfg: Config, model_uri: Optional[str] = None, host: Optional[str] = None,
                port: Optional[int] = None, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy the service on the connected Ray (Serve's HTTP proxy on host:port); returns its URL.

    Returns once every replica is up (each loaded its partition of CURRENT). A non-loopback
    host needs a token (SSCQ_SERVE_TOKEN or serve.token_file) unless serve.insecure_no_auth."""
    host = host or cfg.serve.host
    port = int(port or cfg.serve.port)
    token = decide_auth(host, load_token(cfg.serve.token_file), cfg.serve.insecure_no_auth)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(index_root, cfg, model_uri, token), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}/"
