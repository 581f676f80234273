"""Reliability contract (SPEC section 8), each fault injected for real.

- the training driver SIGKILLed after its first checkpoint, then rerun: the run resumes;
- the reindex driver SIGKILLed at three points, rerun each time: one entry per source row,
  and CURRENT never names an incomplete manifest at any observation;
- the S3 endpoint stopped mid-ingest and mid-reindex: bounded retries, one error line
  naming the URI, nothing partial visible, and a rerun completes;
- the MLflow server killed during training (the run completes and registers) and during
  promotion (alias untouched, exit 2, one error line);
- two reindex processes on one root: one proceeds, the other is refused.
A killed training *worker* is tests/test_train.py::test_worker_killed_mid_run_resumes_from_checkpoint.
"""

import io
import json
import logging
import os
import subprocess
import threading
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_cfg
from fault_helpers import (DIGITS_YAML, HungEndpoint, MlflowServer, assert_one_error_line, free_port, job_cmd,
                           job_env, kill_group, random_model_dir, run_job, start_job, wait_for)
from sscq_dist.errors import StorageError

# Small retry budget so an outage is detected in well under a second of backoff.
FAST_RETRIES = ["storage.max_attempts=2", "storage.retry_backoff_s=0.05"]


# ----------------------------------------------------------------------------- S3 endpoint outage


class S3Endpoint:
    """moto's S3 emulator (its standalone server) on a fixed port that a test can stop and start again.

    Stopping refuses connections at once (clients get connection errors); the buckets
    live in this process's moto backend, so a restart on the same port serves them again.
    """

    def __init__(self):
        self.port = free_port()
        self.server = None
        self.bucket = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Endpoint":
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, config=Config(retries={"max_attempts": 1}))

    def keys(self, prefix: str) -> list[str]:
        resp = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in resp.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture
def s3_endpoint(s3_server):
    """A stoppable endpoint (credentials come from the s3_server fixture's fake AWS env)."""
    ep = S3Endpoint().start()
    ep.bucket = f"outage-{uuid.uuid4().hex[:8]}"
    ep.client().create_bucket(Bucket=ep.bucket)
    yield ep
    ep.stop()


def _stop_when(ep: S3Endpoint, cond, state: dict, timeout: float = 240) -> threading.Thread:
    """Stop the endpoint from a thread as soon as cond() holds (polled through the endpoint)."""
    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if cond():
                    state["stopped_at"] = time.time()
                    ep.stop()
                    return
            except Exception as exc:  # noqa: BLE001 - the poll itself may race the job
                state["poll_error"] = repr(exc)
            time.sleep(0.02)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_s3_outage_mid_ingest(s3_endpoint, tmp_path):
    """Endpoint stops after the 3rd shard: exit 2 with one line naming the URI, only whole
    shards visible, and the rerun (once the endpoint is back) writes the whole dataset."""
    cfg_file = tmp_path / "storage.yaml"
    cfg_file.write_text(f"storage:\n  endpoint_url: {s3_endpoint.url}\n  max_attempts: 2\n  retry_backoff_s: 0.05\n")
    dest = f"s3://{s3_endpoint.bucket}/digits"
    args = ["--source", "digits", "--splits", "train", "--dest", dest, "--rows-per-shard", "50",
            "--config", str(cfg_file), "--no-progress"]
    state: dict = {}
    stopper = _stop_when(s3_endpoint, lambda: "digits/train/part-00002.parquet" in
                         s3_endpoint.keys("digits/train/"), state)
    out = run_job("ingest.py", *args, env=job_env(AWS_ENDPOINT_URL=s3_endpoint.url))
    stopper.join(timeout=5)
    assert "stopped_at" in state, state
    line = assert_one_error_line(out, "unreachable", f"s3://{s3_endpoint.bucket}/digits/train/")
    assert time.time() - state["stopped_at"] < 60, "retries are not bounded"
    # Bounded retries with backoff: max_attempts - 1 = 1 logged retry per failing call.
    assert "retry 1/1" in out.stderr and "retry 2/" not in out.stderr, out.stderr[-2000:]
    s3_endpoint.start()
    shards = [k for k in s3_endpoint.keys("digits/train/") if k.rsplit("/", 1)[-1].startswith("part-")]
    assert 3 <= len(shards) < 30, (shards, line)
    # The prefix stays marked unfinished, so no reader takes these shards for the dataset.
    assert "digits/train/_writing.json" in s3_endpoint.keys("digits/train/")
    for key in shards:  # every visible shard is a whole Parquet file of 50 rows
        assert pq.read_table(io.BytesIO(s3_endpoint.get(key))).num_rows == 50
    again = run_job("ingest.py", *args, "--overwrite", env=job_env(AWS_ENDPOINT_URL=s3_endpoint.url))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1500 rows, 30 shards" in again.stdout
    ids = []
    for key in s3_endpoint.keys("digits/train/part-"):
        ids += pq.read_table(io.BytesIO(s3_endpoint.get(key))).column("id").to_pylist()
    assert len(ids) == 1500 and len(set(ids)) == 1500
    assert json.loads(s3_endpoint.get("digits/train/_dataset.json"))["rows"] == 1500
    assert "digits/train/_writing.json" not in s3_endpoint.keys("digits/train/")


