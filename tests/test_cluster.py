"""The local/dev stack (cluster/up.sh, status.sh, down.sh) with its real processes:
a Ray head with token auth, moto's S3 server, an MLflow server storing artifacts in it.

Runs on free ports and a temporary state dir, so it never touches a user's own stack.
Before the stack goes down, the end-to-end test runs the pipeline through its servers
(one stack start for both: `test_end_to_end_through_real_servers`).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import conftest
from conftest import free_ports
from fault_helpers import leaks, s3_objects

REPO = Path(conftest.REPO)
CLUSTER = REPO / "cluster"
# The environment running these tests (wherever `make install` or CI put it) is the one the
# stack runs: cluster/up.sh takes it as VENV.
VENV = Path(sys.prefix)
PORT_VARS = ("SSCQ_RAY_PORT", "SSCQ_RAY_DASHBOARD_PORT", "SSCQ_RAY_CLIENT_PORT", "SSCQ_RAY_AGENT_PORT",
             "SSCQ_S3_PORT", "SSCQ_MLFLOW_PORT")
# Client-side names cluster/up.sh must export in env.sh.
CLIENT_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
              "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
              "SSCQ_BUCKET", "SSCQ_STACK_DIR")
SCRIPT_TIMEOUT_S = 240
# A bearer token in the stack's environment (so in every job's, as on a cluster whose nodes
# carry one); no job may write it anywhere.
FAKE_MLFLOW_TOKEN = "mlflow-token-sscq-test-do-not-log-4242"
# The search service's bearer token (sscq_dist/serving/auth.py), carried the same way.
FAKE_SERVE_TOKEN = "serve-token-sscq-test-do-not-log-5353"


@dataclass
class DevStack:
    """A running dev stack: `script_env` drives cluster/*.sh, `client_env` is env.sh."""

    state_dir: Path
    script_env: dict[str, str]
    ports: dict[str, int]
    up_output: str = ""
    client_env: dict[str, str] = field(default_factory=dict)
    recorded: dict[str, str] = field(default_factory=dict)

    def url(self, port_var: str) -> str:
        return f"http://127.0.0.1:{self.ports[port_var]}"

    @property
    def token(self) -> str:
        return Path(self.client_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER / name), *args], env=env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, cwd=REPO)


def read_env_file(path: Path) -> dict[str, str]:
    """What a shell has after `source path` (the file is bash, so let bash read it)."""
    out = subprocess.run(["bash", "-c", 'set -a; source "$1"; env -0', "_", str(path)],
                         capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def dev_stack_settings(state_dir: Path) -> DevStack:
    """Free ports, a state dir and a clean script environment for a new dev stack."""
    ports = dict(zip(PORT_VARS, free_ports(len(PORT_VARS))))
    # The scripts get a clean environment: nothing of a caller's Ray / AWS / MLflow setup.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "SSCQ_"))}
    env.update({k: str(v) for k, v in ports.items()})
    # A short stop grace keeps teardown quick; down.sh still escalates to SIGKILL.
    env.update(SSCQ_STACK_DIR=str(state_dir), SSCQ_BUCKET="sscq-test", VENV=str(VENV),
               SSCQ_RAY_NUM_CPUS="4", SSCQ_STOP_GRACE="4")
    return DevStack(state_dir=state_dir, script_env=env, ports=ports)


def start_dev_stack(stack: DevStack) -> DevStack:
    """Run cluster/up.sh; fail with its output. Fills in env.sh and the recorded settings."""
    r = run_script("up.sh", stack.script_env)
    stack.up_output = r.stdout + r.stderr
    assert r.returncode == 0, f"cluster/up.sh failed:\n{stack.up_output}"
    stack.client_env = read_env_file(stack.state_dir / "env.sh")
    stack.recorded = read_env_file(stack.state_dir / "stack.env")
    return stack


def stop_dev_stack(stack: DevStack) -> subprocess.CompletedProcess:
    """Run cluster/down.sh --purge (also after a failed start: it stops what did start)."""
    return run_script("down.sh", stack.script_env, "--purge")


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory):
    """The dev stack, up for this module; always torn down (and its state removed)."""
    stack = dev_stack_settings(tmp_path_factory.mktemp("stack"))
    stack.script_env["MLFLOW_TRACKING_TOKEN"] = FAKE_MLFLOW_TOKEN
    stack.script_env["SSCQ_SERVE_TOKEN"] = FAKE_SERVE_TOKEN
    try:
        yield start_dev_stack(stack)
    finally:
        stop_dev_stack(stack)


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def s3fs_for(stack: DevStack):
    import s3fs

    env = stack.client_env
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"],
                                            "region_name": env["AWS_DEFAULT_REGION"]},
                             skip_instance_cache=True)


def pgids(stack: DevStack) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (stack.state_dir / "pids").glob("*.pgid")}


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains text."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes in a process group (an init that does not reap leaves zombies)."""
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- tests (module order matters: the last one takes the stack down) ----------------------


def test_up_starts_three_healthy_services(dev_stack):
    assert "started: moto mlflow ray" in dev_stack.up_output
    assert set(pgids(dev_stack)) == {"moto", "mlflow", "ray"}
    r = run_script("status.sh", dev_stack.script_env)
    assert r.returncode == 0, r.stdout + r.stderr
    healthy = [ln for ln in r.stdout.splitlines() if " healthy " in ln]
    assert len(healthy) == 3, r.stdout


def test_second_up_is_a_noop(dev_stack):
    before = pgids(dev_stack)
    r = run_script("up.sh", dev_stack.script_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to do" in r.stdout
    assert pgids(dev_stack) == before


def test_env_sh_points_clients_at_the_stack(dev_stack):
    env = dev_stack.client_env
    missing = [k for k in CLIENT_ENV if not env.get(k)]
    assert not missing, missing
    assert env["RAY_ADDRESS"] == dev_stack.url("SSCQ_RAY_DASHBOARD_PORT")
    assert env["MLFLOW_TRACKING_URI"] == dev_stack.url("SSCQ_MLFLOW_PORT")
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == dev_stack.url("SSCQ_S3_PORT")
    assert env["RAY_AUTH_MODE"] == "token" and len(dev_stack.token) == 64
    for path in (dev_stack.state_dir / "env.sh", Path(env["RAY_AUTH_TOKEN_PATH"])):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_no_secret_is_printed_or_logged(dev_stack):
    secrets = [dev_stack.token, dev_stack.client_env["AWS_SECRET_ACCESS_KEY"], FAKE_MLFLOW_TOKEN, FAKE_SERVE_TOKEN]
    status = run_script("status.sh", dev_stack.script_env)
    outputs = [dev_stack.up_output, status.stdout, status.stderr]
    outputs += [p.read_text(errors="replace") for p in (dev_stack.state_dir / "logs").iterdir()]
    for text in outputs:
        for secret in secrets:
            assert secret not in text


def test_ray_dashboard_requires_the_token(dev_stack):
    import ray

    url = dev_stack.url("SSCQ_RAY_DASHBOARD_PORT") + "/api/version"
    code, body = http_get(url, dev_stack.token)
    assert code == 200 and json.loads(body)["ray_version"] == ray.__version__
    assert http_get(url)[0] == 401
    assert http_get(url, "0" * 64)[0] == 403


def test_s3_endpoint_serves_the_bucket(dev_stack):
    assert http_get(dev_stack.url("SSCQ_S3_PORT") + "/")[0] == 200
    fs = s3fs_for(dev_stack)
    bucket = dev_stack.client_env["SSCQ_BUCKET"]
    fs.pipe(f"{bucket}/probe/hello.txt", b"hello")
    assert fs.ls(f"{bucket}/probe") == [f"{bucket}/probe/hello.txt"]
    assert fs.cat(f"{bucket}/probe/hello.txt") == b"hello"


def test_mlflow_is_healthy_and_stores_artifacts_in_the_bucket(dev_stack):
    base = dev_stack.url("SSCQ_MLFLOW_PORT")
    assert http_get(base + "/health") == (200, b"OK")
    # Upload through the server's artifact proxy, as MLflow clients do.
    req = urllib.request.Request(base + "/api/2.0/mlflow-artifacts/artifacts/probe/model.txt",
                                 data=b"weights", method="PUT")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    bucket = dev_stack.client_env["SSCQ_BUCKET"]
    assert s3fs_for(dev_stack).cat(f"{bucket}/mlflow/probe/model.txt") == b"weights"


def test_submitted_job_runs_with_the_stack_environment(dev_stack, tmp_path):
    """`ray job submit` authenticates with the token from env.sh; the job's driver runs the
    venv's python and sees the S3 endpoint and MLflow URI the stack gave Ray (so workers
    do too)."""
    (tmp_path / "probe.py").write_text(
        "import os, sys\n"
        "import ray\n"
        "print('PROBE', os.environ['AWS_ENDPOINT_URL'], os.environ['MLFLOW_TRACKING_URI'],\n"
        "      'AWS_SECRET_ACCESS_KEY' in os.environ, sys.prefix)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(dev_stack.client_env)
    r = subprocess.run([str(VENV / "bin" / "ray"), "job", "submit", "--working-dir", ".", "--",
                        "python", "probe.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=SCRIPT_TIMEOUT_S)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # `python` in an entrypoint is the venv's interpreter (it imported ray above).
    expected = (f"PROBE {dev_stack.url('SSCQ_S3_PORT')} {dev_stack.url('SSCQ_MLFLOW_PORT')} True "
                f"{VENV}")
    assert expected in out
    assert dev_stack.token not in out


E2E_TIMEOUT_S = 420


def _e2e_env(stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(stack.client_env)
    env["MLFLOW_TRACKING_TOKEN"] = FAKE_MLFLOW_TOKEN
    env["SSCQ_SERVE_TOKEN"] = FAKE_SERVE_TOKEN
    env["PYTHONPATH"] = str(REPO)
    return env


def _e2e_run(cmd, env, cwd=REPO, timeout=E2E_TIMEOUT_S):
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    job = next((c for c in cmd if c.startswith("jobs/")), cmd[0])
    print(f"e2e: {job} exited {r.returncode} in {time.monotonic() - t0:.1f}s")  # shown when the test fails
    return r, r.stdout + r.stderr


@pytest.mark.timeout(1200)  # the longest test (~3-4 min idle) and the stack start if it runs first
def test_end_to_end_through_real_servers(dev_stack, tmp_path, monkeypatch):
    """End to end through this stack's real servers (before it goes down): ingest to s3://,
    `ray job submit` train, promote, `ray job submit` reindex to s3://, search; served
    precision@10 matches the offline evaluation."""
    stack = dev_stack
    env = _e2e_env(stack)
    bucket = stack.client_env["SSCQ_BUCKET"]
    py = str(VENV / "bin" / "python")
    ray_bin = str(VENV / "bin" / "ray")
    data = f"s3://{bucket}/digits"
    common = [f"data.train_uri={data}/train", f"data.queries_uri={data}/test"]
    logs = []

    r, out = _e2e_run([py, "jobs/ingest.py", "--source", "digits", "--dest", data, "--no-progress"], env)
    assert r.returncode == 0, out
    logs.append(out)

    train = [ray_bin, "job", "submit", "--working-dir", ".", "--", "python", "jobs/train.py",
             "--config", "configs/digits.yaml", *common, "train.epochs=1", "train.run_name=e2e",
             f"train.storage_path={tmp_path}/runs", f"tracking.output_dir={tmp_path}/out"]
    r, out = _e2e_run(train, env)
    logs.append(out)
    assert r.returncode == 0 and "succeeded" in out, out[-3000:]
    version = out.split("registered sscq version ")[1].split()[0]

    r, out = _e2e_run([py, "jobs/promote.py", "--name", "sscq", "--candidate", version, "--config",
                   "configs/digits.yaml", *common, f"tracking.output_dir={tmp_path}/out"], env)
    logs.append(out)
    assert r.returncode == 0 and "promoted" in out, out[-3000:]

    index_root = f"s3://{bucket}/index"
    reidx = [ray_bin, "job", "submit", "--working-dir", ".", "--", "python", "jobs/reindex.py",
             "--images", f"{data}/train", "--index-root", index_root, "--config", "configs/digits.yaml", *common,
             f"tracking.output_dir={tmp_path}/out"]
    r, out = _e2e_run(reidx, env)
    logs.append(out)
    assert r.returncode == 0 and "succeeded" in out and "CURRENT -> " + version in out, out[-3000:]
    # (A rerun with nothing new is a no-op: tests/test_reindex.py, in process, to keep this short.)

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
    from sscq_dist.model.encoding import encode_set
    from sscq_dist.evaluation import labels_to_matrix, rank_pq, retrieval_metrics
    from sscq_dist.indexing.formats import open_current
    from sscq_dist.serving.query import QueryService
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

    # No credential value anywhere the jobs wrote: job output; MLflow params, tags and metric
    # names; the MLflow server's SQLite store; every object in the bucket (shards, dataset
    # records, MLflow artifacts, snapshots, part records, index_metrics.json); Ray Train's run
    # storage and the outputs.
    secrets = [stack.client_env["AWS_SECRET_ACCESS_KEY"], stack.client_env["AWS_ACCESS_KEY_ID"], stack.token,
               FAKE_MLFLOW_TOKEN, FAKE_SERVE_TOKEN]
    stored = [json.dumps(manifest.__dict__, default=str)]
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            stored.append(json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)]))
    for mv in client.search_model_versions("name='sscq'"):
        stored.append(json.dumps(mv.tags))
    assert not leaks("\n".join(logs + stored), secrets)
    objects = s3_objects(bucket, stack.client_env["AWS_ENDPOINT_URL"])
    keys = set(objects)
    assert {"digits/train/_dataset.json", "digits/test/_dataset.json", "index/CURRENT"} <= keys
    assert {"mlflow", "index"} <= {k.split("/")[0] for k in keys}  # MLflow artifacts and the index are there
    assert any("/snapshots/" in k for k in keys) and any(k.endswith("/index_metrics.json") for k in keys)
    files = [stack.state_dir / "mlflow.db", *(p for p in tmp_path.rglob("*") if p.is_file())]
    assert any("runs" in p.parts for p in files)
    leaked = [k for k, v in objects.items() if leaks(v, secrets)]
    leaked += [str(p) for p in files if leaks(p.read_bytes(), secrets)]
    assert not leaked, leaked


def test_down_stops_everything_and_is_idempotent(dev_stack):
    groups = pgids(dev_stack)
    ray_tmp = dev_stack.recorded["SSCQ_RAY_TMP"]
    assert processes_mentioning(ray_tmp), "Ray processes should be running before down"
    r = run_script("down.sh", dev_stack.script_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped: mlflow ray moto" in r.stdout
    for name, pgid in groups.items():
        assert live_group_members(pgid) == [], f"{name} process group {pgid} still has live processes"
    assert processes_mentioning(ray_tmp) == []
    busy = [var for var, port in dev_stack.ports.items() if listening(port)]
    assert not busy, busy
    assert not (dev_stack.state_dir / "env.sh").exists()
    again = run_script("down.sh", dev_stack.script_env)
    assert again.returncode == 0 and "already down" in again.stdout
    assert run_script("status.sh", dev_stack.script_env).returncode == 1


# --- failure handling (no services started) ----------------------------------------------


def test_up_refuses_a_port_in_use_and_names_the_setting(tmp_path):
    stack = dev_stack_settings(tmp_path / "busy")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", stack.ports["SSCQ_S3_PORT"]))
        blocker.listen()
        try:
            r = run_script("up.sh", stack.script_env)
        finally:
            stop_dev_stack(stack)
    assert r.returncode != 0
    assert f"port {stack.ports['SSCQ_S3_PORT']}" in r.stderr and "SSCQ_S3_PORT" in r.stderr
    assert not any(listening(p) for v, p in stack.ports.items() if v != "SSCQ_S3_PORT")


def test_stale_pid_file_of_another_process_group_is_never_signalled(tmp_path):
    """A pid file whose number now belongs to someone else (here: this test's own process
    group) reads as 'not running', and down.sh leaves that group alone."""
    stack = dev_stack_settings(tmp_path / "stale")
    (stack.state_dir / "pids").mkdir(parents=True)
    for name in ("moto", "mlflow", "ray"):
        (stack.state_dir / "pids" / f"{name}.pgid").write_text(f"{os.getpgid(0)}\n")
    status = run_script("status.sh", stack.script_env)
    assert status.returncode == 1 and status.stdout.count(" DOWN ") == 3
    r = run_script("down.sh", stack.script_env)
    assert r.returncode == 0 and "already down" in r.stdout
    assert not list((stack.state_dir / "pids").iterdir())
