"""The service's guard (sscq_dist/serving/guard.py, auth.py, limits.py, metrics.py) on a real
HTTP server: uvicorn on 127.0.0.1 serving a small FastAPI app behind the same middleware, so
the in-flight bound, the deadline and the streamed body limit are exercised with exact timing.
The routes of the real service under the guard are in tests/test_serving_ops.py."""

import asyncio
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import free_port
from fault_helpers import assert_one_error_line, run_job
from sscq_dist.errors import SSCQError
from sscq_dist.serving import guard
from sscq_dist.serving.auth import TOKEN_ENV, Secret, check_bearer, decide_auth, is_loopback, load_token
from sscq_dist.serving.limits import TokenBucket

TOKEN = "guard-test-token-0123456789abcdef"


def test_auth_is_a_function_of_the_bind_host():
    for host in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and decide_auth(host, None, False) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "search.internal"):
        assert not is_loopback(host)
        with pytest.raises(SSCQError, match="not loopback.*SSCQ_SERVE_TOKEN.*--insecure-no-auth"):
            decide_auth(host, None, False)
        assert decide_auth(host, None, True) is None  # the explicit opt-out
        tok = Secret(TOKEN)
        assert decide_auth(host, tok, False) is tok
    assert decide_auth("127.0.0.1", Secret(TOKEN), False) is not None  # a token given is always enforced


def test_token_from_env_or_file_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token(None) is None
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    tok = load_token(str(f))
    assert tok.reveal() == TOKEN and TOKEN not in repr(tok) and TOKEN not in f"{tok}"
    monkeypatch.setenv(TOKEN_ENV, "env-" + TOKEN)
    assert load_token(str(f)).reveal() == "env-" + TOKEN  # the env var wins
    monkeypatch.delenv(TOKEN_ENV)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SSCQError, match="is empty"):
        load_token(str(tmp_path / "empty"))
    with pytest.raises(SSCQError, match="cannot read"):
        load_token(str(tmp_path / "missing"))
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(SSCQError, match="too short") as exc:
        load_token(None)
    assert "short'" not in str(exc.value)


def test_bearer_check_reasons_never_echo_the_token():
    tok = Secret(TOKEN)
    assert check_bearer(f"Bearer {TOKEN}", tok) is None and check_bearer(f"bearer  {TOKEN} ", tok) is None
    for header, why in ((None, "missing"), ("", "missing"), (TOKEN, "malformed"), (f"Basic {TOKEN}", "malformed"),
                        ("Bearer nope", "wrong token"), (f"Bearer {TOKEN}x", "wrong token")):
        reason = check_bearer(header, tok)
        assert why in reason and TOKEN not in reason, header


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, max_clients=2, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)  # empty: one token in 1/rate s
    assert bucket.take("b") == 0.0  # another client has its own bucket
    now[0] = 1.0
    assert bucket.take("a") == 0.0  # refilled
    bucket.take("c")
    assert len(bucket._buckets) == 2  # bounded: the least recently seen client dropped


# --------------------------------------------------------------------------- on a real server


@pytest.fixture(scope="module")
def server():
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.add_middleware(guard.ServiceGuard)

    @app.get("/slow")
    async def slow(s: float = 1.0):
        await asyncio.sleep(s)
        return {"slept": s}

    @app.post("/echo")
    async def echo(request: Request):
        return JSONResponse({"bytes": len(await request.body())})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(timeout=10)


def settings(**kw):
    base = dict(token=Secret(TOKEN), rate_limit_per_s=1000.0, rate_limit_burst=1000, max_in_flight=64,
                request_timeout_s=30.0, max_upload_bytes=1_000_000)
    base.update(kw)
    return guard.GuardSettings(**base)


def call(url, path, token=TOKEN, data=None, timeout=30):
    req = urllib.request.Request(url + path, data=data, headers={"Authorization": f"Bearer {token}"} if token else {})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read(), time.perf_counter() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read(), time.perf_counter() - t0


def test_bounded_in_flight_answers_503_at_once_with_retry_after(server):
    guard.install(settings(max_in_flight=2))
    out = []
    threads = [threading.Thread(target=lambda: out.append(call(server, "/slow?s=1.5"))) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=30)
    ok = [o for o in out if o[0] == 200]
    busy = [o for o in out if o[0] == 503]
    assert len(ok) == 2 and len(busy) == 4, [o[0] for o in out]
    for st, headers, body, took in busy:
        assert headers["retry-after"] == "1" and b"in flight" in body and took < 1.0  # never queued behind
    assert call(server, "/slow?s=0")[0] == 200  # room again once the slow ones finished


def test_request_deadline_answers_504(server):
    guard.install(settings(request_timeout_s=0.5))
    st, _, body, took = call(server, "/slow?s=5")
    assert st == 504 and b"deadline of 0.5s" in body and took < 3.0
    assert call(server, "/slow?s=0")[0] == 200


def test_missing_or_wrong_token_is_401_healthz_open(server):
    guard.install(settings())
    for token, why in ((None, b"missing token"), ("wrong-token-abcdefghijklmnop", b"wrong token")):
        st, headers, body, _ = call(server, "/slow?s=0", token=token)
        assert st == 401 and why in body and TOKEN.encode() not in body and "bearer" in headers["www-authenticate"].lower()
    assert call(server, "/healthz", token=None)[0] == 200
    assert call(server, "/slow?s=0")[0] == 200


def test_chunked_body_stops_at_the_limit_memory_unchanged(server):
    """100 MB sent chunked (no Content-Length): 413 once 1 MB is in, and the server holds no copy."""
    guard.install(settings(max_upload_bytes=1_000_000))
    status, sent = chunked_upload(server, 100 * 2**20)
    assert status.startswith(b"HTTP/1.1 413"), status
    assert sent < 60 * 2**20, f"the server kept reading: {sent} bytes were accepted"
    # Memory: the server (this process) did not buffer the body.
    rss0 = psutil.Process().memory_info().rss
    for _ in range(3):
        status, _ = chunked_upload(server, 100 * 2**20)
        assert status.startswith(b"HTTP/1.1 413")
    assert psutil.Process().memory_info().rss - rss0 < 30 * 2**20
    assert call(server, "/echo", data=b"x" * 1000)[0] == 200


def chunked_upload(url, total, chunk=256 * 1024, token=TOKEN, path="/echo", ctype="application/json", prefix=b""):
    """Send `prefix` then `total` zero bytes chunked (Transfer-Encoding, no Content-Length) until
    the server answers; returns (status line, bytes sent)."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port.split("/")[0])), timeout=60)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Type: {ctype}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()
    sock.sendall(head + (f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n" if prefix else b""))
    sent, payload, reply = 0, b"\0" * chunk, b""
    sock.setblocking(False)
    import select

    try:
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if writable:
                try:
                    sock.sendall(f"{chunk:x}\r\n".encode() + payload + b"\r\n")
                    sent += chunk
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    break
        sock.setblocking(True)
        sock.settimeout(30)
        try:
            reply = sock.recv(4096)
        except (ConnectionResetError, socket.timeout):
            reply = b""
    finally:
        sock.close()
    return reply.split(b"\r\n")[0], sent


def test_sscq_serve_refuses_an_open_non_loopback_bind(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = run_job("serve.py", "--index-root", str(tmp_path / "idx"), "--host", "0.0.0.0", env=env, timeout=120)
    assert_one_error_line(out, "0.0.0.0", "not loopback", "--insecure-no-auth")
