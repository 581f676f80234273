"""Reliability contract (SPEC section 8), each fault injected for real.

- the training driver SIGKILLed after its first checkpoint, then rerun: the run resumes;
- the reindex driver SIGKILLed at three points (building parts, before the snapshot, before
  CURRENT) and an encoder actor mid-part: one entry per source row, and CURRENT names a whole
  snapshot at every observation; a writer whose lease is taken over publishes nothing;
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
import signal
import subprocess
import threading
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_cfg, seed_mlflow_store
from fault_helpers import (DIGITS_YAML, HungEndpoint, MlflowServer, Pause, assert_one_error_line, free_port,
                           job_cmd, job_env, kill_group, random_model_dir, run_job, start_job, wait_for)

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
    """Endpoint stops after 3 parts are committed: one error line naming an s3:// URI after bounded
    retries; every committed part is whole, no snapshot and no CURRENT exist; after the endpoint
    is back the rerun completes with every row exactly once, reusing the committed parts."""
    from sscq_dist.errors import SSCQError
    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.indexing.formats import parse_part_ids, parse_part_record
    from sscq_dist.indexing.reindex import reindex
    from sscq_dist.ingest import ingest
    from sscq_dist.serving.searcher import Searcher

    # A short lease: the failed run cannot delete its lock while the endpoint is down, and
    # the rerun below (same process, so not a dead holder) waits for that lease to lapse.
    cfg = make_cfg(tmp_path, str(tmp_path), f"storage.endpoint_url={s3_endpoint.url}", *FAST_RETRIES,
                   "index.encode_batch_size=32", "index.lock_ttl_s=3")
    bucket = f"s3://{s3_endpoint.bucket}"
    ingest("digits", f"{bucket}/images", rows_per_shard=200, splits=["all"], storage=cfg.storage, progress=False)
    model = random_model_dir(str(tmp_path / "model"), 0)
    root = f"{bucket}/index"
    state: dict = {}

    def is_record(key: str) -> bool:  # a part's commit record (not a temporary object of an atomic write)
        return "/parts/" in key and key.endswith(".json") and not key.rsplit("/", 1)[1].startswith(".tmp-")

    def committed():
        return len([k for k in s3_endpoint.keys("index/models/") if is_record(k)]) >= 3

    stopper = _stop_when(s3_endpoint, committed, state)
    caplog.set_level(logging.WARNING, logger="sscq_dist.storage")
    with pytest.raises(SSCQError) as e:
        reindex(f"{bucket}/images/all", root, model, cfg, progress=False)
    stopper.join(timeout=5)
    msg = str(e.value)
    assert "stopped_at" in state and "unreachable" in msg and f"{bucket}/" in msg and "\n" not in msg, msg
    assert time.time() - state["stopped_at"] < 60, "retries are not bounded"
    s3_endpoint.start()
    keys = s3_endpoint.keys("index/")
    records = [k for k in keys if is_record(k)]
    assert 3 <= len(records) < 9
    assert not [k for k in keys if "/snapshots/" in k] and "index/CURRENT" not in keys
    listed_ids = []
    for key in records:  # every committed part is whole and holds its rows
        rec = parse_part_record(s3_endpoint.get(key), key)
        vdir = key.split("/parts/")[0]
        part_ids = parse_part_ids(s3_endpoint.get(f"{vdir}/{rec.index_file}"), rec.index_file)
        assert len(part_ids) == rec.indexed == rec.rows
        listed_ids += part_ids.tolist()
    assert len(listed_ids) == len(set(listed_ids))
    # Back up: once the stale lease lapses, the rerun resumes and finishes.
    wait_for(lambda: "index/lock" not in s3_endpoint.keys("index/") or
             json.loads(s3_endpoint.get("index/lock"))["expires_at"] < time.time(), 30, "lease expiry")
    s = reindex(f"{bucket}/images/all", root, model, cfg, progress=False)
    assert s.resumed_shards >= len(records) and s.encoded_shards + s.resumed_shards == 9
    assert s.total_rows == 1797 and s.flipped
    searcher = Searcher.open(root, cfg.storage)
    ids = np.concatenate([fi.index_codes(p)[0] for p in searcher.parts])
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
    """Reads the root the way a searcher would, recording what it saw: CURRENT must always name
    a whole snapshot (its file and every part file it lists exist with the listed sizes)."""

    def __init__(self, root: str):
        self.root = root
        self.seen: list[str] = []

    def observe(self) -> str:
        cur = os.path.join(self.root, "CURRENT")
        current = open(cur).read().strip() if os.path.exists(cur) else ""
        if current:
            from sscq_dist import storage
            from sscq_dist.indexing.formats import ManifestCache, read_snapshot

            vdir = os.path.join(self.root, "models", current.split("/")[0])
            # Its manifest list and every manifest read afresh (a cache of its own), then the parts.
            snap = read_snapshot(storage.resolve(self.root), current, cache=ManifestCache())
            for p in snap.parts:
                assert os.path.getsize(os.path.join(vdir, p.index_file)) == p.index_bytes, current
        self.seen.append(current)
        return current

    def record_files(self, version: str) -> dict[str, float]:
        """Commit records of a version's parts -> their modification times."""
        d = os.path.join(self.root, "models", version, "parts")
        names = [f for f in os.listdir(d) if f.endswith(".json") and not f.startswith(".")] if os.path.isdir(d) else []
        return {f: os.path.getmtime(os.path.join(d, f)) for f in names}

    def records(self, version: str) -> int:
        return len(self.record_files(version))

    def snapshots(self, version: str) -> list[str]:
        d = os.path.join(self.root, "models", version, "snapshots")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _final_ids(root: str, cfg) -> np.ndarray:
    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.serving.searcher import Searcher

    s = Searcher.open(root, cfg.storage)
    return np.concatenate([fi.index_codes(p)[0] for p in s.parts])


