"""Running the search service from a command line or the demo: start, query once, stop."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Optional

from sscq_dist.config import Config
from sscq_dist.console import CONSOLE
from sscq_dist.errors import SSCQError


def start(index_root: str, cfg: Config, model_uri: Optional[str] = None, host: Optional[str] = None,
          port: Optional[int] = None) -> str:
    """Join RAY_ADDRESS or start a local Ray, deploy the service; returns its URL."""
    from sscq_dist.serving.app import start_local
    from sscq_dist.serving.auth import decide_auth, load_token
    from sscq_dist.train.driver import init_ray

    # Refuse an open non-loopback bind before any cluster work (start_local checks again).
    decide_auth(host or cfg.serve.host, load_token(cfg.serve.token_file), cfg.serve.insecure_no_auth)
    init_ray(cfg)
    t0 = time.perf_counter()
    CONSOLE.line(f"serve: starting {cfg.serve.partitions} partition(s) x {cfg.serve.replicas_per_partition} replica(s) "
                 f"over {index_root} ...")
    url = start_local(index_root, cfg, model_uri=model_uri, host=host, port=port)
    CONSOLE.line(f"serve: ready in {time.perf_counter() - t0:.0f}s at {url}")
    return url


def stop() -> None:
    from ray import serve

    serve.shutdown()


def run_until_interrupted(index_root: str, cfg: Config, model_uri: Optional[str] = None, host: Optional[str] = None,
                          port: Optional[int] = None) -> None:
    """Serve until Ctrl-C (or SIGTERM), then shut the service down."""
    import signal

    url = start(index_root, cfg, model_uri, host, port)
    CONSOLE.line(f"open {url} in a browser; API: POST {url}search (multipart 'image' or JSON 'embedding'), "
                 f"GET {url}healthz, {url}version, {url}thumb/<id>")
    CONSOLE.line("Ctrl-C stops the service")
    # Ctrl-C and SIGTERM both stop cleanly (a shell that starts us in the background ignores
    # SIGINT, and Python then installs no KeyboardInterrupt handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        CONSOLE.line("serve: stopping")
    finally:
        stop()
    CONSOLE.line("serve: stopped")


def auth_headers(token: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def post_image(url: str, image: bytes, k: int, timeout: float = 30.0, token: Optional[str] = None) -> tuple[int, dict]:
    """POST one image to <url>search as multipart; returns (HTTP status, JSON body)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"query\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/search?k={k}", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          **auth_headers(token)})
    return _send(req, timeout)


def post_json(url: str, payload: dict, timeout: float = 30.0, token: Optional[str] = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url.rstrip('/')}/search", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **auth_headers(token)})
    return _send(req, timeout)


def _send(req: urllib.request.Request, timeout: float) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        data = exc.read()
        try:
            return exc.code, json.loads(data)
        except ValueError:
            return exc.code, {"error": data.decode("utf-8", "replace")[:300]}
    except (urllib.error.URLError, OSError) as exc:
        raise SSCQError(f"search service at {req.full_url} unreachable: {exc}") from None
