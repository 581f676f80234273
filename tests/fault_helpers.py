"""Helpers shared by the fault-injection tests (reliability, bad inputs, security).

Real parts only: models are written as the plain-file model directory the registry reads,
jobs run as real subprocesses; Ray and `mlflow server` are real processes, S3 is moto's emulator.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from conftest import REPO, free_port  # noqa: F401 (free_port: re-exported for the fault tests)

DIGITS_YAML = os.path.join(REPO, "configs", "digits.yaml")
# Subprocess jobs get this long before a test gives up on them (generous: CI machines are slow).
JOB_TIMEOUT_S = 600


def random_model_dir(path: str, seed: int = 0, *overrides: str) -> str:
    """An untrained SSCQ model (digits config) as a model directory usable as --model.

    Indexing does not care how good the codes are, only that they come from one model, so
    the reindex fault tests skip training entirely.
    """
    import torch

    from sscq_dist.config import load_config
    from sscq_dist.model import build_model
    from sscq_dist.registry import write_model_dir

    cfg = load_config(DIGITS_YAML, list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.channels)
    write_model_dir(path, model.state_dict(), cfg)
    return path


def job_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "jobs", script), *args]


def job_env(ray=None, **extra: str) -> dict:
    """Environment for a job subprocess; joins the session Ray when given (no second Ray start)."""
    # Verbose: these tests read the jobs' log lines (and the workers' output) on the terminal;
    # test_console.py covers the quiet default.
    env = dict(os.environ, PYTHONPATH=REPO, SSCQ_LOG_LEVEL="INFO", SSCQ_VERBOSE="1")
    if ray is not None:
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    env.update(extra)
    return env


def run_job(script: str, *args: str, env: Optional[dict] = None, cwd: Optional[str] = None,
            timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(job_cmd(script, *args), env=env or job_env(), cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout)


def start_job(script: str, *args: str, env: Optional[dict] = None, cwd: Optional[str] = None,
              log_path: Optional[str] = None) -> subprocess.Popen:
    """A job in its own process group (so a kill takes every child with it), output to a file."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(job_cmd(script, *args), env=env or job_env(), cwd=cwd or REPO, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the job and everything it started (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one `error:` line on stderr naming every needle, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    """Poll cond() until it returns a truthy value; fail naming `what` after timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Pause:
    """A `pause(DIR)` failpoint (sscq_dist/failpoints.py) a test holds and releases: the code
    under test stops at the named step until `release()`; `reached()` waits until it is there.
    once=True: only the first caller stops (`pause_once`), later ones pass through."""

    def __init__(self, folder: str, name: str, once: bool = False):
        self.folder, self.name, self.once = str(folder), name, once
        os.makedirs(self.folder, exist_ok=True)

    @property
    def spec(self) -> str:
        """The SSCQ_FAILPOINTS entry."""
        return f"{self.name}={'pause_once' if self.once else 'pause'}({self.folder})"

    def reached(self, timeout: float = JOB_TIMEOUT_S, alive=None) -> None:
        """Wait until the point is reached; `alive()` returning False (a job that exited) fails early."""
        marker = os.path.join(self.folder, f"{self.name}.reached")

        def there():
            assert alive is None or alive(), f"exited before reaching failpoint {self.name}"
            return os.path.exists(marker)
        wait_for(there, timeout, f"failpoint {self.name}", interval=0.02)

    def release(self) -> None:
        open(os.path.join(self.folder, f"{self.name}.release"), "w").close()

    def hold(self) -> None:
        """Close a released point again: callers from now on stop there (and mark it reached)."""
        for suffix in (".release", ".reached"):
            try:
                os.remove(os.path.join(self.folder, self.name + suffix))
            except FileNotFoundError:
                pass


