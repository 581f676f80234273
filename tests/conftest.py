"""Shared fixtures: real local services only (moto S3 server, local Ray, SQLite MLflow)."""

from __future__ import annotations

import os
import socket
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Fake, test-only credentials for the local S3 endpoint; tests grep outputs for these values.
FAKE_KEY_ID = "AKIATESTSSCQ00000001"
FAKE_SECRET = "sscq-test-secret-value-do-not-log-000000"
# The session's Ray (and every job the tests start against it) skips usage reporting and the
# per-worker metrics export: nothing here reads them, and on 2 cores they are CPU the tests
# wait for. The dev-stack tests (test_cluster.py) start their own Ray without these.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# Ray Train's controller polls its workers this often (default 2 s): a run's end, and a step
# checkpoint (the loop waits 1.5 polls after one, train/loop.py), is noticed that much sooner.
# Set before the session's Ray starts, so every worker and controller process inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# Fixtures that start Ray, train a model or bring up a whole stack: a test that uses one is
# marked `slow` and left out of `make test-fast` (the unit and contract tier).
SLOW_FIXTURES = frozenset({"ray_local", "trained", "dev_stack"})
# Skip reasons CI accepts (SSCQ_FAIL_ON_SKIP=1, set by .ci/run): none, every test runs there.
ALLOWED_SKIPS: tuple[str, ...] = ()


# pytest-timeout counts fixture setup: the first test to request one of these also pays for a
# whole training run or stack start (minutes on a loaded 2-core machine), so such tests get
# this budget instead of pyproject's 600 s unless they carry their own.
SETUP_HEAVY_FIXTURES = frozenset({"trained", "dev_stack"})
SETUP_HEAVY_TIMEOUT_S = 1200


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(item.fixturenames)
        if SLOW_FIXTURES & names:
            item.add_marker(pytest.mark.slow)
        if SETUP_HEAVY_FIXTURES & names and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SETUP_HEAVY_TIMEOUT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under SSCQ_FAIL_ON_SKIP=1 a skip is a failure naming its reason: a skipped test passes nothing."""
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and os.environ.get("SSCQ_FAIL_ON_SKIP") == "1") or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if not any(allowed in reason for allowed in ALLOWED_SKIPS):
        rep.outcome = "failed"
        rep.longrepr = f"skipped where every test must run (SSCQ_FAIL_ON_SKIP=1): {reason}"


def free_ports(n: int) -> list[int]:
    """n distinct ports nothing listens on (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 in its own process; code reaches it only through
    its endpoint URL. (Not moto's in-process threaded server: its request threads would share
    this process with the tests' Ray driver, torch and FAISS.)"""
    import subprocess
    import time

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto's S3 server did not start on port {port} (exit {server.poll()})")
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
                       "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": "us-east-1"})
    yield endpoint
    server.terminate()
    server.wait(timeout=30)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test: returns its name."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture
def s3_root(s3_server):
    """A fresh bucket on the session's S3 endpoint: returns its s3://<bucket>/index root URI."""
    import uuid

    from sscq_dist import storage

    bucket = f"idx-{uuid.uuid4().hex[:12]}"
    storage.s3fs_filesystem().call_s3("create_bucket", Bucket=bucket)
    return f"s3://{bucket}/index"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session (4 logical CPUs: 2 train workers + Ray Data tasks).

    Started after the S3 endpoint so its workers inherit the endpoint and test credentials
    from the environment, as cluster nodes get theirs from the instance role.
    """
    import ray

    from sscq_dist.train.driver import quiet_ray_data, workers_path

    quiet_ray_data()
    if not ray.is_initialized():
        with workers_path(REPO):  # every job's workers import the tests' helpers from here
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """Digits ingested once: <dir>/train (1,500 rows) and <dir>/test (297 rows)."""
    from sscq_dist.ingest import ingest

    d = tmp_path_factory.mktemp("digits")
    ingest("digits", str(d), rows_per_shard=500, progress=False)
    return str(d)


_MLFLOW_TEMPLATE: list[str] = []


def seed_mlflow_store(db_path) -> None:
    """An empty MLflow SQLite store at db_path (unless a file is there), copied from one that
    MLflow itself created once per session: creating the tables costs each new store ~1.5 s of
    CPU, and most tests start from an empty store. The Default experiment's artifact location
    is set beside the copy, where MLflow would put it for a store created there."""
    import shutil
    import sqlite3
    import tempfile

    db_path = str(db_path)
    if os.path.exists(db_path):
        return
    if not _MLFLOW_TEMPLATE:
        from mlflow.tracking import MlflowClient

        template = os.path.join(tempfile.mkdtemp(prefix="sscq-mlflow-template-"), "mlflow.db")
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates the tables
        _MLFLOW_TEMPLATE.append(template)
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    shutil.copyfile(_MLFLOW_TEMPLATE[0], db_path)
    with sqlite3.connect(db_path) as con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (os.path.join(os.path.dirname(db_path), "mlruns", "0"),))
    con.close()


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    """A real MLflow tracking store in a SQLite file (per test)."""
    import mlflow

    seed_mlflow_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri


def make_cfg(workdir, digits_dir, *overrides):
    """The digits demo config pointed at test-local data, runs, MLflow store and outputs."""
    from sscq_dist.config import load_config

    seed_mlflow_store(os.path.join(str(workdir), "mlflow.db"))
    return load_config(os.path.join(REPO, "configs", "digits.yaml"), [
        f"data.train_uri={digits_dir}/train", f"data.queries_uri={digits_dir}/test",
        f"train.storage_path={workdir}/runs", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
        f"tracking.output_dir={workdir}/outputs", *overrides])


# Enough for what the tests that share the model check (it beats the untrained model by
# >= 0.1 mAP@100 and raw-pixel PQ), at a third of the demo's 30 epochs.
TRAINED_EPOCHS = 10


@pytest.fixture(scope="session")
def trained(tmp_path_factory, digits_dir, ray_local):
    """One demo-config training run (2 workers, ZeRO 1) of TRAINED_EPOCHS epochs, shared by the
    tests that need a trained model (the demo itself trains 30)."""
    import time

    from sscq_dist.train.driver import run_training

    work = tmp_path_factory.mktemp("trained")
    cfg = make_cfg(work, digits_dir, f"train.epochs={TRAINED_EPOCHS}")
    before = set(actor_classes())
    t0 = time.perf_counter()
    result = run_training(cfg)
    seconds = time.perf_counter() - t0
    started = [cls for aid, cls in actor_classes().items() if aid not in before]
    return {"cfg": cfg, "result": result, "seconds": seconds, "workdir": str(work), "actors_started": started}


def actor_classes() -> dict[str, str]:
    """{actor id: class name} of every actor the session's Ray has known, dead ones included."""
    import ray._private.state as ray_state

    return {aid: info["ActorClassName"] for aid, info in ray_state.actors().items()}
