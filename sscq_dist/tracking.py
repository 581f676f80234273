"""MLflow tracking: where runs go, and logging that survives a tracking-server outage.

Training must not stop because the tracking server is down: `RunLogger` retries each call a
bounded number of times, then keeps the metrics in memory, warns once, and flushes them
when the server answers again.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from sscq_dist.config import Config, TrackingConfig

log = logging.getLogger(__name__)

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# Secrets never go to MLflow: params whose key contains one of these are dropped.
SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential")


def tracking_uri(cfg: Optional[TrackingConfig] = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    uri = (cfg.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{os.path.abspath(DEFAULT_DB)}"


def absolute_store_uri(uri: str) -> str:
    """`sqlite:///relative.db` -> `sqlite:////<cwd>/relative.db` (other URIs unchanged), so a
    process with another working directory opens the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def metric_key(name: str) -> str:
    """MLflow allows only [A-Za-z0-9_-. :/] in metric names: `precision@10` -> `precision_at_10`."""
    return name.replace("@", "_at_")


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def configure(cfg: Optional[TrackingConfig] = None) -> str:
    """Point the mlflow client at the tracking URI; returns it."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, uri: str) -> str:
    """Experiment id, creating it with an absolute artifact root for local stores.

    A relative artifact root would follow each process's working directory (Ray workers,
    job working dirs), so local stores get `<cwd>/mlartifacts` spelled out.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = None
    if is_local_store(uri):
        loc = "file://" + os.path.abspath(DEFAULT_ARTIFACTS)
    try:
        return mlflow.create_experiment(name, artifact_location=loc)
    except Exception:  # created concurrently by another process
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def safe_params(cfg: Config) -> dict[str, str]:
    """The resolved config as flat MLflow params, minus anything that looks like a secret."""
    out = {}
    for k, v in cfg.flat().items():
        if any(m in k.lower() for m in SECRET_MARKERS):
            continue
        out[k] = "" if v is None else str(v)[:500]
    return out


@contextmanager
def _single_http_try(timeout_s: int) -> Iterator[None]:
    """MLflow's client retries a refused connection for minutes by default (7 retries with
    exponential backoff); inside this block each request is tried once with a short timeout,
    so the caller's own bounded retries decide. Process-wide env: use only where no other
    thread talks to MLflow (the rank-0 training worker)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Metric holding how many metric values the logger dropped (buffer full during an outage).
DROPPED_METRIC = "tracking/dropped_metrics"


class RunLogger:
    """Logs metrics to one MLflow run with retries and an in-memory buffer during outages.

    Training never waits long on tracking: a call makes up to max_attempts tries (backoff
    backoff_s, 2 x backoff_s, ...), each one HTTP request with request_timeout_s; once an
    outage is known every call makes a single try, and the values wait in a buffer of at
    most max_buffer. Past it the oldest are dropped: one warning, and their count is logged
    as the metric `tracking/dropped_metrics` when the server answers again.

    once_prefix: keys logged at most once per step in the run, across loggers. A worker
    group restarted from a checkpoint, or a rerun driver, redoes the epochs after it; the
    epochs the run already shows are not logged a second time.
    """

    def __init__(self, uri: str, run_id: str, max_attempts: int = 3, backoff_s: float = 0.5,
                 max_buffer: int = 100_000, request_timeout_s: int = 10, once_prefix: Optional[str] = "epoch/"):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_buffer = max_buffer
        self.request_timeout_s = request_timeout_s
        self.once_prefix = once_prefix
        self.buffer: list = []
        self.warned = False
        self.failures = 0
        self.tries = 0  # HTTP tries made (each log_batch request counts once)
        self.dropped = 0  # values dropped from a full buffer
        self._dropped_sent = 0
        self._logged_steps: dict[str, set] = {}

    def _send(self, metrics: list) -> bool:
        attempts = 1 if self.warned else self.max_attempts
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.tries += 1
            try:
                with _single_http_try(self.request_timeout_s):
                    for i in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
                        self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)
                return True
            except Exception as exc:  # any transport/server error: retry, then buffer
                last = exc
        self.failures += 1
        if not self.warned:
            log.warning("MLflow tracking unreachable (%s); buffering metrics in memory and continuing",
                        type(last).__name__)
            self.warned = True
        return False

    def _already_logged(self, key: str, step: int) -> bool:
        """Whether the run already holds `key` at `step` (keys under once_prefix only)."""
        if not self.once_prefix or not key.startswith(self.once_prefix):
            return False
        if key not in self._logged_steps:
            known: set = set()
            if not self.warned:  # during an outage, never wait on a lookup
                try:
                    with _single_http_try(self.request_timeout_s):
                        known = {m.step for m in self.client.get_metric_history(self.run_id, key)}
                except Exception:  # noqa: BLE001 - unknown: log it (at worst twice) rather than lose it
                    pass
            self._logged_steps[key] = known
        steps = self._logged_steps[key]
        if step in steps:
            return True
        steps.add(step)
        return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        fresh = {k: v for k, v in metrics.items() if not self._already_logged(k, step)}
        if len(fresh) < len(metrics):
            log.info("step %d: %d metric(s) under '%s' already logged by an earlier attempt of this run; "
                     "not logged again", step, len(metrics) - len(fresh), self.once_prefix)
        self.buffer.extend(Metric(k, float(v), ts, step) for k, v in fresh.items())
        if len(self.buffer) > self.max_buffer:
            over = len(self.buffer) - self.max_buffer
            if not self.dropped:
                log.warning("MLflow metric buffer full (%d values): dropping the oldest; the count goes to the "
                            "metric %s once the server answers", self.max_buffer, DROPPED_METRIC)
            self.dropped += over
            self.buffer = self.buffer[over:]
        self.flush()

    def flush(self) -> bool:
        if not self.buffer:
            return True
        from mlflow.entities import Metric

        pending, self.buffer = self.buffer, []
        count = []
        if self.dropped > self._dropped_sent:
            count = [Metric(DROPPED_METRIC, float(self.dropped), int(time.time() * 1000), pending[-1].step)]
        if self._send(pending + count):
            if self.warned:
                log.warning("MLflow tracking reachable again; flushed %d buffered metrics", len(pending))
                self.warned = False
            if count:
                log.warning("%d metric values were dropped while MLflow tracking was unreachable (metric %s)",
                            self.dropped - self._dropped_sent, DROPPED_METRIC)
                self._dropped_sent = self.dropped
            return True
        self.buffer = pending + self.buffer
        return False

    def close(self, wait_s: float) -> bool:
        """End of training: keep trying to deliver buffered metrics for up to wait_s seconds,
        so an outage that ends shortly after the last step loses nothing."""
        deadline = time.time() + wait_s
        while not self.flush():
            left = deadline - time.time()
            if left <= 0:
                log.warning("MLflow tracking still unreachable; %d buffered metric values were not logged "
                            "(%d dropped before)", len(self.buffer), self.dropped)
                return False
            time.sleep(min(4 * self.backoff_s, left))
        return True