# Seconds a job process may need to start and import before its first storage call (a loaded CI
# machine); before the deadline existed the same job ran for minutes.
JOB_START_SLACK_S = 60


def test_hung_s3_endpoint_fails_within_the_deadline(s3_server, tmp_path):
    """An endpoint that accepts connections and never answers: `jobs/ingest.py` exits 2 with
    one error line naming the URI once storage.deadline_s has passed, although a single
    try's read timeout is longer (nested retries once made this 429 s)."""
    ep = HungEndpoint()
    try:
        cfg_file = tmp_path / "storage.yaml"
        cfg_file.write_text(f"storage:\n  endpoint_url: {ep.url}\n  deadline_s: 4\n  read_timeout_s: 120\n")
        t0 = time.monotonic()
        out = run_job("ingest.py", "--source", "digits", "--splits", "test", "--dest", "s3://bucket/digits",
                      "--config", str(cfg_file), "--no-progress", env=job_env(AWS_ENDPOINT_URL=ep.url), timeout=120)
        took = time.monotonic() - t0
    finally:
        ep.close()
    assert_one_error_line(out, "s3://bucket/digits", "unreachable", "storage.deadline_s=4s")
    assert ep.connections >= 1  # it was reached, and hung
    assert 4 <= took < 4 + JOB_START_SLACK_S, took


def test_s3_outage_mid_reindex(s3_endpoint, tmp_path, ray_local, caplog):
    """Endpoint stops after 3 index shards are committed: StorageError naming the URI after
    bounded retries; the manifest stays valid, lists only whole shards, CURRENT is unset;
    the rerun completes with every row exactly once."""
    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.indexing.manifest import IndexManifest
    from sscq_dist.indexing.reindex import reindex
    from sscq_dist.ingest import ingest
    from sscq_dist.search import Searcher

    # A short lease: the failed run cannot delete its lock while the endpoint is down, and
    # the rerun below (same process, so not a dead holder) waits for that lease to lapse.
    cfg = make_cfg(tmp_path, str(tmp_path), f"storage.endpoint_url={s3_endpoint.url}", *FAST_RETRIES,
                   "index.encode_batch_size=32", "index.lock_ttl_s=3")
    bucket = f"s3://{s3_endpoint.bucket}"
    ingest("digits", f"{bucket}/images", rows_per_shard=200, splits=["all"], storage=cfg.storage, progress=False)
    model = random_model_dir(str(tmp_path / "model"), 0)
    root = f"{bucket}/index"
    state: dict = {}

    def committed():
        keys = s3_endpoint.keys("index/models/")
        man = [k for k in keys if k.endswith("/manifest.json")]
        return man and len(json.loads(s3_endpoint.get(man[0]))["sources"]) >= 3

    stopper = _stop_when(s3_endpoint, committed, state)
    caplog.set_level(logging.WARNING, logger="sscq_dist.storage")
    with pytest.raises(StorageError) as e:
        reindex(f"{bucket}/images/all", root, model, cfg, progress=False)
    stopper.join(timeout=5)
    msg = str(e.value)
    assert "stopped_at" in state and "unreachable" in msg and f"{bucket}/" in msg and "\n" not in msg, msg
    assert time.time() - state["stopped_at"] < 60, "retries are not bounded"
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all("retry 1/1" in m for m in retries), retries
    s3_endpoint.start()
    keys = s3_endpoint.keys("index/")
    (man_key,) = [k for k in keys if k.endswith("/manifest.json")]
    manifest = IndexManifest.from_json(s3_endpoint.get(man_key))  # whole, valid JSON
    assert not manifest.complete and 3 <= len(manifest.sources) < 9
    assert "index/CURRENT" not in keys
    vdir = man_key.rsplit("/", 1)[0]
    listed_ids = []
    for sh in manifest.index_shards:  # every listed shard is whole and holds its rows
        index = fi.deserialize(s3_endpoint.get(f"{vdir}/{sh.file}"))
        assert index.ntotal == sh.rows
        listed_ids += fi.index_codes(index)[0].tolist()
    assert len(listed_ids) == len(set(listed_ids)) == sum(s.rows for s in manifest.sources)
    # Back up: once the stale lease lapses, the rerun resumes and finishes.
    wait_for(lambda: "index/LOCK" not in keys or
             json.loads(s3_endpoint.get("index/LOCK"))["expires_at"] < time.time(), 30, "lease expiry")
    s = reindex(f"{bucket}/images/all", root, model, cfg, progress=False)
    assert s.encoded_shards == 9 - len(manifest.sources) and s.total_rows == 1797 and s.flipped
    searcher = Searcher.open(root, cfg.storage)
    ids = np.concatenate([fi.index_codes(sh)[0] for sh in searcher.shards])
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797


