"""Request limits of the search service: streamed body size, per-client token bucket.

Both are plain objects the guard middleware (guard.py) applies; the decoded-pixel limit is
checked from the image header in api.decode_query_image and `k` in api.parse_k.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Optional

# Room for the multipart framing around an image of serve.max_upload_bytes.
MULTIPART_OVERHEAD = 65536


class BodyTooLarge(Exception):
    """The request body passed the limit while it was being read."""

    def __init__(self, limit: int):
        super().__init__(f"request body is larger than the limit of {limit} bytes")
        self.limit = limit


def limited_receive(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` that raises BodyTooLarge once more than `limit` body bytes arrived, so a
    chunked upload without Content-Length is never read (or held) past the limit."""
    seen = 0

    async def receive_limited() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited


class TokenBucket:
    """Per-client token buckets: `rate` requests/s sustained, `burst` at once.

    `take(client)` returns 0.0 when the request may go, else the seconds until it may (the
    Retry-After). At most `max_clients` buckets are kept (least recently seen dropped first),
    so a flood of distinct addresses cannot grow memory."""

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000, clock=time.monotonic):
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, time)

    def take(self, client: str) -> float:
        now = self.clock()
        tokens, then = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def client_key(scope: dict) -> str:
    client: Optional[tuple] = scope.get("client")
    return str(client[0]) if client else "unknown"