def promotion_writes(uri: str, name: str, version: str) -> tuple:
    """What a promotion can write: its runs, the version's tags, the champion alias."""
    from mlflow.tracking import MlflowClient

    from sscq_dist.promotion import PROMOTION_EXPERIMENT
    from sscq_dist.registry import CHAMPION

    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(PROMOTION_EXPERIMENT)
    runs = [r.info.run_id for r in client.search_runs([exp.experiment_id])] if exp else []
    champ = client.get_registered_model(name).aliases.get(CHAMPION)
    return sorted(runs), dict(client.get_model_version(name, version).tags), str(champ)


def leaks(data: bytes | str, secrets) -> list[str]:
    """Which of the secret values occur in data."""
    raw = data.encode() if isinstance(data, str) else data
    return [s for s in secrets if s.encode() in raw]


def s3_objects(bucket: str, endpoint_url: str) -> dict[str, bytes]:
    """Every object of a bucket on an S3 endpoint, key -> bytes."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def image_bytes(im, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class MlflowServer:
    """A real `mlflow server` process with a SQLite backend and local artifact store."""

    workdir: str
    port: int
    proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend(self) -> str:
        return f"sqlite:///{self.workdir}/mlflow-server.db"

    def start(self, timeout: float = 120) -> "MlflowServer":
        import urllib.request

        os.makedirs(self.workdir, exist_ok=True)
        cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--backend-store-uri", self.backend,
               "--artifacts-destination", os.path.join(self.workdir, "server-artifacts"), "--workers", "1"]
        log = open(os.path.join(self.workdir, f"mlflow-server-{time.time():.0f}.log"), "w")
        # MLflow's job runner (GenAI evaluation jobs: a runner and ~7 huey consumer processes,
        # ~2.5 CPU-s each to start) is off, as in the dev stack and the cluster manifest.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)

        def up():
            assert self.proc.poll() is None, f"mlflow server exited {self.proc.returncode}; see {log.name}"
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(up, timeout, f"mlflow server on {self.uri}", interval=0.3)
        return self

    def kill(self) -> None:
        """SIGKILL the server and its workers: the endpoint refuses connections at once."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


class HungEndpoint:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers.

    What a client sees from an endpoint whose process is stuck (or a black-holing proxy):
    the connection succeeds, no byte ever comes back. `connections` counts the accepted
    connections, i.e. the HTTP tries a client made.
    """

    def __init__(self):
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.held: list = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.held.append(conn)  # keep it open: never read, never answer
            self.connections += 1

    def close(self) -> None:
        for c in self.held:
            c.close()
        self.sock.close()


class CountingProxy:
    """A transparent HTTP proxy in front of a real server: forwards every request unchanged and
    counts them by (method, path), i.e. the requests the server behind it received."""

    def __init__(self, target: str):
        import collections
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        host, port = urlsplit(target).hostname, urlsplit(target).port
        self.counts: collections.Counter = collections.Counter()
        counts, lock = self.counts, threading.Lock()

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    counts[(self.command, self.path.split("?")[0])] += 1
                conn = http.client.HTTPConnection(host, port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, method: str, path: str) -> int:
        return self.counts[(method, path)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DenyingEndpoint:
    """An HTTP endpoint that answers every S3 request `403 AccessDenied`, as S3 does for a
    bucket whose policy denies the caller."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>")

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = self.BODY

        class Deny(BaseHTTPRequestHandler):
            def _deny(self, with_body: bool = True) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_HEAD(self):
                self._deny(with_body=False)

            do_GET = do_PUT = do_POST = do_DELETE = _deny

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def record_s3_requests(monkeypatch, detail) -> list:
    """From now on, every S3 request the storage layer makes is appended to the returned list
    as (operation name, detail(request params)), counted at the S3 client (real requests)."""
    from sscq_dist import storage

    calls: list = []
    original = storage.s3fs_filesystem

    def counting(cfg=None):
        fs = original(cfg)
        fs.connect()
        fs.s3.meta.events.register("before-parameter-build.s3",
                                   lambda params, model, **kw: calls.append((model.name, detail(params))))
        return fs
    monkeypatch.setattr(storage, "s3fs_filesystem", counting)
    return calls
