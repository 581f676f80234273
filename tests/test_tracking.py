"""MLflow tracking (sscq_dist/tracking.py): the training logger's tries, its bounded buffer
and what it drops, and epochs logged once per step when a run is resumed."""

import logging

from sscq_dist.tracking import DROPPED_METRIC, RunLogger


def _run(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("tracking-test")
    return client, client.create_run(exp).info.run_id


def test_outage_tries_then_buffers_and_counts_what_it_drops(mlflow_sqlite, caplog):
    """A store that refuses the run's writes (a deleted run) is a real failing store: the first
    call makes max_attempts tries, later ones one each; past max_buffer the oldest values
    are dropped with one warning, and their count is logged once the store takes writes."""
    client, run_id = _run(mlflow_sqlite)
    client.delete_run(run_id)
    caplog.set_level(logging.WARNING, logger="sscq_dist.tracking")
    logger = RunLogger(mlflow_sqlite, run_id, max_attempts=3, backoff_s=0.01, max_buffer=10)
    logger.log_metrics({"a": 0.0, "b": 0.0}, step=0)
    assert logger.tries == 3 and logger.warned
    for step in range(1, 11):
        logger.log_metrics({"a": float(step), "b": float(step)}, step=step)
    assert logger.tries == 3 + 10  # one try per call once the outage is known
    assert logger.dropped == 22 - 10 and len(logger.buffer) == 10
    full = [r.getMessage() for r in caplog.records if "buffer full" in r.getMessage()]
    assert len(full) == 1 and DROPPED_METRIC in full[0]
    client.restore_run(run_id)
    assert logger.flush()
    assert client.get_run(run_id).data.metrics[DROPPED_METRIC] == 12
    # The newest 10 values were kept: steps 6..10 of both keys.
    assert sorted(m.step for m in client.get_metric_history(run_id, "a")) == list(range(6, 11))
    assert any("12 metric values were dropped" in r.getMessage() for r in caplog.records)


def test_epochs_are_logged_once_per_step_across_restarted_loggers(mlflow_sqlite):
    """A worker group restarted from a checkpoint redoes the epochs after it: its new logger
    does not log an epoch the run already shows; per-step metrics are not affected."""
    client, run_id = _run(mlflow_sqlite)
    first = RunLogger(mlflow_sqlite, run_id)
    for step in (10, 20):
        first.log_metrics({"epoch/loss": step + 0.5, "loss": 1.0}, step=step)
    restarted = RunLogger(mlflow_sqlite, run_id)  # resumed from the checkpoint at step 10
    for step in (20, 30):
        restarted.log_metrics({"epoch/loss": step + 0.25, "loss": 2.0}, step=step)
    epochs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "epoch/loss"))
    assert epochs == [(10, 10.5), (20, 20.5), (30, 30.25)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [10, 20, 20, 30]
