"""The search service end to end: a real local Ray + Serve, real HTTP, a real browser.

One service (2 partitions over the digits indexed with the session's trained model) is
shared by the tests of this module, in order: answers equal the in-process search and match
the offline evaluation; bad inputs get 4xx; the web page works in headless Chromium; a killed
partition replica is replaced without silent partial answers; then (they move CURRENT)
a new champion is indexed and swapped in under a continuous client load, and last the
snapshot the service still serves survives garbage collection through its reader leases.
"""

import dataclasses
import io
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import free_port
from fault_helpers import Pause, random_model_dir, wait_for
from sscq_dist.config import ServeConfig
from sscq_dist.failpoints import ENV as FAILPOINTS_ENV
from sscq_dist.data.decode import decode_image
from sscq_dist.model.encoding import embed_images
from sscq_dist.indexing.formats import read_current, read_snapshot
from sscq_dist.indexing.leases import leased_snapshots, read_leases
from sscq_dist.indexing.publish import GcPolicy, collect_garbage
from sscq_dist.indexing.reindex import reindex
from sscq_dist.registry import load_model
from sscq_dist.serving.searcher import Searcher
from sscq_dist.serving.service import post_image, post_json
from sscq_dist.storage import resolve

pytestmark = pytest.mark.slow

K = 10
WATCH_S = 1.0
# Load and scheduling allowance on top of the watch interval (a busy 2-core CI machine).
SWAP_SLACK_S = 20.0
# The hot-swap load must be answered this close on both sides of the swap.
ACROSS_S = 5.0
# Concurrent closed-loop clients across the hot swap (issue 22: a swap under 8-client load).
SWAP_CLIENTS = 8
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The screenshot goes to the test's tmp dir: a test run leaves the checkout unchanged. To refresh
# README's picture on purpose: SSCQ_WEB_SCREENSHOT=benchmarks/results/serve_web_page.png.
SCREENSHOT_ENV = "SSCQ_WEB_SCREENSHOT"


def get(url, timeout=30):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()


def rows_of(uri):
    """(ids, image bytes, labels) of every row of a shard folder, in shard order."""
    ids, imgs, labels = [], [], []
    for f in sorted(f for f in os.listdir(uri) if f.startswith("part-") and f.endswith(".parquet")):
        t = pq.read_table(os.path.join(uri, f))
        ids += t.column("id").to_pylist()
        imgs += t.column("image").to_pylist()
        labels += t.column("label").to_pylist()
    return ids, imgs, labels


class InProcess:
    """The in-process reference for one snapshot: Searcher + the model, one query at a time
    and one torch thread, exactly as the ingress encodes."""

    def __init__(self, root, cfg, snapshot=None):
        self.searcher = Searcher.open(root, cfg.storage, snapshot=snapshot)
        self.loaded = load_model(self.searcher.snapshot.model_uri, cfg.tracking)
        self.cfg = cfg

    def embed(self, image_bytes):
        d = self.loaded.cfg.data
        arr = decode_image(image_bytes, d.image_size, d.channels, self.cfg.data.max_image_pixels)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return embed_images(self.loaded.model, arr[None])
        finally:
            torch.set_num_threads(threads)

    def search(self, image_bytes, k=K):
        return self.searcher.search(self.embed(image_bytes), k)


@pytest.fixture(scope="module")
def service(trained, ray_local, tmp_path_factory):
    from ray import serve

    from sscq_dist.serving.app import start_local

    work = tmp_path_factory.mktemp("serving")
    # Every test client is one loopback address (one rate-limit bucket): the swap test's 8
    # closed-loop clients must not be throttled (429s are tested in test_serving_ops.py).
    sv = ServeConfig(partitions=2, partition_cpus=0.25, ingress_cpus=0.25, watch_interval_s=WATCH_S,
                     retain_previous_s=5.0, cache_dir=str(work / "cache"), health_check_period_s=1.0, graceful_shutdown_wait_loop_s=0.5,
                     rate_limit_per_s=10_000.0, rate_limit_burst=10_000)
    cfg = dataclasses.replace(trained["cfg"], serve=sv)
    root = str(work / "index")
    # The service's own copy of the source shards: tests rename and rewrite it.
    source = str(work / "src")
    shutil.copytree(cfg.data.train_uri, source)
    model_uri = f"models:/sscq/{trained['result'].version}"
    t0 = time.perf_counter()
    summary = reindex(source, root, model_uri, cfg, progress=False)
    assert summary.total_shards == 3 and summary.total_rows == 1500
    # Every snapshot load in the replicas passes this failpoint; released (open) until the GC
    # test holds it to keep the service on the snapshot it serves.
    load_gate = Pause(work / "failpoints", "serving.load_snapshot")
    load_gate.release()
    saved = os.environ.get(FAILPOINTS_ENV)
    os.environ[FAILPOINTS_ENV] = load_gate.spec  # forwarded to the replicas by build_application
    try:
        url = start_local(root, cfg, port=free_port(), host="127.0.0.1")
    finally:
        if saved is None:
            os.environ.pop(FAILPOINTS_ENV, None)
        else:
            os.environ[FAILPOINTS_ENV] = saved
    print(f"service up in {time.perf_counter() - t0:.0f}s (reindex + start) at {url}")
    yield {"url": url, "root": root, "cfg": cfg, "work": work, "ref": InProcess(root, cfg), "source": source,
           "load_gate": load_gate}
    load_gate.release()
    serve.shutdown()


