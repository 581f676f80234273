"""Prometheus metrics of an ingress replica (served at /metrics, behind the token).

One registry per process (a replica is a process), so Ray's own collectors never mix in.
Route labels are the route templates (`/thumb/{id}`), never raw paths: the label set stays
bounded whatever clients send.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("sscq_requests", "HTTP requests answered, by route and status", ["route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("sscq_request_seconds", "Request latency at the ingress, by route", ["route"],
                    buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PARTITION_LATENCY = Histogram("sscq_partition_seconds", "Latency of one partition call, by partition",
                              ["partition"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PARTITION_FAILURES = Counter("sscq_partition_failures", "Partition calls that failed, by partition and kind "
                             "(timeout, error)", ["partition", "kind"], registry=REGISTRY)
GENERATION = Gauge("sscq_generation", "Generation of the snapshot this replica serves", registry=REGISTRY)
SERVING = Gauge("sscq_serving_snapshot", "1 for the snapshot name this replica serves", ["version"],
                registry=REGISTRY)
SWAPS = Counter("sscq_swaps", "Snapshot swaps completed by this replica", registry=REGISTRY)
SWAP_SECONDS = Histogram("sscq_swap_seconds", "From seeing a new CURRENT to serving it (model load + every "
                         "partition prepared)", buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
ROWS = Counter("sscq_rows_served", "Result rows returned by /search", registry=REGISTRY)
RATE_LIMITED = Counter("sscq_rate_limited", "Requests refused by the per-client rate limit (429)", registry=REGISTRY)
REJECTED = Counter("sscq_rejected", "Requests refused before any work, by reason (auth, body, queue, deadline)",
                   ["reason"], registry=REGISTRY)

ROUTES = ("/", "/app.js", "/healthz", "/version", "/samples", "/search", "/metrics")


def route_of(path: str) -> str:
    """The bounded route label of a request path."""
    if path in ROUTES:
        return path
    if path.startswith("/thumb/"):
        return "/thumb/{id}"
    return "other"


def set_serving(name: str, generation: int, previous: str | None = None) -> None:
    if previous is not None:
        try:
            SERVING.remove(previous)
        except KeyError:
            pass
    SERVING.labels(name).set(1)
    GENERATION.set(generation)


def exposition() -> tuple[bytes, str]:
    """The scrape body and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
