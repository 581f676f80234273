"""Promotion gate: better promotes, worse and ties are rejected, errors never touch the alias."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fault_helpers import promotion_writes
from sscq_dist.errors import SSCQError
from sscq_dist.model import build_model
from sscq_dist.promotion import (EXIT_ERROR, EXIT_PROMOTED, EXIT_REJECTED, PromotionConflict,
                                 commit, decide, promote, score_gate)
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
    tags = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri).get_model_version(name, v["trained"]).tags
    assert tags["promotion.decision"] == "promoted" and float(tags["promotion.champion_map"]) == pytest.approx(better.champion_map, abs=1e-6)
    # A tie (same weights) is not an improvement at the default margin.
    tie = promote(name, v["trained_copy"], cfg)
    assert not tie.promote and tie.candidate_map == pytest.approx(tie.champion_map)
    assert alias_version(name, CHAMPION) == v["trained"]
    # Worse: rejected, alias unchanged, reason recorded.
    worse = promote(name, v["untrained"], cfg, min_improvement=0.0)
    assert not worse.promote and worse.exit_code == EXIT_REJECTED
    assert alias_version(name, CHAMPION) == v["trained"]
    assert MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri).get_model_version(name, v["untrained"]).tags["promotion.decision"] == "rejected"
    # A negative margin lets a tie through; a dry run writes nothing: no run, no tag, no alias.
    before = promotion_writes(cfg.tracking.tracking_uri, name, v["trained_copy"])
    dry = promote(name, v["trained_copy"], cfg, min_improvement=-0.01, dry_run=True)
    assert dry.promote and "would promote" in dry.line() and alias_version(name, CHAMPION) == v["trained"]
    assert promotion_writes(cfg.tracking.tracking_uri, name, v["trained_copy"]) == before


def test_champion_moved_during_scoring_aborts_with_both_versions(trained, versions):
    """Compare-and-set: another promotion moves `champion` after this one scored; the commit
    aborts naming both versions and leaves the alias where the other one put it."""
    from mlflow.tracking import MlflowClient

    cfg = trained["cfg"]
    name, v = versions
    client = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    client.set_registered_model_alias(name, CHAMPION, v["trained"])
    d = score_gate(name, v["trained_copy"], cfg, min_improvement=-0.01)
    assert d.promote and d.champion == v["trained"]
    client.set_registered_model_alias(name, CHAMPION, v["untrained"])  # the concurrent promotion
    with pytest.raises(PromotionConflict) as e:
        commit(d, name, cfg, min_improvement=-0.01)
    assert isinstance(e.value, SSCQError)  # jobs/promote.py: one error line, exit 2
    msg = str(e.value)
    assert f"from v{v['trained']} to v{v['untrained']}" in msg and f"v{v['trained_copy']}" in msg, msg
    assert alias_version(name, CHAMPION) == v["untrained"]
    assert client.get_model_version(name, v["trained_copy"]).tags.get("promotion.decision") != "promoted"
    client.set_registered_model_alias(name, CHAMPION, v["trained"])


def test_missing_gate_set(trained, versions, tmp_path):
    """Only a config that asks for it (the demo's) builds a missing gate set from the bundled
    digits, and never in a dry run; any other config gets an error naming data.queries_uri."""
    import dataclasses

    cfg = trained["cfg"]
    name, v = versions
    missing = str(tmp_path / "gate" / "test")
    demo = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, queries_uri=missing))
    assert demo.eval.gate_from_bundled_digits  # configs/digits.yaml
    prod = dataclasses.replace(demo, eval=dataclasses.replace(demo.eval, gate_from_bundled_digits=False))
    for c, dry, needle in ((prod, False, "data.queries_uri"), (demo, True, "--dry-run writes nothing")):
        with pytest.raises(SSCQError) as e:
            score_gate(name, v["trained_copy"], c, dry_run=dry)
        assert needle in str(e.value) and missing in str(e.value), str(e.value)
        assert not (tmp_path / "gate").exists()
    built = score_gate(name, v["trained_copy"], demo)  # the digits' held-out split, as ingested for the others
    assert built.candidate_map == pytest.approx(score_gate(name, v["trained_copy"], cfg).candidate_map)


def _refusing_writes(db, fn):
    """fn() while every write to the SQLite store at db fails with an error (triggers)."""
    import sqlite3

    con = sqlite3.connect(str(db), isolation_level=None)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                         "AND name NOT LIKE 'sqlite_%'")]
    triggers = [f"refuse_{op.lower()}_{t}" for t in tables for op in ("INSERT", "UPDATE", "DELETE")]
    for t in tables:
        for op in ("INSERT", "UPDATE", "DELETE"):
            con.execute(f'CREATE TRIGGER refuse_{op.lower()}_{t} BEFORE {op} ON "{t}" '
                        "BEGIN SELECT RAISE(ABORT, 'store refuses writes'); END")
    try:
        return fn()
    finally:
        for name in triggers:
            con.execute(f"DROP TRIGGER {name}")
        con.close()


def _run_promote(args, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "jobs", "promote.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _start_promote(args, env, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "promote.py"), *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_promote_cli_exit_codes_and_mlflow_failure(trained, versions, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = trained["cfg"]
    name, v = versions
    db = cfg.tracking.tracking_uri.replace("sqlite:///", "")
    copy = tmp_path / "mlflow-copy.db"
    shutil.copy(db, copy)
    uri = f"sqlite:///{copy}"
    client = MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias(name, CHAMPION, v["trained"])  # whatever ran before
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=REPO)
    data = [f"data.train_uri={cfg.data.train_uri}", f"data.queries_uri={cfg.data.queries_uri}",
            f"tracking.output_dir={tmp_path}/out"]
    common = ["--name", name, "--config", os.path.join(REPO, "configs", "digits.yaml"), *data]
    # The two refusals need no store write: they run beside the rest (each is mostly imports).
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    background = {
        "missing": _start_promote(["--candidate", "999", *common], env),
        "nogate": _start_promote(["--name", name, "--candidate", v["trained_copy"], "--config", str(empty)], env,
                                 cwd=str(tmp_path)),
    }
    # The store refuses every write for the whole run (triggers abort each INSERT, UPDATE and
    # DELETE): reads (versions, aliases, artifacts) work, the first write after scoring fails
    # at once (a held SQLite write lock fails the same way, after MLflow's 20 s busy timeout).
    failed = _refusing_writes(copy, lambda: _run_promote(
        ["--candidate", v["untrained"], "--min-improvement", "-1", *common], env))
    assert failed.returncode == EXIT_ERROR, failed.stdout + failed.stderr
    assert "error:" in failed.stderr and "Traceback" not in failed.stderr
    assert str(client.get_registered_model(name).aliases[CHAMPION]) == v["trained"]
    # A dry run that would promote: exit 0, and nothing written.
    before = promotion_writes(uri, name, v["trained_copy"])
    ok = _run_promote(["--candidate", v["trained_copy"], "--dry-run", "--min-improvement", "-0.01", *common], env)
    assert ok.returncode == EXIT_PROMOTED, ok.stdout + ok.stderr
    assert f"would promote v{v['trained_copy']}" in ok.stdout
    assert promotion_writes(uri, name, v["trained_copy"]) == before
    # A worse candidate: exit 3, the decision recorded, the alias where it was.
    worse = _run_promote(["--candidate", v["untrained"], *common], env)
    assert worse.returncode == EXIT_REJECTED, worse.stdout + worse.stderr
    assert f"rejected v{v['untrained']}" in worse.stdout
    assert client.get_model_version(name, v["untrained"]).tags["promotion.decision"] == "rejected"
    assert str(client.get_registered_model(name).aliases[CHAMPION]) == v["trained"]
    missing, nogate = (_finish(background[k]) for k in ("missing", "nogate"))
    assert missing.returncode == EXIT_ERROR and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    # A config that names no gate set (the defaults) is refused, naming the key; nothing is built.
    lines = [ln for ln in nogate.stderr.splitlines() if ln.startswith("error:")]
    assert nogate.returncode == EXIT_ERROR and len(lines) == 1, nogate.stdout + nogate.stderr
    assert "data.queries_uri=data/digits/test" in lines[0] and not (tmp_path / "data").exists()
