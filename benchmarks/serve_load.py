"""Sustained load with faults against the search service (issue 23, SPEC section 9).

    python benchmarks/serve_load.py                    # 8 clients, 90 s, swap at 30 s, kill at 55 s
    python benchmarks/serve_load.py --smoke            # 4 clients, 30 s (the suite's smoke)
    python benchmarks/serve_load.py --no-faults        # the same load without faults (the baseline)

A 2-partition service (token on, 127.0.0.1 only) over the digits, indexed with an untrained
model; N client threads POST real query images for a fixed time, each request with a client
timeout of the service deadline + 5 s (a request still open then counts as a hang). During
the run (a) a new generation, indexed with a second model, is published and swapped in, and
(b) the replica of Partition1 is SIGKILLed. Reported: QPS, p50/p95/p99, status counts, every
non-2xx reason, the longest request, failures inside the swap window, the seconds from the
kill until a 5 s window is back at 80 % of the pre-kill QPS, and the RSS of the proxy, the
ingress and the partition replicas sampled every 2 s. Writes <out>/serve_load.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402

TOKEN = uuid.uuid4().hex + uuid.uuid4().hex  # this run's token; never printed
APP = "sscq-load"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=90.0, help="seconds of load")
    p.add_argument("--swap-at", type=float, default=30.0, help="seconds into the run to start publishing")
    p.add_argument("--kill-at", type=float, default=55.0, help="seconds into the run to SIGKILL a replica")
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--deadline", type=float, default=10.0, help="serve.request_timeout_s")
    p.add_argument("--swap", choices=("reindex", "republish"), default="reindex",
                   help="reindex: a new model's index (a new version, the encoder changes too); republish: the "
                        "same parts as the next generation (seconds, no Ray Data job)")
    p.add_argument("--no-faults", action="store_true")
    p.add_argument("--smoke", action="store_true", help="4 clients, 24 s, republish at 3 s, kill at 8 s")
    p.add_argument("--work", default="benchmarks/results/serve_load_work")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.smoke:
        a.clients, a.duration, a.swap_at, a.kill_at, a.swap = 4, 24.0, 3.0, 8.0, "republish"
    return a


def model_dir(path: str, seed: int) -> str:
    """An untrained SSCQ model (digits config): indexing and serving need one model, not a good one."""
    import torch

    from sscq_dist.config import load_config
    from sscq_dist.model import build_model
    from sscq_dist.registry import write_model_dir

    cfg = load_config(bs.default_config("digits"))
    torch.manual_seed(seed)
    write_model_dir(path, build_model(cfg.model, cfg.data.channels).state_dict(), cfg)
    return path


def query_images(test_uri: str, n: int = 64) -> list[bytes]:
    import pyarrow.parquet as pq

    files = sorted(f for f in os.listdir(test_uri) if f.startswith("part-") and f.endswith(".parquet"))
    return pq.read_table(os.path.join(test_uri, files[0]), columns=["image"]).column("image").to_pylist()[:n]


def post(url: str, image: bytes, timeout: float) -> tuple[int, str, str]:
    """(status, version or error reason, '') ; status -1 for a client-side failure (timeout = hang)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q\"\r\n\r\n").encode() \
        + image + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "search?k=10", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())["version"]
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw).get("error") or ""
        except ValueError:
            return exc.code, raw.decode("utf-8", "replace")[:200]
    except Exception as exc:  # timeout or refused connection
        return -1, f"{type(exc).__name__}: {str(exc)[:160]}"


def serve_rss(app: str) -> dict[str, int]:
    """Resident bytes of this app's replicas and the proxies, summed by kind."""
    import psutil

    out = {"proxy": 0, "ingress": 0, "partitions": 0}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        kind = ("proxy" if "ProxyActor" in cmd else "ingress" if f"{app}:SearchIngress" in cmd
                else "partitions" if f"{app}:Partition" in cmd else None)
        if kind:
            try:
                out[kind] += p.memory_info().rss
            except psutil.Error:
                pass
    return out


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    v = np.asarray(values) * 1000
    return {"p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)),
            "p99_ms": float(np.percentile(v, 99))}