def test_reindex_driver_killed_at_three_points(digits_all, tmp_path, ray_local):
    """Version B is built beside serving version A; its driver is SIGKILLed (a) while parts are
    being built, (b) after every part record but before the snapshot, (c) between the snapshot
    and CURRENT. Each rerun resumes; CURRENT names a whole snapshot at every observation; the
    final index reads back each source row exactly once from the part files."""
    from sscq_dist.indexing.reindex import reindex

    root = str(tmp_path / "index")
    cfg = make_cfg(tmp_path, str(tmp_path), "index.encode_batch_size=64")
    model_a = random_model_dir(str(tmp_path / "model_a"), 1)
    model_b = random_model_dir(str(tmp_path / "model_b"), 2)
    a = reindex(digits_all, root, model_a, cfg, progress=False)
    assert a.flipped and a.total_rows == 1797
    obs = IndexObserver(root)
    env = job_env(ray_local)
    args = _reindex_args(digits_all, root, model_b, tmp_path)
    ver_b = None

    def run(i: int, failpoint: str = "") -> subprocess.Popen:
        e = dict(env, SSCQ_FAILPOINTS=failpoint) if failpoint else env
        return start_job("reindex.py", *args, env=e, cwd=str(tmp_path), log_path=str(tmp_path / f"run{i}.log"))

    def watch(proc) -> None:
        while proc.poll() is None:
            obs.observe()
            time.sleep(0.01)

    # (a) killed from outside once 3 of 18 parts are committed.
    proc = run(0)
    try:
        def three_parts():
            nonlocal ver_b
            obs.observe()
            vs = [v for v in os.listdir(os.path.join(root, "models")) if v != a.model_version]
            ver_b = vs[0] if vs else None
            assert proc.poll() is None, open(tmp_path / "run0.log").read()[-3000:]
            return ver_b is not None and obs.records(ver_b) >= 3
        wait_for(three_parts, 240, "3 committed parts", interval=0.01)
    finally:
        kill_group(proc)
    committed_a = obs.record_files(ver_b)
    done_a = len(committed_a)
    assert 3 <= done_a < 18 and obs.snapshots(ver_b) == [] and obs.observe() == a.snapshot
    # (b) the rerun kills itself after the last record, before writing the snapshot.
    proc = run(1, "reindex.before_snapshot=kill")
    watch(proc)
    assert proc.returncode == -signal.SIGKILL, open(tmp_path / "run1.log").read()[-3000:]
    assert obs.records(ver_b) == 18 and obs.snapshots(ver_b) == [] and obs.observe() == a.snapshot
    after_b = obs.record_files(ver_b)
    assert {f: after_b[f] for f in committed_a} == committed_a  # (a)'s parts were resumed, not rebuilt
    # (c) the next rerun builds nothing, writes the snapshot and dies before CURRENT.
    proc = run(2, "reindex.before_current=kill")
    watch(proc)
    assert proc.returncode == -signal.SIGKILL, open(tmp_path / "run2.log").read()[-3000:]
    assert obs.snapshots(ver_b) == ["00000001.json"] and obs.observe() == a.snapshot
    assert obs.record_files(ver_b) == after_b  # nothing rebuilt
    # The last rerun finds the whole snapshot and flips to it without building anything.
    proc = run(3)
    watch(proc)
    log = open(tmp_path / "run3.log").read()
    assert proc.returncode == 0, log[-3000:]
    assert "encoded 0 shards" in log and f"CURRENT -> {ver_b}/00000001" in log, log[-2000:]
    assert obs.observe() == f"{ver_b}/00000001" and obs.snapshots(ver_b) == ["00000001.json"]
    ids = _final_ids(root, cfg)
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797
    assert len([f for f in os.listdir(os.path.join(root, "models", ver_b, "parts")) if f.endswith(".parquet")]) == 18
    assert len(obs.seen) > 20 and set(obs.seen) == {a.snapshot, f"{ver_b}/00000001"}


