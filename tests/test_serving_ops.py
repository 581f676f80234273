"""The search service as an operator exposes it (issue 23): every route under the token, the
abuse inputs, the rate limit and the Prometheus scrape, over real HTTP against one real Ray
Serve service (2 partitions over the digits, indexed with an untrained model: these tests
check the guard, not the answers; tests/test_serving.py checks the answers).

The service is started with a token on 127.0.0.1 only: a token given is always enforced, so
this is what a non-loopback bind serves (the bind-host rule itself: test_serving_guard.py and
test_open_bind_is_refused_before_serve_starts below).
"""

import dataclasses
import json
import os
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import pyarrow.parquet as pq
import pytest

from conftest import free_port, make_cfg
from fault_helpers import leaks, random_model_dir
from sscq_dist.config import ServeConfig
from sscq_dist.errors import SSCQError
from sscq_dist.indexing.formats import read_current
from sscq_dist.indexing.reindex import reindex
from sscq_dist.serving.auth import TOKEN_ENV
from sscq_dist.storage import resolve
from test_serving_guard import chunked_upload

pytestmark = pytest.mark.slow

TOKEN = "ops-test-token-do-not-log-7f3a9c2e1b"
RATE, BURST = 20.0, 40


@pytest.fixture(scope="module")
def service(ray_local, digits_dir, tmp_path_factory):
    from ray import serve

    from sscq_dist.serving.app import start_local

    work = tmp_path_factory.mktemp("ops")
    cfg = make_cfg(work, digits_dir)
    sv = ServeConfig(partitions=2, partition_cpus=0.25, ingress_cpus=0.25, watch_interval_s=1.0,
                     cache_dir=str(work / "cache"), health_check_period_s=1.0, graceful_shutdown_wait_loop_s=0.5, rate_limit_per_s=RATE,
                     rate_limit_burst=BURST, max_upload_bytes=2_000_000)
    cfg = dataclasses.replace(cfg, serve=sv)
    root = str(work / "index")
    reindex(cfg.data.train_uri, root, random_model_dir(str(work / "model"), 3), cfg, progress=False)
    os.environ[TOKEN_ENV] = TOKEN  # read by start_local in this process only
    try:
        url = start_local(root, cfg, port=free_port(), host="127.0.0.1")
    finally:
        del os.environ[TOKEN_ENV]
    test_dir = os.path.join(digits_dir, "test")
    first = sorted(f for f in os.listdir(test_dir) if f.startswith("part-") and f.endswith(".parquet"))[0]
    image = pq.read_table(os.path.join(test_dir, first), columns=["image"]).column("image")[0].as_py()
    yield {"url": url, "root": root, "cfg": cfg, "image": image}
    serve.shutdown()