def recovery_seconds(log: list, t_kill: float, t_end: float, baseline_qps: float) -> float | None:
    """Seconds from the kill to the end of the first 5 s window answering >= 80 % of baseline QPS."""
    ok = np.asarray(sorted(t1 for t0, t1, st, _ in log if st == 200 and t1 >= t_kill))
    t = t_kill + 5.0
    while t <= t_end:
        if ((ok > t - 5.0) & (ok <= t)).sum() / 5.0 >= 0.8 * baseline_qps:
            return t - t_kill
        t += 0.5
    return None


def main(argv=None) -> dict:
    a = parse_args(argv)
    from ray import serve

    from sscq_dist.config import ServeConfig, load_config
    from sscq_dist.indexing.reindex import reindex
    from sscq_dist.serving.app import start_local

    os.makedirs(a.work, exist_ok=True)
    train, test = bs.ensure_source("digits", os.path.join(a.work, "digits"))
    cfg = load_config(bs.default_config("digits"), [f"tracking.tracking_uri=sqlite:///{os.path.abspath(a.work)}/mlflow.db"])
    sv = ServeConfig(partitions=a.partitions, partition_cpus=0.25, ingress_cpus=0.25, watch_interval_s=1.0,
                     retain_previous_s=10.0, cache_dir=os.path.abspath(os.path.join(a.work, "cache")),
                     health_check_period_s=1.0, graceful_shutdown_wait_loop_s=0.5, health_check_timeout_s=5.0, partition_timeout_s=a.deadline / 3,
                     partition_retries=1, request_timeout_s=a.deadline,
                     rate_limit_per_s=100_000.0, rate_limit_burst=100_000)  # one client address: no rate limit here
    import dataclasses

    cfg = dataclasses.replace(cfg, serve=sv)
    root = os.path.abspath(os.path.join(a.work, f"index-{uuid.uuid4().hex[:8]}"))
    bs.start_ray(max(4, os.cpu_count() or 1), quiet=True)
    t0 = time.perf_counter()
    first = reindex(train, root, model_dir(os.path.join(a.work, "model-a"), 1), cfg, progress=False)
    second_model = model_dir(os.path.join(a.work, "model-b"), 2)
    os.environ["SSCQ_SERVE_TOKEN"] = TOKEN
    port = bs_free_port()
    url = start_local(root, cfg, port=port, host="127.0.0.1", name=APP)
    print(f"index {first.snapshot} + service up in {time.perf_counter() - t0:.0f}s", flush=True)
    images = query_images(test)
    log, stop_flag, lock = [], threading.Event(), threading.Lock()
    timeout = a.deadline + 5.0

    def client(i: int) -> None:
        j = i
        while not stop_flag.is_set():
            s = time.monotonic()
            st, what = post(url, images[j % len(images)], timeout)
            with lock:
                log.append((s, time.monotonic(), st, what))
            j += a.clients

    rss, events = [], {}

    def sampler() -> None:
        while not stop_flag.is_set():
            rss.append((time.monotonic(), serve_rss(APP)))
            stop_flag.wait(2.0)

    def faults(start: float) -> None:
        if a.no_faults:
            return
        stop_flag.wait(max(0.0, start + a.swap_at - time.monotonic()))
        if stop_flag.is_set():
            return
        events["publish_start"] = time.monotonic()
        if a.swap == "reindex":
            events["new_snapshot"] = reindex(train, root, second_model, cfg, progress=False).snapshot
        else:
            events["new_snapshot"] = republish(root, cfg)
        events["published"] = time.monotonic()
        stop_flag.wait(max(0.0, start + a.kill_at - time.monotonic()))
        if stop_flag.is_set():
            return
        handle = serve.get_deployment_handle(f"Partition{a.partitions - 1}", app_name=APP)
        pid = handle.pid.remote().result(timeout_s=30)
        os.kill(pid, signal.SIGKILL)
        events["killed"] = time.monotonic()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    threads += [threading.Thread(target=sampler, daemon=True)]
    fault_thread = threading.Thread(target=faults, args=(start,), daemon=True)
    for t in threads + [fault_thread]:
        t.start()
    time.sleep(a.duration)
    stop_flag.set()
    for t in threads:
        t.join(timeout=timeout + 5)
    fault_thread.join(timeout=120)
    end = time.monotonic()
    serve.delete(APP)  # only this app: a joined cluster may serve others
    os.environ.pop("SSCQ_SERVE_TOKEN", None)

    res = summarize(a, log, rss, events, start, end, first.snapshot)
    os.makedirs(a.out, exist_ok=True)
    bs.write_json(os.path.join(a.out, "serve_load_smoke.json" if a.smoke else "serve_load.json"), res)
    print(table(res, a), flush=True)
    return res


