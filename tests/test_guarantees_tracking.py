"""The training logger during a tracking outage, counted where it matters: the requests a real
`mlflow server` received (a transparent counting proxy in front of it), not the logger's own
counter. The server is up and refuses the run's writes (the run is deleted), so every try
reaches it; restoring the run ends the outage."""

from __future__ import annotations

import pytest

from conftest import free_port
from fault_helpers import CountingProxy, MlflowServer
from sscq_dist.tracking import DROPPED_METRIC, RunLogger

LOG_BATCH = ("POST", "/api/2.0/mlflow/runs/log-batch")


@pytest.fixture
def proxied_server(tmp_path):
    server = MlflowServer(str(tmp_path / "mlflow"), free_port()).start(timeout=300)
    proxy = CountingProxy(server.uri)
    yield proxy
    proxy.close()
    server.kill()


def test_outage_requests_the_server_received(proxied_server):
    """First call: max_attempts requests; each later call: one; the end of the outage: one
    request delivers the whole buffer (newest max_buffer values plus the dropped count)."""
    from mlflow.tracking import MlflowClient

    proxy = proxied_server
    client = MlflowClient(proxy.url)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    client.delete_run(run_id)
    logger = RunLogger(proxy.url, run_id, max_attempts=3, backoff_s=0.01, max_buffer=10)
    logger.log_metrics({"a": 0.0, "b": 0.0}, step=0)
    assert proxy.count(*LOG_BATCH) == 3
    for step in range(1, 11):
        logger.log_metrics({"a": float(step), "b": float(step)}, step=step)
    assert proxy.count(*LOG_BATCH) == 3 + 10
    assert client.get_metric_history(run_id, "a") == []  # refused: nothing was stored
    client.restore_run(run_id)
    assert logger.flush()
    assert proxy.count(*LOG_BATCH) == 3 + 10 + 1
    assert sorted(m.step for m in client.get_metric_history(run_id, "a")) == list(range(6, 11))
    assert client.get_run(run_id).data.metrics[DROPPED_METRIC] == 12