def http(url, path, token=TOKEN, data=None, headers=None, method=None, timeout=60):
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def multipart(image, boundary="sscqboundary", end=True):
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image
    return body + (f"\r\n--{boundary}--\r\n".encode() if end else b""), \
        {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def search(svc, image=None, k=5, token=TOKEN):
    body, headers = multipart(image or svc["image"])
    return http(svc["url"], f"/search?k={k}", token, body, headers)


def error_line(body: bytes) -> str:
    reason = json.loads(body)["error"]
    assert reason and "\n" not in reason and TOKEN not in reason
    return reason


def assert_next_good(svc):
    st, _, body = search(svc)
    assert st == 200 and len(json.loads(body)["results"]) == 5, body[:300]


def routes(svc):
    st, _, body = http(svc["url"], "/samples?n=2")
    assert st == 200, body
    thumb_id = json.loads(body)["ids"][0]
    st, _, body = http(svc["url"], "/version")
    dim = json.loads(body)["dim"]
    embedding, json_headers = json.dumps({"embedding": [0.0] * dim, "k": 3}).encode(), {"Content-Type": "application/json"}
    # (method path, body, headers, open without a token)
    return [("/", None, None, True), ("/app.js", None, None, True), ("/healthz", None, None, True),
            ("/version", None, None, False), ("/samples?n=2", None, None, False), (f"/thumb/{thumb_id}", None, None, False),
            ("/metrics", None, None, False), ("/search", embedding, json_headers, False)]


def test_every_route_by_token(service):
    """Each route with no token, a wrong token and the token: open routes answer all three,
    every other route answers 401 with a one-line reason until the right token is sent."""
    table = []
    for path, data, headers, open_route in routes(service):
        for name, token in (("none", None), ("wrong", "wrong-token-0123456789abcdef"), ("good", TOKEN)):
            st, h, body = http(service["url"], path, token, data, headers)
            table.append((path, name, st))
            if open_route or name == "good":
                assert st == 200, (path, name, st, body[:200])
            else:
                assert st == 401 and "bearer" in h.get("www-authenticate", "").lower(), (path, name, st)
                assert ("missing token" if token is None else "wrong token") in error_line(body)
            assert not leaks(body, [TOKEN])
    print(table)


def test_open_bind_is_refused_before_serve_starts(service):
    from sscq_dist.serving.app import start_local

    assert TOKEN_ENV not in os.environ
    cfg = service["cfg"]
    with pytest.raises(SSCQError, match="0.0.0.0.*not loopback"):
        start_local(service["root"], cfg, port=free_port(), host="0.0.0.0", name="never")


def test_endless_chunked_body_is_cut_at_the_limit(service):
    """A well-formed multipart start, then an image that never ends (no closing chunk is ever
    sent): 413 (the ingress stops reading at the limit), and the service keeps serving. How many
    bytes the client got to send first is up to Serve's proxy, which reads the socket ahead into
    its own queue (README, "Operating the service"; 100 MB once went through on a loaded
    machine before the answer came), so the client's cap is far above that: the answer must come
    while the body is still open. The guard's own stop-reading and flat-memory guarantee is
    proved on a plain server in test_serving_guard.py::test_chunked_body_stops_at_the_limit_memory_unchanged."""
    cap = 1024 * 2**20
    head = multipart(b"", boundary="x", end=False)[0]
    for _ in range(2):
        status, sent = chunked_upload(service["url"], cap, token=TOKEN, path="/search",
                                      ctype="multipart/form-data; boundary=x", prefix=head)
        assert status.startswith(b"HTTP/1.1 413"), status
        assert sent < cap, "no answer while the body was open"
        print(f"413 after {sent / 2**20:.0f} MB sent")
    assert_next_good(service)


def png_claiming(width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb as Pillow sees it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_png_bomb_30000_squared_is_413_before_decoding(service):
    bomb = png_claiming(30_000, 30_000)
    assert len(bomb) < 200
    t0 = time.perf_counter()
    st, _, body = search(service, bomb)
    assert st == 413 and ("pixels" in error_line(body) or "bomb" in error_line(body)), body
    assert time.perf_counter() - t0 < 10  # refused from the header, nothing decoded
    assert_next_good(service)


def test_truncated_multipart_is_400(service):
    body, headers = multipart(service["image"], end=False)
    st, _, out = http(service["url"], "/search", TOKEN, body[: len(body) // 2], headers)
    assert st == 400 and "multipart" in error_line(out) or "image" in error_line(out), out
    assert_next_good(service)


def test_wrong_content_type_is_415(service):
    st, _, out = http(service["url"], "/search", TOKEN, b"hello", {"Content-Type": "text/plain"})
    assert st == 415 and "text/plain" in error_line(out)
    assert_next_good(service)


def test_k_a_billion_is_422(service):
    st, _, out = search(service, k=10**9)
    assert st == 422 and "out of range" in error_line(out)
    assert_next_good(service)


def test_negative_thumb_id_is_refused(service):
    st, _, out = http(service["url"], "/thumb/-5")
    assert st in (404, 422) and "-5" in error_line(out)
    assert_next_good(service)


def test_path_traversal_in_current_and_index_root_is_refused(service):
    """A CURRENT naming '../..' is refused by the watchers (the service keeps its snapshot and
    says why on /healthz); an S3 index root with '..' is refused before any read."""
    from sscq_dist.serving.app import build_application

    cur = os.path.join(service["root"], "CURRENT")
    good = read_current(resolve(service["root"]))
    try:
        with open(cur, "w") as f:
            f.write("../../../etc/00000001\n")
        deadline = time.time() + 60
        while time.time() < deadline:
            st, _, body = http(service["url"], "/healthz", None)
            if b"cannot name an index directory" in body:
                break
            time.sleep(0.5)
        assert b"cannot name an index directory" in body, body[:400]
        assert json.loads(body)["version"] == good
        assert_next_good(service)
    finally:
        with open(cur, "w") as f:
            f.write(good + "\n")
    with pytest.raises(SSCQError, match=r"'\.\.' segment"):
        build_application("s3://bucket/index/../../other", service["cfg"])


def test_burst_of_1000_from_one_client_gets_429_with_retry_after(service):
    out, lock = [], threading.Lock()

    def client(n):
        for _ in range(n):
            st, h, body = http(service["url"], "/version")
            with lock:
                out.append((st, h.get("Retry-After") or h.get("retry-after"), body))

    threads = [threading.Thread(target=client, args=(125,)) for _ in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    took = time.perf_counter() - t0
    codes = [st for st, _, _ in out]
    limited = [(ra, body) for st, ra, body in out if st == 429]
    print(f"1000 requests in {took:.1f}s: {codes.count(200)} x 200, {len(limited)} x 429")
    assert len(out) == 1000 and set(codes) <= {200, 429}
    assert codes.count(200) <= BURST + RATE * took + 5  # never more than the bucket allows
    assert len(limited) >= 1000 - (BURST + RATE * took + 5)
    for ra, body in limited:
        assert ra is not None and int(ra) >= 1 and "rate limit" in error_line(body)
    time.sleep(int(limited[-1][0]) + 1)
    assert_next_good(service)


def scrape(url):
    from prometheus_client.parser import text_string_to_metric_families

    st, h, body = http(url, "/metrics")
    assert st == 200 and h["content-type"].startswith("text/plain"), (st, h)
    samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_are_present_and_move_after_a_query(service):
    before = scrape(service["url"])
    names = {n for n, _ in before}
    for name in ("sscq_requests_total", "sscq_request_seconds_bucket", "sscq_partition_seconds_bucket",
                 "sscq_generation", "sscq_serving_snapshot", "sscq_swaps_total", "sscq_rows_served_total",
                 "sscq_rate_limited_total", "sscq_partition_failures_total", "sscq_swap_seconds_count",
                 "sscq_rejected_total"):
        assert any(n == name for n in names) or name in ("sscq_partition_failures_total", "sscq_rejected_total"), name
    assert_next_good(service)  # 5 rows
    st, _, _ = http(service["url"], "/version", None)  # one 401
    after = scrape(service["url"])
    assert total(after, "sscq_requests_total", route="/search", status="200") == \
        total(before, "sscq_requests_total", route="/search", status="200") + 1
    assert total(after, "sscq_requests_total", route="/version", status="401") == \
        total(before, "sscq_requests_total", route="/version", status="401") + 1
    assert total(after, "sscq_rejected_total", reason="auth") == total(before, "sscq_rejected_total", reason="auth") + 1
    assert total(after, "sscq_rows_served_total") == total(before, "sscq_rows_served_total") + 5
    assert total(after, "sscq_request_seconds_count", route="/search") == \
        total(before, "sscq_request_seconds_count", route="/search") + 1
    for p in ("Partition0", "Partition1"):
        assert total(after, "sscq_partition_seconds_count", partition=p) > total(before, "sscq_partition_seconds_count",
                                                                                 partition=p)
    current = read_current(resolve(service["root"]))
    assert total(after, "sscq_generation") == int(current.split("/")[1])
    assert total(after, "sscq_serving_snapshot", version=current) == 1
    assert total(after, "sscq_rate_limited_total") >= total(before, "sscq_rate_limited_total")


def test_token_never_reaches_logs_or_stores(service, tmp_path):
    """After every test above sent it (and wrong ones): no byte of the Ray session's logs (Serve
    controller, proxy, replica and access logs), the index root or the MLflow store holds it."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    files = [p for d in (os.path.join(session, "logs"), service["root"], os.path.dirname(service["root"]))
             for p in (os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)]
    assert any("SearchIngress" in p or "serve" in p for p in files)  # the replicas' logs are among them
    leaked = []
    for p in files:
        try:
            with open(p, "rb") as f:
                if leaks(f.read(), [TOKEN]):
                    leaked.append(p)
        except OSError:
            pass  # a socket or a file removed meanwhile
    assert not leaked, leaked