def republish(root_uri: str, cfg) -> str:
    """Publish the serving snapshot's parts again as the next generation (under the writer lock)."""
    import dataclasses

    from sscq_dist.indexing.formats import list_generations, now_iso, read_current, read_snapshot
    from sscq_dist.indexing.lock import IndexLock
    from sscq_dist.indexing.publish import publish_snapshot
    from sscq_dist.storage import resolve

    root = resolve(root_uri)
    with IndexLock(root, "serve_load", cfg.index.lock_ttl_s) as lock:
        current = read_current(root)
        snap = read_snapshot(root, current)
        new = dataclasses.replace(snap, generation=max(list_generations(root, snap.model_version)) + 1,
                                  previous=current, created_at=now_iso(), writer="serve_load", fence=lock.fence)
        return publish_snapshot(root, new, current, lock).name


def bs_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(a, log, rss, events, start, end, first_snapshot) -> dict:
    statuses: dict[str, int] = {}
    for _, _, st, _ in log:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    ok = [t1 - t0 for t0, t1, st, _ in log if st == 200]
    reasons = sorted({f"{st}: {what}" for _, _, st, what in log if st != 200})
    longest = max((t1 - t0 for t0, t1, _, _ in log), default=0.0)
    kill = events.get("killed")
    pre = [t1 for t0, t1, st, _ in log if st == 200 and t1 < (kill or end)]
    baseline = len(pre) / max(1e-9, (kill or end) - start)
    swap_fail = [(st, what) for t0, t1, st, what in log
                 if st != 200 and "publish_start" in events and t0 >= events["publish_start"] and t1 < (kill or end)]
    versions = {}
    for _, _, st, what in log:
        if st == 200:
            versions[what] = versions.get(what, 0) + 1
    rss_first = rss[min(2, len(rss) - 1)][1] if rss else {}
    rss_last = rss[-1][1] if rss else {}
    return {
        "clients": a.clients, "duration_s": end - start, "faults": not a.no_faults, "deadline_s": a.deadline,
        "requests": len(log), "qps": statuses.get("200", 0) / (end - start), **percentiles(ok),
        "statuses": statuses, "non_2xx_reasons": reasons[:20], "longest_request_s": longest,
        "hangs": statuses.get("-1", 0), "baseline_qps_before_kill": baseline,
        "swap": {"published_after_s": (events["published"] - start) if "published" in events else None,
                 "failures_in_swap_window": len(swap_fail), "answers_by_version": versions,
                 "first": first_snapshot, "new": events.get("new_snapshot")},
        "kill_at_s": (kill - start) if kill else None,
        "recovery_s": recovery_seconds(log, kill, end, baseline) if kill else None,
        "rss_mb": {k: {"start": rss_first.get(k, 0) / 2**20, "end": rss_last.get(k, 0) / 2**20,
                       "max": max(r[1].get(k, 0) for r in rss) / 2**20} for k in rss_first},
        "rss_samples": len(rss),
    }


def table(r: dict, a) -> str:
    st = ", ".join(f"{k} x {v}" for k, v in sorted(r["statuses"].items()))
    rss = "; ".join(f"{k} {v['start']:.0f} -> {v['end']:.0f} MB (max {v['max']:.0f})" for k, v in r["rss_mb"].items())
    rec = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
    lines = ["| run | clients | s | QPS | p50 ms | p95 ms | p99 ms | statuses | longest s | swap-window failures | "
             "recovery s after kill | RSS (proxy; ingress; partitions) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {'faults' if r['faults'] else 'no faults'} | {r['clients']} | {r['duration_s']:.0f} | {r['qps']:.1f} | "
             f"{bs.fmt(r['p50_ms'], 1)} | {bs.fmt(r['p95_ms'], 1)} | {bs.fmt(r['p99_ms'], 1)} | {st} | "
             f"{r['longest_request_s']:.1f} | {r['swap']['failures_in_swap_window']} | {rec} | {rss} |"]
    if r["non_2xx_reasons"]:
        lines.append("non-2xx reasons: " + " / ".join(r["non_2xx_reasons"][:6]))
    lines.append(f"answers by version: {r['swap']['answers_by_version']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