def test_http_answers_equal_in_process_search_and_offline_precision(service, trained):
    from sscq_dist.model_eval import evaluate_model, load_eval_sets

    url, ref, cfg = service["url"], service["ref"], service["cfg"]
    status, _, body = get(url + "version")
    assert status == 200 and b'"partitions":2' in body
    q_ids, q_imgs, q_labels = rows_of(cfg.data.queries_uri)
    assert len(q_ids) == 297
    served_hits, mismatched = [], []
    t0 = time.perf_counter()
    for qid, img, lab in zip(q_ids, q_imgs, q_labels):
        st, ans = post_image(url, img, K)
        assert st == 200, ans
        assert ans["version"] == ref.searcher.version
        got = [r["id"] for r in ans["results"]]
        want = ref.search(img).ids[0].tolist()
        if got != want:
            mismatched.append(qid)
        served_hits.append(np.mean([bool(set(r["label"] or []) & set(lab)) for r in ans["results"]]))
    took = time.perf_counter() - t0
    assert not mismatched, f"{len(mismatched)}/297 queries answered differently over HTTP than in process"
    served_p10 = float(np.mean(served_hits))
    # Offline: exact float ADC ranking of the same model on the same split (sscq_dist.model_eval).
    loaded = load_model(f"models:/sscq/{trained['result'].version}", cfg.tracking)
    data = dataclasses.replace(cfg.data, image_size=loaded.cfg.data.image_size, channels=loaded.cfg.data.channels)
    res = evaluate_model(loaded.model, load_eval_sets(dataclasses.replace(cfg, data=data)), topk=K)
    offline_p10 = float(res["precision@k"][list(res["ks"]).index(K)])
    print(f"297 HTTP queries in {took:.1f}s; P@10 served {served_p10:.4f} vs offline {offline_p10:.4f}")
    assert abs(served_p10 - offline_p10) <= 0.02, (served_p10, offline_p10)
    # The JSON form with the same embedding answers the same ids, distances included.
    emb = ref.embed(q_imgs[0])
    st, ans = post_json(url, {"embedding": emb[0].tolist(), "k": K})
    want = ref.searcher.search(emb, K)
    assert st == 200 and [r["id"] for r in ans["results"]] == want.ids[0].tolist()
    np.testing.assert_allclose([r["distance"] for r in ans["results"]], want.distances[0], rtol=1e-6)
    assert [r["uri"] for r in ans["results"]] == want.uris[0]


def test_every_bad_input_gets_its_4xx_and_the_service_keeps_serving(service):
    url, cfg = service["url"], service["cfg"]
    _, imgs, _ = rows_of(cfg.data.queries_uri)
    good = imgs[0]
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")  # 81M pixels > data.max_image_pixels, tiny file
    big = b"\x89PNG" + b"\0" * (cfg.serve.max_upload_bytes + 10)
    cases = [
        ("not an image", lambda: post_image(url, b"hello, this is text", K), 400, "not an image"),
        ("truncated image", lambda: post_image(url, good[:40], K), 400, "not"),
        ("decompression bomb", lambda: post_image(url, bomb.getvalue(), K), 413, "pixels"),
        ("upload too large", lambda: post_image(url, big, K), 413, "limit"),
        ("k = 0", lambda: post_image(url, good, 0), 422, "out of range"),
        ("k too large", lambda: post_image(url, good, cfg.serve.max_k + 1), 422, "out of range"),
        ("k not a number", lambda: post_json(url, {"embedding": [0.0] * 128, "k": "ten"}), 422, "integer"),
        ("wrong embedding length", lambda: post_json(url, {"embedding": [0.0] * 5}), 422, "expects 128"),
        ("non-finite embedding", lambda: post_json(url, {"embedding": [float("nan")] * 128}), 422, "NaN"),
        ("not JSON", lambda: post_json_raw(url, b"{nope"), 400, "not valid JSON"),
    ]
    for name, call, status, words in cases:
        st, body = call()
        assert st == status, (name, st, body)
        assert words in body["error"] and "\n" not in body["error"], (name, body)
        st, body = post_image(url, good, K)  # the next good query still works
        assert st == 200 and len(body["results"]) == K, (name, body)
    st, _, body = get(url + "thumb/123456789")
    assert st == 404 and b"not in snapshot" in body
    st, _, body = get(url + "thumb/abc")
    assert st == 422


