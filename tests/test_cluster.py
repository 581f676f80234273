"""The local/dev stack (cluster/up.sh, status.sh, down.sh) with its real processes:
a Ray head with token auth, moto's S3 server, an MLflow server storing artifacts in it.

Runs on free ports and a temporary state dir, so it never touches a user's own stack.
The helpers `dev_stack_settings` / `start_dev_stack` / `stop_dev_stack` and the `dev_stack` fixture are meant to
be reused by end-to-end tests.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PORT_VARS = ("SSCQ_RAY_PORT", "SSCQ_RAY_DASHBOARD_PORT", "SSCQ_RAY_CLIENT_PORT", "SSCQ_RAY_AGENT_PORT",
             "SSCQ_S3_PORT", "SSCQ_MLFLOW_PORT")
# Client-side names cluster/up.sh must export in env.sh.
CLIENT_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
              "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
              "SSCQ_BUCKET", "SSCQ_STACK_DIR")
SCRIPT_TIMEOUT_S = 240


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
    env.update(SSCQ_STACK_DIR=str(state_dir), SSCQ_BUCKET="sscq-test", VENV=str(REPO / ".venv"),
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
    secrets = [dev_stack.token, dev_stack.client_env["AWS_SECRET_ACCESS_KEY"]]
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
    r = subprocess.run([str(REPO / ".venv" / "bin" / "ray"), "job", "submit", "--working-dir", ".", "--",
                        "python", "probe.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=SCRIPT_TIMEOUT_S)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # `python` in an entrypoint is the venv's interpreter (it imported ray above).
    expected = (f"PROBE {dev_stack.url('SSCQ_S3_PORT')} {dev_stack.url('SSCQ_MLFLOW_PORT')} True "
                f"{REPO / '.venv'}")
    assert expected in out
    assert dev_stack.token not in out


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
