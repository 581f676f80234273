"""Security (SPEC section 8): no credential in logs, MLflow or index files; safe formats; URI allow-list.

The pipeline runs for real with known fake secrets in the environment (the AWS keys the S3
test endpoint accepts and an MLFLOW_TRACKING_TOKEN): ingest to S3, a one-epoch training
run, a reindex into an S3 index root. Then every byte they produced is searched for the
secret values: job output, MLflow params/tags/metric keys, the SQLite store itself, every
file under the working directory (MLflow artifacts, Ray Train run storage, outputs) and
every object in the bucket (shards, manifest, index_metrics.json).
"""

import ast
import json
import os
from pathlib import Path

import pytest

from conftest import FAKE_KEY_ID, FAKE_SECRET, REPO
from fault_helpers import DIGITS_YAML, assert_one_error_line, job_env, run_job

FAKE_TOKEN = "mlflow-token-sscq-test-do-not-log-4242"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN)


def _leaks(data: bytes | str) -> list[str]:
    """Which secret values occur in data."""
    raw = data.encode() if isinstance(data, str) else data
    return [s for s in SECRETS if s.encode() in raw]


def _s3_objects(bucket: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_no_credentials_anywhere(s3_bucket, tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET  # the endpoint really runs on these
    db = f"sqlite:///{tmp_path}/mlflow.db"
    env = job_env(ray_local, MLFLOW_TRACKING_TOKEN=FAKE_TOKEN)
    data = f"s3://{s3_bucket}/digits"
    common = ["--config", DIGITS_YAML, f"tracking.tracking_uri={db}", f"tracking.output_dir={tmp_path}/outputs",
              f"data.train_uri={data}/train", f"data.queries_uri={data}/test"]
    outputs = []

    def run(script, *args):
        out = run_job(script, *args, env=env, cwd=str(tmp_path))
        outputs.append((script, out))
        assert out.returncode == 0, f"{script}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    run("ingest.py", "--source", "digits", "--dest", data, "--rows-per-shard", "500", "--no-progress")
    train = run("train.py", *common, f"train.storage_path={tmp_path}/runs", "train.epochs=1",
                "train.global_batch_size=64", "train.max_steps_per_epoch=4", "train.run_name=secrets")
    assert "registered sscq version 1" in train.stdout
    root = f"s3://{s3_bucket}/index"
    run("reindex.py", "--images", f"{data}/test", "--index-root", root, "--model", "models:/sscq/1", *common)

    for script, out in outputs:
        assert not _leaks(out.stdout + out.stderr), f"{script} printed a secret"
    # MLflow: every run's params, tags and metric keys; every model version's tags.
    client = MlflowClient(db, registry_uri=db)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert {"sscq", "sscq-reindex"} <= {client.get_experiment(r.info.experiment_id).name for r in runs}
    for r in runs:
        fields = json.dumps([r.data.params, r.data.tags, sorted(r.data.metrics)])
        assert not _leaks(fields), f"secret in MLflow run {r.info.run_name}"
    for mv in client.search_model_versions("name='sscq'"):
        assert not _leaks(json.dumps(mv.tags))
    # Every file the jobs wrote locally (SQLite store, artifacts, Ray Train runs, outputs).
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any("mlartifacts" in p.parts for p in files)
    assert any("runs" in p.parts for p in files)
    leaked = [str(p) for p in files if _leaks(p.read_bytes())]
    assert not leaked, leaked
    # Every object in the bucket, with the index manifest and metrics parsed as JSON.
    objects = _s3_objects(s3_bucket)
    assert {"digits/train/_dataset.json", "digits/test/_dataset.json"} <= set(objects)  # records scanned too
    leaked = [k for k, v in objects.items() if _leaks(v)]
    assert not leaked, leaked
    (snap_key,) = [k for k in objects if "/snapshots/" in k and k.endswith(".json")]
    (met,) = [k for k in objects if k.endswith("/index_metrics.json")]
    snap, metrics = json.loads(objects[snap_key]), json.loads(objects[met])
    assert snap["model_uri"] == "models:/sscq/1" and metrics["rows"] == 297
    assert sum(p["indexed"] for p in snap["parts"]) == 297
    assert objects["index/CURRENT"].decode().strip() == f"{snap['model_version']}/{snap['generation']:08d}"


def _python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in Path(REPO, d).rglob("*.py")]


def test_torch_load_is_weights_only_and_no_pickle():
    """Every torch.load in the package and jobs passes weights_only=True; nothing unpickles."""
    calls = 0
    for path in _python_files("sscq_dist", "jobs"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "cloudpickle", "dill") for n in names), \
                    f"{path}:{node.lineno} imports a pickle module"
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                    and f.value.id == "torch":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 2  # the registry's model loader and the neighbour-bank restore


@pytest.mark.parametrize("script,args,scheme", [
    ("reindex.py", ["--images", "http://example.invalid/imgs", "--index-root", "/tmp/never"], "http://"),
    ("reindex.py", ["--images", "/tmp/never", "--index-root", "ftp://example.invalid/idx"], "ftp://"),
    ("ingest.py", ["--source", "digits", "--dest", "gs://bucket/x"], "gs://"),
])
def test_uri_scheme_allow_list_on_the_command_line(script, args, scheme, tmp_path):
    out = run_job(script, *args, cwd=str(tmp_path))
    line = assert_one_error_line(out, scheme, "allowed")
    assert "example.invalid" in line or "bucket" in line


def test_credentials_in_a_uri_are_not_echoed(tmp_path):
    """A URI that carries user:password is named in the error without its password."""
    uri = f"http://{FAKE_KEY_ID}:{FAKE_SECRET}@example.invalid/imgs"
    out = run_job("reindex.py", "--images", uri, "--index-root", str(tmp_path / "idx"), cwd=str(tmp_path))
    line = assert_one_error_line(out, "http://", "example.invalid/imgs")
    assert not _leaks(out.stdout + out.stderr), line