def post_json_raw(url, data):
    from sscq_dist.serving.service import _send

    req = urllib.request.Request(url + "search", data=data, method="POST", headers={"Content-Type": "application/json"})
    return _send(req, 30)


def test_thumbnails_labels_health_and_samples(service):
    url, cfg = service["url"], service["cfg"]
    db_ids, db_imgs, db_labels = rows_of(cfg.data.train_uri)
    st, ans = post_image(url, db_imgs[7], K)
    assert st == 200
    label_of = dict(zip(db_ids, db_labels))
    image_of = dict(zip(db_ids, db_imgs))
    for r in ans["results"]:
        assert r["label"] == label_of[r["id"]] is not None  # from the part, written by the build
        st, ctype, png = get(url + f"thumb/{r['id']}")
        assert st == 200 and ctype == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(io.BytesIO(image_of[r["id"]]))))
    # /search never touches the source: with the source folder gone, labels and uris still come back.
    source, moved = service["source"], service["source"] + "-moved"
    os.rename(source, moved)
    try:
        st, gone = post_image(url, db_imgs[7], K)
        assert st == 200 and gone["results"] == ans["results"], gone
        st, _, body = get(url + f"thumb/{ans['results'][0]['id']}")
        assert st == 404 and b"source shard not found" in body
    finally:
        os.rename(moved, source)
    # A rewritten source shard (same name, new etag) answers 410, never another image.
    first = ans["results"][0]["id"]
    shard = next(os.path.join(source, f) for f in sorted(os.listdir(source)) if f.startswith("part-")
                 and first in pq.read_table(os.path.join(source, f), columns=["id"]).column("id").to_pylist())
    st0 = os.stat(shard)
    data = open(shard, "rb").read()
    time.sleep(0.01)
    with open(shard, "wb") as f:
        f.write(data)
    try:
        st, _, body = get(url + f"thumb/{first}")
        assert st == 410 and b"rewritten after it was indexed" in body, body
    finally:
        os.utime(shard, ns=(st0.st_atime_ns, st0.st_mtime_ns))  # the indexed etag again (mtime + size)
    st, _, _ = get(url + f"thumb/{first}")
    assert st == 200
    st, _, body = get(url + "healthz")
    assert st == 200 and b'"status":"ok"' in body
    st, _, body = get(url + "samples?n=4")
    import json

    ids = json.loads(body)["ids"]
    assert st == 200 and len(ids) == 4 and set(ids) <= set(db_ids)
    st, ctype, page = get(url)
    assert st == 200 and "text/html" in ctype and b'id="file"' in page


def test_web_page_in_headless_chromium(service, tmp_path):
    # CI installs the browser (.ci/run); a missing one is a failure, never a skip.
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "chromium / chromium-driver missing: apt-get install -y chromium chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, cfg, ref = service["url"], service["cfg"], service["ref"]
    db_ids, db_imgs, _ = rows_of(cfg.data.train_uri)
    # A database image whose own id is its first result in process (no identical code with a smaller id).
    qid, qimg = next((i, b) for i, b in zip(db_ids, db_imgs) if ref.search(b, 1).ids[0, 0] == i)
    path = tmp_path / "query.png"
    path.write_bytes(qimg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "snapshot" in d.find_element(By.ID, "version").text)
        driver.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == K
                   and "results from" in d.find_element(By.ID, "status").text)
        figs = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert int(figs[0].get_attribute("data-id")) == qid
        # Every thumbnail actually loaded (an <img> that failed has naturalWidth 0).
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert f"id {qid}" in figs[0].text and "label" in figs[0].text
        assert driver.execute_script("return document.getElementById('query').naturalWidth") > 0
        shot = os.path.abspath(os.environ.get(SCREENSHOT_ENV) or str(tmp_path / "serve_web_page.png"))
        os.makedirs(os.path.dirname(shot), exist_ok=True)
        assert driver.save_screenshot(shot)
    finally:
        driver.quit()


