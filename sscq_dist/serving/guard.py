"""The one place where every request to the ingress is admitted, limited and counted.

`ServiceGuard` is an ASGI middleware on the FastAPI app. In order, a request
  1. is counted in the metrics (route template, status, latency) whatever happens below;
  2. passes the per-client token bucket or gets 429 + Retry-After (/healthz is exempt);
  3. carries the bearer token or gets 401 (/healthz and the page's static files are open);
  4. finds room among `serve.max_in_flight` requests of this replica or gets 503 + Retry-After
     (never an unbounded wait);
  5. has its body counted while it streams: past the limit, reading stops and it gets 413;
  6. finishes within `serve.request_timeout_s` or gets 504.
The ingress replica installs its settings with `install` (and again on reconfigure); the
middleware reads them per request, so the app object itself carries no state.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Optional

from sscq_dist.serving import metrics
from sscq_dist.serving.auth import OPEN_PATHS, Secret, check_bearer
from sscq_dist.serving.limits import MULTIPART_OVERHEAD, BodyTooLarge, TokenBucket, client_key, limited_receive, \
    retry_after


@dataclass
class GuardSettings:
    token: Optional[Secret]
    rate_limit_per_s: float
    rate_limit_burst: int
    max_in_flight: int
    request_timeout_s: float
    max_upload_bytes: int

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes + MULTIPART_OVERHEAD


class Guard:
    """Settings plus the state they need (buckets, requests in flight) of one replica."""

    def __init__(self, settings: GuardSettings):
        self.settings = settings
        self.bucket = TokenBucket(settings.rate_limit_per_s, settings.rate_limit_burst)
        self.in_flight = 0

    def update(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.bucket.rate, self.bucket.burst = settings.rate_limit_per_s, settings.rate_limit_burst

    def admit(self, scope: dict, path: str) -> Optional[tuple[int, str, dict]]:
        """None when the request may run, else (status, reason, headers)."""
        s = self.settings
        if path != "/healthz":
            wait = self.bucket.take(client_key(scope))
            if wait > 0:
                metrics.RATE_LIMITED.inc()
                return 429, f"rate limit of {s.rate_limit_per_s:g} requests/s per client exceeded " \
                            f"(burst {s.rate_limit_burst})", {"retry-after": retry_after(wait)}
        if s.token is not None and path not in OPEN_PATHS:
            why = check_bearer(_header(scope, b"authorization"), s.token)
            if why is not None:
                metrics.REJECTED.labels("auth").inc()
                return 401, why, {"www-authenticate": 'Bearer realm="sscq-search"'}
        length = _header(scope, b"content-length")
        if length and length.isdigit() and int(length) > s.max_body_bytes:
            metrics.REJECTED.labels("body").inc()
            return 413, f"request body is {length} bytes, above the limit of {s.max_body_bytes}", {}
        if self.in_flight >= s.max_in_flight:
            metrics.REJECTED.labels("queue").inc()
            return 503, f"busy: {self.in_flight} requests in flight on this replica (limit {s.max_in_flight})", \
                {"retry-after": "1"}
        return None


_INSTALLED: Optional[Guard] = None


def install(settings: GuardSettings) -> Guard:
    """Make `settings` the ones this process's middleware applies (keeps buckets on an update)."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = Guard(settings)
    else:
        _INSTALLED.update(settings)
    return _INSTALLED


def installed() -> Optional[Guard]:
    return _INSTALLED


def _header(scope: dict, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _respond(send, status: int, reason: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"error": reason}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if status == 413:
        raw.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ServiceGuard:
    """ASGI middleware applying the installed Guard (pass-through until one is installed)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        guard = _INSTALLED
        if scope["type"] != "http" or guard is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        t0 = time.perf_counter()
        status: list[Optional[int]] = [None]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        s = guard.settings
        try:
            refusal = guard.admit(scope, path)
            if refusal is not None:
                await _respond(send_counted, *refusal)
                return
            guard.in_flight += 1
            try:
                await asyncio.wait_for(self.app(scope, limited_receive(receive, s.max_body_bytes), send_counted),
                                       s.request_timeout_s)
            except BodyTooLarge as exc:
                metrics.REJECTED.labels("body").inc()
                if status[0] is None:
                    await _respond(send_counted, 413, str(exc))
            except asyncio.TimeoutError:
                metrics.REJECTED.labels("deadline").inc()
                if status[0] is None:
                    await _respond(send_counted, 504, f"request did not finish within the deadline of "
                                                      f"{s.request_timeout_s:g}s (serve.request_timeout_s)")
            finally:
                guard.in_flight -= 1
        finally:
            route = metrics.route_of(path)
            metrics.REQUESTS.labels(route, str(status[0] or 500)).inc()
            metrics.LATENCY.labels(route).observe(time.perf_counter() - t0)