def test_encoder_actor_killed_mid_part_is_retried(digits_all, tmp_path, ray_local):
    """SIGKILL one part-builder actor process while it builds: Ray restarts it and retries the
    task; the run ends with every source row exactly once."""
    import psutil

    root = str(tmp_path / "index")
    model = random_model_dir(str(tmp_path / "model"), 4)

    def builders() -> set[int]:
        return {p.pid for p in psutil.process_iter(["cmdline"]) if "PartBuilder" in " ".join(p.info["cmdline"] or [])}
    stale = builders()  # an earlier test's killed job may leave a builder still exiting: not this run's
    proc = start_job("reindex.py", *_reindex_args(digits_all, root, model, tmp_path, "index.encode_batch_size=4"),
                     env=job_env(ray_local), cwd=str(tmp_path), log_path=str(tmp_path / "run.log"))
    obs = IndexObserver(root)

    try:
        def building():
            assert proc.poll() is None, open(tmp_path / "run.log").read()[-3000:]
            vs = os.listdir(os.path.join(root, "models")) if os.path.isdir(os.path.join(root, "models")) else []
            return (builders() - stale) if vs and 1 <= obs.records(vs[0]) < 12 else None
        before = wait_for(building, 240, "a builder mid-run", interval=0.01)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        seen = set(before)
        while proc.poll() is None:
            seen |= builders() - stale
            time.sleep(0.05)
    finally:
        kill_group(proc)
    log = open(tmp_path / "run.log").read()
    assert proc.returncode == 0, log[-3000:]
    assert seen - before, "no builder process replaced the killed one"
    ids = _final_ids(root, make_cfg(tmp_path, str(tmp_path)))
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797


def test_writer_that_lost_its_lease_cannot_publish(digits_all, tmp_path, ray_local):
    """The lock is forcibly taken over while the writer is between its last part and its
    snapshot: it stops with `error: lost the index lock to <owner>`, publishes nothing, and a
    later run reuses its committed parts."""
    root = str(tmp_path / "index")
    model = random_model_dir(str(tmp_path / "model"), 5)
    args = _reindex_args(digits_all, root, model, tmp_path)
    obs = IndexObserver(root)
    # The writer stops after its last part, before its snapshot, until the takeover is done.
    pause = Pause(tmp_path / "failpoints", "reindex.before_snapshot")
    proc = subprocess.Popen(job_cmd("reindex.py", *args), env=job_env(ray_local, SSCQ_FAILPOINTS=pause.spec),
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pause.reached(alive=lambda: proc.poll() is None)
    version = os.listdir(os.path.join(root, "models"))[0]
    assert obs.records(version) == 18
    with open(os.path.join(root, "lock"), "w") as f:  # an operator's forced takeover
        json.dump({"owner": "ops-override", "token": uuid.uuid4().hex, "fence": 1,
                   "expires_at": time.time() + 5}, f)
    pause.release()
    out, err = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = assert_one_error_line(result, "lost the index lock to ops-override")
    assert "stopped without publishing" in line
    assert obs.snapshots(version) == [] and not os.path.exists(os.path.join(root, "CURRENT"))
    assert json.load(open(os.path.join(root, "lock")))["owner"] == "ops-override"  # not deleted by the loser
    wait_for(lambda: json.load(open(os.path.join(root, "lock")))["expires_at"] < time.time(), 30, "lease expiry")
    again = run_job("reindex.py", *args, env=job_env(ray_local), cwd=str(tmp_path))
    assert again.returncode == 0 and "encoded 0 shards" in again.stdout and "18 resumed" in again.stdout, \
        again.stdout[-2000:] + again.stderr[-2000:]


# ----------------------------------------------------------------------------- concurrent reindex


def test_concurrent_reindex_one_proceeds(digits_all, tmp_path, ray_local):
    """Two reindex processes started together on one root: one builds the index, the other
    exits 2 naming the lock holder; the result holds every row once."""
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
    ids = _final_ids(root, make_cfg(tmp_path, str(tmp_path)))
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797
    assert json.load(open(os.path.join(root, "lock")))["released"] is True  # kept: its fence counter survives


# ----------------------------------------------------------------------------- training driver killed


def _train_overrides(tmp_path, digits_dir, run_name: str, *extra: str) -> list[str]:
    """A tiny digits run: 3 short epochs, a checkpoint after each."""
    seed_mlflow_store(tmp_path / "mlflow.db")
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
    assert "resumed from a checkpoint" in out, out[-4000:]
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