def test_killed_partition_replica_is_replaced_and_no_answer_is_partial(service):
    from ray import serve

    url, cfg, ref = service["url"], service["cfg"], service["ref"]
    _, imgs, _ = rows_of(cfg.data.queries_uri)
    want = {j: ref.search(imgs[j]).ids[0].tolist() for j in range(5)}
    handle = serve.get_deployment_handle("Partition1", app_name="sscq-search")
    old_pid = handle.pid.remote().result(timeout_s=30)
    os.kill(old_pid, signal.SIGKILL)
    outcomes, deadline = [], time.monotonic() + 120
    new_pid, ok_since_new = None, 0
    while time.monotonic() < deadline and ok_since_new < 5:
        j = len(outcomes) % 5
        st, body = post_image(url, imgs[j], K, timeout=60)
        outcomes.append(st)
        if st == 200:  # a success carries every partition's rows: exactly the full answer
            assert [r["id"] for r in body["results"]] == want[j]
        else:
            assert st == 503 and "partition" in body["error"] and "\n" not in body["error"], (st, body)
        if new_pid is None:
            try:
                pid = handle.pid.remote().result(timeout_s=2)
                new_pid = pid if pid != old_pid else None
            except Exception:
                pass  # no live replica to answer yet
        elif st == 200:
            ok_since_new += 1
        time.sleep(0.05)
    print(f"after SIGKILL: {outcomes.count(503)} x 503, {outcomes.count(200)} x 200 until replaced and serving")
    assert new_pid is not None, "Serve did not replace the killed replica within 120s"
    assert ok_since_new == 5, outcomes[-20:]


def test_hot_swap_to_a_new_champion_under_load(service):
    url, cfg, root, ref = service["url"], service["cfg"], service["root"], service["ref"]
    _, imgs, _ = rows_of(cfg.data.queries_uri)
    query = imgs[3]
    old_name = read_current(resolve(root))
    old_answer = ref.search(query)
    log, stop = [], threading.Event()

    def client():  # bounded: stops when told or after 300 requests' worth of time
        t_end = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < t_end:
            try:
                st, body = post_image(url, query, K, timeout=60)
            except Exception as exc:  # a refused connection is a failed request too
                st, body = -1, {"error": str(exc)}
            log.append((time.monotonic(), st, body))

    threads = [threading.Thread(target=client) for _ in range(SWAP_CLIENTS)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(1 for _, st, _ in log if st == 200) >= 5, 120, "the load to be answered")
    new_model = random_model_dir(str(service["work"] / "champion2"), 7)
    summary = reindex(cfg.data.train_uri, root, new_model, cfg, progress=False)
    t_flip = time.monotonic()
    assert summary.flipped and read_current(resolve(root)) == summary.snapshot != old_name
    # Keep querying until the new version has answered for a while (or the allowance runs out).
    while time.monotonic() < t_flip + WATCH_S + SWAP_SLACK_S + 10:
        if sum(1 for t, st, b in log if t > t_flip and b.get("version") == summary.snapshot) >= 20:
            break
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    new_ref = InProcess(root, cfg, snapshot=summary.snapshot)
    new_answer = new_ref.search(query)
    expected = {old_name: old_answer, summary.snapshot: new_answer}
    failed = [(st, b) for _, st, b in log if st != 200]
    assert not failed, f"{len(failed)} of {len(log)} requests failed during the swap: {failed[:3]}"
    for _, _, b in log:  # one version per answer, and the answer is exactly that snapshot's
        assert b["version"] in expected, b["version"]
        want = expected[b["version"]]
        assert [r["id"] for r in b["results"]] == want.ids[0].tolist()
        np.testing.assert_allclose([r["distance"] for r in b["results"]], want.distances[0], rtol=1e-6)
    old_after = [t - t_flip for t, _, b in log if b["version"] == old_name and t > t_flip]
    new_after = [t - t_flip for t, _, b in log if b["version"] == summary.snapshot]
    print(f"swap: {len(log)} requests, last old answer {max(old_after, default=0):.1f}s and first new answer "
          f"{min(new_after, default=float('nan')):.1f}s after CURRENT flipped")
    assert new_after, "the new snapshot never answered"
    # The load spans the swap: answers from the old snapshot right before the first new answer
    # and from the new one right after it (no pause in serving hides a failed swap).
    t_swap = t_flip + min(new_after)
    assert any(b["version"] == old_name and t_swap - ACROSS_S <= t < t_swap for t, _, b in log), \
        "no load before the swap"
    assert sum(1 for t, _, b in log if b["version"] == summary.snapshot and t <= t_swap + ACROSS_S) >= 2, \
        "no load after the swap"
    assert max(old_after, default=0.0) <= WATCH_S + SWAP_SLACK_S
    assert min(new_after) <= WATCH_S + SWAP_SLACK_S