# ----------------------------------------------------------------------------- reindex driver killed


@pytest.fixture(scope="module")
def digits_all(tmp_path_factory):
    """All 1,797 digits in 100-row shards (18 source shards)."""
    from sscq_dist.ingest import ingest

    d = tmp_path_factory.mktemp("digits_all")
    ingest("digits", str(d), rows_per_shard=100, splits=["all"], progress=False)
    return str(d / "all")


def _reindex_args(images: str, root: str, model: str, tmp_path, *extra: str) -> list[str]:
    return ["--images", images, "--index-root", root, "--model", model, "--config", DIGITS_YAML,
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.output_dir={tmp_path}/out",
            "index.encode_batch_size=8", *extra]


class IndexObserver:
    """Reads CURRENT and manifests the way a searcher would, recording what it saw."""

    def __init__(self, root: str):
        self.root = root
        self.seen: list[tuple] = []

    def manifest(self, version: str):
        path = os.path.join(self.root, "models", version, "manifest.json")
        return json.load(open(path)) if os.path.exists(path) else None

    def observe(self, building: str) -> int:
        """Check the serving invariant once; returns how many sources `building` lists."""
        cur_path = os.path.join(self.root, "CURRENT")
        current = open(cur_path).read().strip() if os.path.exists(cur_path) else None
        if current is not None:
            served = self.manifest(current)
            assert served is not None and served["complete"], f"CURRENT -> {current} whose manifest is incomplete"
        m = self.manifest(building)
        n = len(m["sources"]) if m else 0
        self.seen.append((current, n))
        return n


def test_reindex_driver_killed_at_three_points(digits_all, tmp_path, ray_local):
    """Version B is built beside serving version A; its driver is SIGKILLed after ~1, ~9 and
    ~16 of 18 shards (near the flip). Every rerun resumes; CURRENT names a complete manifest
    at every observation; the final index holds each source row exactly once."""
    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.indexing.reindex import reindex
    from sscq_dist.search import Searcher

    root = str(tmp_path / "index")
    cfg = make_cfg(tmp_path, str(tmp_path), "index.encode_batch_size=64")
    model_a = random_model_dir(str(tmp_path / "model_a"), 1)
    model_b = random_model_dir(str(tmp_path / "model_b"), 2)
    a = reindex(digits_all, root, model_a, cfg, progress=False)
    assert a.flipped and a.total_rows == 1797
    ver_a, ver_b = a.model_version, None
    obs = IndexObserver(root)
    env = job_env(ray_local)
    args = _reindex_args(digits_all, root, model_b, tmp_path)
    kills = []
    for i, at_least in enumerate((1, 9, 16)):
        proc = start_job("reindex.py", *args, env=env, cwd=str(tmp_path), log_path=str(tmp_path / f"run{i}.log"))
        try:
            def ready():
                nonlocal ver_b
                if ver_b is None:
                    vs = [v for v in os.listdir(os.path.join(root, "models")) if v != ver_a]
                    ver_b = vs[0] if vs else None
                assert proc.poll() is None, open(tmp_path / f"run{i}.log").read()[-3000:]
                return ver_b is not None and obs.observe(ver_b) >= at_least
            wait_for(ready, 240, f"{at_least} committed shards", interval=0.01)
        finally:
            kill_group(proc)
        n = obs.observe(ver_b)
        kills.append(n)
        assert open(os.path.join(root, "CURRENT")).read().strip() == ver_a  # B never served partial
        m = obs.manifest(ver_b)
        assert not m["complete"] and n < 18
        # No row listed twice so far, and each listed index shard holds its listed rows.
        ids = [fi.index_codes(fi.deserialize(open(os.path.join(root, "models", ver_b, x["file"]), "rb").read()))[0]
               for x in m["index_shards"]]
        flat = np.concatenate(ids).tolist()
        assert len(flat) == len(set(flat)) == sum(s["rows"] for s in m["sources"])
    assert kills == sorted(kills) and len(set(kills)) == 3, kills  # three different points
    # The last rerun runs to the end while we keep observing.
    proc = start_job("reindex.py", *args, env=env, cwd=str(tmp_path), log_path=str(tmp_path / "final.log"))
    while proc.poll() is None:
        obs.observe(ver_b)
        time.sleep(0.01)
    log = open(tmp_path / "final.log").read()
    assert proc.returncode == 0, log[-3000:]
    assert f"encoded {18 - kills[-1]} shards" in log, log[-2000:]
    obs.observe(ver_b)
    assert open(os.path.join(root, "CURRENT")).read().strip() == ver_b
    s = Searcher.open(root, cfg.storage)
    ids = np.concatenate([fi.index_codes(sh)[0] for sh in s.shards])
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797
    files = os.listdir(os.path.join(root, "models", ver_b))
    assert len([f for f in files if f.startswith("shard-")]) == 18  # no orphan from a killed run
    assert len(obs.seen) > 20


