"""End to end through the real servers: cluster/ stack up (Ray head with token auth, S3
endpoint, MLflow server), ingest to s3://, `ray job submit` train, promote, `ray job submit`
reindex to s3://, search; served precision@10 matches the offline evaluation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_cluster import REPO, SCRIPT_TIMEOUT_S, dev_stack_settings, start_dev_stack, stop_dev_stack

E2E_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = dev_stack_settings(tmp_path_factory.mktemp("e2e-stack"))
    try:
        yield start_dev_stack(s)
    finally:
        stop_dev_stack(s)


def _env(stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(stack.client_env)
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(cmd, env, cwd=REPO, timeout=E2E_TIMEOUT_S):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return r, r.stdout + r.stderr


def test_end_to_end_through_real_servers(stack, tmp_path, monkeypatch):
    env = _env(stack)
    bucket = stack.client_env["SSCQ_BUCKET"]
    py = str(REPO / ".venv" / "bin" / "python")
    ray_bin = str(REPO / ".venv" / "bin" / "ray")
    data = f"s3://{bucket}/digits"
    common = [f"data.train_uri={data}/train", f"data.queries_uri={data}/test"]
    logs = []

    r, out = _run([py, "jobs/ingest.py", "--source", "digits", "--dest", data, "--no-progress"], env)
    assert r.returncode == 0, out
    logs.append(out)

    train = [ray_bin, "job", "submit", "--working-dir", ".", "--", "python", "jobs/train.py",
             "--config", "configs/digits.yaml", *common, "train.epochs=2", "train.run_name=e2e",
             f"train.storage_path={tmp_path}/runs", f"tracking.output_dir={tmp_path}/out"]
    r, out = _run(train, env)
    logs.append(out)
    assert r.returncode == 0 and "succeeded" in out, out[-3000:]
    version = out.split("registered sscq version ")[1].split()[0]

    r, out = _run([py, "jobs/promote.py", "--name", "sscq", "--candidate", version, "--config",
                   "configs/digits.yaml", *common, f"tracking.output_dir={tmp_path}/out"], env)
    logs.append(out)
    assert r.returncode == 0 and "promoted" in out, out[-3000:]

    index_root = f"s3://{bucket}/index"
    reidx = [ray_bin, "job", "submit", "--working-dir", ".", "--", "python", "jobs/reindex.py",
             "--images", f"{data}/train", "--index-root", index_root, "--config", "configs/digits.yaml", *common,
             f"tracking.output_dir={tmp_path}/out"]
    r, out = _run(reidx, env)
    logs.append(out)
    assert r.returncode == 0 and "succeeded" in out and "CURRENT -> " + version in out, out[-3000:]
    # A second scheduled run finds nothing to do.
    r, out = _run(reidx, env)
    logs.append(out)
    assert r.returncode == 0 and "nothing to do" in out, out[-3000:]

    # Client side: this process talks to the same S3 endpoint and MLflow server.
    for k, v in stack.client_env.items():
        monkeypatch.setenv(k, v)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(stack.client_env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(stack.client_env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("sscq", "champion").version) == version

    from sscq_dist.config import load_config
    from sscq_dist.encoding import encode_set
    from sscq_dist.evaluation import labels_to_matrix, rank_pq, retrieval_metrics
    from sscq_dist.indexing.formats import open_current
    from sscq_dist.query import QueryService
    from sscq_dist.storage import resolve

    cfg = load_config(str(REPO / "configs" / "digits.yaml"), common)
    root = resolve(index_root)
    manifest = open_current(root)
    assert manifest.model_version == version and manifest.total_rows == 1500

    svc = QueryService.open(index_root, cfg, cache_dir=str(tmp_path / "cache"))
    q = encode_set(svc.model, f"{data}/test", cfg)
    db = encode_set(svc.model, f"{data}/train", cfg)
    ql = labels_to_matrix(q.labels, 10)
    dl = labels_to_matrix(db.labels, 10)
    label_of = dict(zip(db.ids.tolist(), range(len(db.ids))))
    served = svc.searcher.search(q.f, 10)
    served_idx = np.vectorize(label_of.get)(served.ids)
    p10_served = retrieval_metrics(served_idx, ql, dl, ks=[10])["precision@k"][0]
    cb = svc.model.quantizer.codebooks.detach().numpy()
    _, offline_idx = rank_pq(q.f, db.codes.astype(np.int64), cb, 10)
    p10_offline = retrieval_metrics(offline_idx, ql, dl, ks=[10])["precision@k"][0]
    print(f"precision@10 served {p10_served:.4f} vs offline {p10_offline:.4f}")
    assert abs(p10_served - p10_offline) <= 0.02

    # No credential value in job logs, MLflow params/tags, or the manifest.
    secrets = [stack.client_env["AWS_SECRET_ACCESS_KEY"], stack.client_env["AWS_ACCESS_KEY_ID"], stack.token]
    stored = [json.dumps(manifest.__dict__, default=str)]
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            stored.append(json.dumps(run.data.params) + json.dumps(run.data.tags))
    for mv in client.search_model_versions("name='sscq'"):
        stored.append(json.dumps(mv.tags))
    blob = "\n".join(logs + stored)
    for s in secrets:
        assert s not in blob