def test_the_snapshot_the_service_serves_survives_gc_until_it_moves_on(service):
    """Reader leases at the service level: the replicas cannot swap (held at the snapshot-load
    failpoint) while two new model versions publish with GC at keep 1 and grace 0. GC keeps the
    snapshot the replicas lease and still serve, deletes the unleased one in between, and the
    service keeps answering from its snapshot. Once released it moves to CURRENT, its lease
    drops the old name, and the next GC deletes that snapshot's files."""
    url, cfg, root, gate = service["url"], service["cfg"], service["root"], service["load_gate"]
    loc = resolve(root)
    _, imgs, _ = rows_of(cfg.data.queries_uri)
    query = imgs[5]
    held = read_current(loc)
    st, before = post_image(url, query, K)
    assert st == 200 and before["version"] == held, before
    held_files = snapshot_files(loc, held)
    gc_cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, gc_grace_s=0.0, gc_keep_generations=1))
    gate.hold()
    try:
        between = reindex(service["source"], root, random_model_dir(str(service["work"] / "gc-a"), 11), gc_cfg,
                          progress=False)
        gate.reached(120)  # the replicas are trying to load the new snapshot and cannot
        between_files = snapshot_files(loc, between.snapshot)
        newest = reindex(service["source"], root, random_model_dir(str(service["work"] / "gc-b"), 12), gc_cfg,
                         progress=False)
        assert newest.gc is not None and held in newest.gc.leased, newest.gc
        # (A replica killed earlier in this module still leases its snapshot until its TTL.)
        assert {held, newest.snapshot} <= set(newest.gc.retained), newest.gc.retained
        assert between.snapshot not in newest.gc.retained, newest.gc.retained
        kept = [f for f in held_files if storage_exists(loc, f)]
        assert kept == held_files, f"GC deleted {len(held_files) - len(kept)} files of the leased snapshot {held}"
        assert not any(storage_exists(loc, f) for f in between_files), "the unleased snapshot was kept"
        for _ in range(5):  # the service still answers, from the snapshot it holds
            st, body = post_image(url, query, K)
            assert st == 200 and body["version"] == held and body["results"] == before["results"], (st, body)
    finally:
        gate.release()
    wait_for(lambda: post_image(url, query, K)[1].get("version") == newest.snapshot, 120,
             "the service to serve the newest snapshot")
    wait_for(lambda: held not in leased_snapshots(read_leases(loc), time.time()), 120,
             f"the replicas' leases to drop {held}")
    summary = collect_garbage(loc, GcPolicy(keep_generations=1, grace_s=0.0))
    assert newest.snapshot in summary.retained and held not in summary.retained, summary.retained
    assert not any(storage_exists(loc, f) for f in held_files)
    st, after = post_image(url, query, K)
    want = InProcess(root, cfg, snapshot=newest.snapshot).search(query)
    assert st == 200 and [r["id"] for r in after["results"]] == want.ids[0].tolist()


def snapshot_files(loc, name: str) -> list[str]:
    """Paths (relative to the index root) of a snapshot's list and of every part file it names."""
    from sscq_dist.indexing.formats import MODELS_DIR, SNAPSHOTS_DIR, part_files

    version, gen = name.split("/")
    vdir = f"{MODELS_DIR}/{version}"
    files = [f"{vdir}/{SNAPSHOTS_DIR}/{gen}.json"]
    for p in read_snapshot(loc, name).parts:
        files += [f"{vdir}/{f}" for f in part_files(p.part)]
    return files


def storage_exists(loc, rel: str) -> bool:
    from sscq_dist import storage

    return storage.exists(loc.join(*rel.split("/")))
