"""Promotion gate: better promotes, worse and ties are rejected, errors never touch the alias."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from sscq_dist.model import build_model
from sscq_dist.promotion import EXIT_ERROR, EXIT_PROMOTED, EXIT_REJECTED, decide, promote
from sscq_dist.registry import CHAMPION, alias_version, load_model, log_and_register


def test_decide_rule():
    assert decide(0.5, None, 0.0) == (True, "no champion yet")
    assert decide(0.6, 0.5, 0.0)[0] and not decide(0.5, 0.5, 0.0)[0] and not decide(0.4, 0.5, 0.0)[0]
    assert decide(0.52, 0.5, 0.02)[0] and not decide(0.515, 0.5, 0.02)[0]


@pytest.fixture(scope="module")
def versions(trained):
    """Register, under a fresh name, an untrained model, the trained model, and a copy of each."""
    cfg, r = trained["cfg"], trained["result"]
    trained_state = load_model(f"models:/sscq/{r.version}", cfg.tracking).model.state_dict()
    torch.manual_seed(123)
    untrained_state = build_model(cfg.model, cfg.data.channels).state_dict()
    name = "sscq-gate"
    v = {k: log_and_register(s, cfg, r.run_id, name, cfg.data.train_uri)
         for k, s in (("untrained", untrained_state), ("trained", trained_state), ("trained_copy", trained_state))}
    return name, v


def test_gate_sequence(trained, versions):
    from mlflow.tracking import MlflowClient

    cfg = trained["cfg"]
    name, v = versions
    first = promote(name, v["untrained"], cfg)
    assert first.promote and first.champion is None and alias_version(name, CHAMPION) == v["untrained"]
    better = promote(name, v["trained"], cfg)
    assert better.promote and better.candidate_map > better.champion_map
    assert alias_version(name, CHAMPION) == v["trained"]
    tags = MlflowClient(cfg.tracking.tracking_uri).get_model_version(name, v["trained"]).tags
    assert tags["promotion.decision"] == "promoted" and float(tags["promotion.champion_map"]) == pytest.approx(better.champion_map, abs=1e-6)
    # A tie (same weights) is not an improvement at the default margin.
    tie = promote(name, v["trained_copy"], cfg)
    assert not tie.promote and tie.candidate_map == pytest.approx(tie.champion_map)
    assert alias_version(name, CHAMPION) == v["trained"]
    # Worse: rejected, alias unchanged, reason recorded.
    worse = promote(name, v["untrained"], cfg, min_improvement=0.0)
    assert not worse.promote and worse.exit_code == EXIT_REJECTED
    assert alias_version(name, CHAMPION) == v["trained"]
    assert MlflowClient(cfg.tracking.tracking_uri).get_model_version(name, v["untrained"]).tags["promotion.decision"] == "rejected"
    # A negative margin lets a tie through; dry run changes nothing.
    dry = promote(name, v["trained_copy"], cfg, min_improvement=-0.01, dry_run=True)
    assert dry.promote and alias_version(name, CHAMPION) == v["trained"]


def _run_promote(args, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "jobs", "promote.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_promote_cli_exit_codes_and_mlflow_failure(trained, versions, tmp_path):
    cfg = trained["cfg"]
    name, v = versions
    db = cfg.tracking.tracking_uri.replace("sqlite:///", "")
    copy = tmp_path / "mlflow-copy.db"
    shutil.copy(db, copy)
    uri = f"sqlite:///{copy}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=REPO)
    common = ["--name", name, "--config", os.path.join(REPO, "configs", "digits.yaml"),
              f"data.train_uri={cfg.data.train_uri}", f"data.queries_uri={cfg.data.queries_uri}",
              f"tracking.output_dir={tmp_path}/out"]
    champion_before = alias_version(name, CHAMPION)
    missing = _run_promote(["--candidate", "999", *common], env)
    assert missing.returncode == EXIT_ERROR and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    # Another writer holds the store's write lock for the whole run: reads (versions,
    # aliases, artifacts) work, the first write after scoring fails.
    import sqlite3

    holder = sqlite3.connect(str(copy), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        failed = _run_promote(["--candidate", v["untrained"], "--min-improvement", "-1", *common], env)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert failed.returncode == EXIT_ERROR, failed.stdout + failed.stderr
    assert "error:" in failed.stderr and "Traceback" not in failed.stderr
    import mlflow

    mlflow.set_tracking_uri(uri)
    assert alias_version(name, CHAMPION) == champion_before
    ok = _run_promote(["--candidate", v["trained_copy"], "--dry-run", *common], env)
    assert ok.returncode in (EXIT_PROMOTED, EXIT_REJECTED) and "champion" in ok.stdout
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
