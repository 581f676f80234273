"""Promotion's commit, held at the step between recording the decision and moving the alias.

A `pause` failpoint (sscq_dist/failpoints.py) stops `commit` right after the decision run and
the version tags are written; the test looks at the real SQLite MLflow store there, or moves
the alias as a concurrent promotion would, then releases it. No scoring: the decision is
given, so these tests need registered versions only, not trained models.
"""

from __future__ import annotations

import threading

import pytest

from conftest import REPO
from fault_helpers import Pause, promotion_writes
from sscq_dist.promotion import Decision, PromotionConflict, commit
from sscq_dist.registry import CHAMPION, alias_version

NAME = "sscq-commit"


@pytest.fixture
def registry(mlflow_sqlite, tmp_path):
    """Three registered versions of NAME, `champion` on v1, and the config pointing at the store."""
    import os

    from mlflow.tracking import MlflowClient

    from sscq_dist.config import load_config

    client = MlflowClient(mlflow_sqlite, registry_uri=mlflow_sqlite)
    client.create_registered_model(NAME)
    source = tmp_path / "model"
    source.mkdir()
    versions = [str(client.create_model_version(NAME, str(source)).version) for _ in range(3)]
    client.set_registered_model_alias(NAME, CHAMPION, versions[0])
    cfg = load_config(os.path.join(REPO, "configs", "digits.yaml"), [f"tracking.tracking_uri={mlflow_sqlite}"])
    return cfg, client, versions


def _commit_in_thread(d: Decision, cfg, pause: Pause, monkeypatch) -> tuple[threading.Thread, list]:
    """Run commit(d) in a thread that stops at the pause; returns (thread, [its exception])."""
    monkeypatch.setenv("SSCQ_FAILPOINTS", pause.spec)
    raised: list = []

    def run():
        try:
            commit(d, NAME, cfg)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    pause.reached(timeout=120, alive=t.is_alive)
    return t, raised


def test_alias_is_the_last_write(registry, tmp_path, monkeypatch):
    """When the alias moves, the decision run and the version tags are already written, and
    nothing is written after it: a failure anywhere before leaves `champion` where it was."""
    cfg, client, (v1, v2, _) = registry
    uri = cfg.tracking.tracking_uri
    d = Decision(True, "test: better", v2, v1, 0.5, 0.4)
    pause = Pause(tmp_path / "fp", "promote.recorded")
    t, raised = _commit_in_thread(d, cfg, pause, monkeypatch)
    runs, tags, champ = promotion_writes(uri, NAME, v2)
    assert champ == v1, "the alias moved before the decision was recorded"
    assert len(runs) == 1 and tags["promotion.decision"] == "promoted" and tags["promotion.champion_version"] == v1
    pause.release()
    t.join(timeout=120)
    assert not t.is_alive() and raised == []
    assert promotion_writes(uri, NAME, v2) == (runs, tags, v2)  # only the alias changed after the pause


def test_second_reread_refuses_a_move_during_recording(registry, tmp_path, monkeypatch):
    """Another promotion moves `champion` while this one records its decision: the re-read
    right before the alias move sees it, the alias stays where the other one put it, and the
    version's tag says aborted (not promoted)."""
    cfg, client, (v1, v2, v3) = registry
    pause = Pause(tmp_path / "fp", "promote.recorded")
    t, raised = _commit_in_thread(Decision(True, "test: better", v2, v1, 0.5, 0.4), cfg, pause, monkeypatch)
    client.set_registered_model_alias(NAME, CHAMPION, v3)  # the concurrent promotion
    pause.release()
    t.join(timeout=120)
    assert not t.is_alive() and len(raised) == 1 and isinstance(raised[0], PromotionConflict), raised
    assert f"moved from v{v1} to v{v3}" in str(raised[0])
    assert alias_version(NAME, CHAMPION) == v3
    assert client.get_model_version(NAME, v2).tags["promotion.decision"] == "aborted"