# ----------------------------------------------------------------------------- concurrent reindex


def test_concurrent_reindex_one_proceeds(digits_all, tmp_path, ray_local):
    """Two reindex processes started together on one root: one builds the index, the other
    exits 2 naming the lock holder; the result holds every row once."""
    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.search import Searcher

    root = str(tmp_path / "index")
    model = random_model_dir(str(tmp_path / "model"), 3)
    args = _reindex_args(digits_all, root, model, tmp_path)
    env = job_env(ray_local)
    procs = [subprocess.Popen(job_cmd("reindex.py", *args), env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    results = [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [(r.returncode, r.stderr[-1500:]) for r in results]
    loser = next(r for r in results if r.returncode == 2)
    assert_one_error_line(loser, "locked by", "another reindex is running")
    winner = next(r for r in results if r.returncode == 0)
    assert "encoded 18 shards" in winner.stdout
    s = Searcher.open(root, make_cfg(tmp_path, str(tmp_path)).storage)
    ids = np.concatenate([fi.index_codes(sh)[0] for sh in s.shards])
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797
    assert not os.path.exists(os.path.join(root, "LOCK"))


# ----------------------------------------------------------------------------- training driver killed


def _train_overrides(tmp_path, digits_dir, run_name: str, *extra: str) -> list[str]:
    """A tiny digits run: 3 short epochs, a checkpoint after each."""
    return [f"data.train_uri={digits_dir}/train", f"data.queries_uri={digits_dir}/test",
            f"train.storage_path={tmp_path}/runs", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.output_dir={tmp_path}/outputs", f"train.run_name={run_name}", "train.epochs=3",
            "train.checkpoint_every_epochs=1", "train.global_batch_size=64", "train.max_steps_per_epoch=6",
            "train.log_every_steps=2", *extra]


def _first_checkpoint_registered(runs_dir) -> bool:
    """Ray Train has registered a checkpoint once its run snapshot names one."""
    for r, _, files in os.walk(runs_dir):
        if "checkpoint_manager_snapshot.json" in files:
            if "checkpoint_dir_name" in open(os.path.join(r, "checkpoint_manager_snapshot.json")).read():
                return True
    return False


def test_training_driver_killed_resumes(tmp_path, digits_dir, ray_local):
    """SIGKILL the whole `jobs/train.py` process group after the first checkpoint; the same
    command resumes the same MLflow run from that checkpoint and registers the model."""
    from mlflow.tracking import MlflowClient

    args = ["--config", DIGITS_YAML, *_train_overrides(tmp_path, digits_dir, "driver-kill")]
    env = job_env(ray_local)
    first = start_job("train.py", *args, env=env, cwd=str(tmp_path), log_path=str(tmp_path / "first.log"))
    try:
        def ready():
            assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
            return _first_checkpoint_registered(tmp_path / "runs")
        wait_for(ready, 300, "the first registered checkpoint", interval=0.1)
    finally:
        kill_group(first)
    state = json.load(open(tmp_path / "runs" / "driver-kill.state.json"))
    assert state["status"] == "running"
    again = run_job("train.py", *args, env=env, cwd=str(tmp_path))
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "resumed from the checkpoint" in out, out[-4000:]
    assert f"run {state['mlflow_run_id']}" in again.stdout  # the same MLflow run, continued
    db = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(db, registry_uri=db)  # explicit: other tests move the global registry URI
    hist = sorted(client.get_metric_history(state["mlflow_run_id"], "epoch/global_step"), key=lambda m: m.step)
    steps = [int(m.value) for m in hist]
    spe = steps[0]
    # Resumed, not restarted, and each epoch logged once: an epoch logged just before the
    # kill and redone from the checkpoint is not logged again.
    assert steps == [spe, 2 * spe, 3 * spe], steps
    runs = client.search_runs([client.get_experiment_by_name("sscq").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]  # no second training run
    (mv,) = client.search_model_versions("name='sscq'")
    assert mv.run_id == state["mlflow_run_id"]
    done = json.load(open(tmp_path / "runs" / "driver-kill.state.json"))
    assert done["status"] == "completed" and done["model_version"] == str(mv.version)


# ----------------------------------------------------------------------------- MLflow server outage


def test_mlflow_server_down_during_training_and_promotion(tmp_path, digits_dir, ray_local):
    """A real `mlflow server` is SIGKILLed while training logs to it and restarted on the same
    backend before the end: training keeps going (metrics buffered, one warning), the run
    completes with its whole metric history and registers. With the server down, promotion
    exits 2 with one error line and the champion alias stays where it was."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(str(tmp_path / "mlflow"), free_port()).start()
    try:
        args = ["--config", DIGITS_YAML, *_train_overrides(tmp_path, digits_dir, "mlflow-outage",
                                                           f"tracking.tracking_uri={server.uri}")]
        log_path = tmp_path / "train.log"
        proc = start_job("train.py", *args, env=job_env(ray_local), cwd=str(tmp_path), log_path=str(log_path))
        backend = MlflowClient(server.backend)  # reads the server's store directly, up or down
        state_file = tmp_path / "runs" / "mlflow-outage.state.json"
        try:
            def logging_started():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                if not state_file.exists():
                    return None
                run_id = json.load(open(state_file))["mlflow_run_id"]
                return run_id if backend.get_metric_history(run_id, "loss/total") else None
            run_id = wait_for(logging_started, 300, "the first training metrics on the server", interval=0.2)
            server.kill()
            t_down = time.time()
            # Training goes on: the rank-0 logger warns once and buffers.
            wait_for(lambda: "MLflow tracking unreachable" in log_path.read_text() or proc.poll() is not None,
                     60, "the buffering warning")
            server.start()
            t_up = time.time()
            rc = proc.wait(timeout=300)
        finally:
            kill_group(proc)
        text = log_path.read_text()
        assert rc == 0, text[-4000:]
        assert text.count("MLflow tracking unreachable") == 1 and "reachable again" in text, text[-4000:]
        client = MlflowClient(server.uri, registry_uri=server.uri)
        steps = sorted(int(m.value) for m in client.get_metric_history(run_id, "epoch/global_step"))
        assert len(steps) == 3 and steps == [steps[0] * k for k in (1, 2, 3)], steps  # nothing lost
        # Steps were taken while the server was down: their metrics, stamped then, arrived later.
        during = [m for m in client.get_metric_history(run_id, "loss/total") if t_down < m.timestamp / 1000 < t_up]
        assert during, "no training step was logged during the outage"
        (mv,) = client.search_model_versions("name='sscq'")
        assert mv.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"

        # Promotion while the server is down: v1 is champion, v2 the candidate.
        client.set_registered_model_alias("sscq", "champion", mv.version)
        v2 = client.copy_model_version(f"models:/sscq/{mv.version}", "sscq").version
        server.kill()
        # MLflow's own client retries a refused connection for minutes by default; the
        # documented knob keeps this test short.
        env = job_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
        out = run_job("promote.py", "--name", "sscq", "--candidate", str(v2), "--config", DIGITS_YAML,
                      f"tracking.tracking_uri={server.uri}", f"data.train_uri={digits_dir}/train",
                      f"data.queries_uri={digits_dir}/test", env=env, cwd=str(tmp_path))
        assert_one_error_line(out, server.uri.split("//")[1])
        store = MlflowClient(server.backend, registry_uri=server.backend)
        assert str(store.get_model_version_by_alias("sscq", "champion").version) == str(mv.version)
    finally:
        server.kill()
