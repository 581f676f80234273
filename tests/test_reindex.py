"""Batch encoding into sharded FAISS fast-scan indices, incremental exactly-once reindex, search."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from sscq_dist.encoding import encode_set
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.job import run_reindex
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.manifest import read_current, read_manifest, write_manifest
from sscq_dist.indexing.reindex import reindex
from sscq_dist.ingest import ingest
from sscq_dist.registry import load_model
from sscq_dist.search import Searcher
from sscq_dist.storage import resolve


@pytest.fixture(scope="module")
def model(trained):
    r = trained["result"]
    return load_model(f"models:/sscq/{r.version}", trained["cfg"].tracking)


@pytest.fixture
def images(tmp_path):
    """All 1,797 digits in 100-row shards (18 source shards)."""
    ingest("digits", str(tmp_path / "imgs"), rows_per_shard=100, splits=["all"], progress=False)
    return str(tmp_path / "imgs" / "all")


def _all_index_ids(root, cfg):
    s = Searcher.open(root, cfg.storage)
    ids = np.concatenate([fi.index_codes(sh)[0] for sh in s.shards])
    return s, ids


def test_codes_equal_model_argmin_and_search_finds_itself(trained, model, images, tmp_path, ray_local):
    cfg = trained["cfg"]
    root = str(tmp_path / "index")
    summary, metrics = run_reindex(images, root, f"models:/sscq/{model.version}", cfg, log_mlflow=False)
    assert summary.total_rows == 1797 and summary.total_shards == 18 and summary.flipped
    searcher = Searcher.open(root, cfg.storage)
    stored = {}
    for sh in searcher.shards:
        ids, codes = fi.index_codes(sh)
        stored.update(zip(ids.tolist(), map(bytes, codes)))
    enc = encode_set(model.model, images, cfg)
    assert len(stored) == 1797 and sorted(stored) == sorted(enc.ids.tolist())  # every id exactly once
    mismatched = [i for i, c in zip(enc.ids.tolist(), enc.codes) if stored[i] != bytes(c)]
    assert not mismatched, f"{len(mismatched)} codes differ from the model's argmin codes"
    # A database image as query: its own code is the ADC minimum, so exhaustive ADC over the
    # same codes ranks it first (or ties it with an identical code); the served fast-scan
    # index rounds its lookup tables to 8 bits, so it must find it in the top 5.
    res = searcher.search(enc.f[:200], 5)
    ids_all = np.array(sorted(stored))
    ref = fi.exhaustive_adc(model.codebooks, np.frombuffer(b"".join(stored[i] for i in ids_all), np.uint8)
                            .reshape(len(ids_all), -1), ids_all)
    _, ref_ids = ref.search(enc.f[:200], 1)
    for q in range(200):
        own = int(enc.ids[q])
        assert int(ref_ids[q, 0]) == own or stored[int(ref_ids[q, 0])] == stored[own]
    own_top5 = np.mean([int(enc.ids[q]) in res.ids[q] for q in range(200)])
    own_top1 = np.mean([stored[int(res.ids[q, 0])] == stored[int(enc.ids[q])] for q in range(200)])
    assert own_top5 >= 0.9 and own_top1 >= 0.75, (own_top5, own_top1)
    assert res.uris[0][0].startswith("sklearn:digits/")
    # index_metrics.json beside the shards, with recall against exhaustive ADC.
    m = json.loads(open(os.path.join(root, "models", model.version, "index_metrics.json")).read())
    assert m["recall@10"] >= 0.95 and m["rows"] == 1797 and m["bytes_per_image"] > 0
    assert metrics["qps_served"] > 0 and metrics["qps_exhaustive_adc"] > 0
    # Nothing changed: nothing to do.
    again = reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)
    assert again.nothing_to_do and again.encoded_rows == 0


def test_ivf_fastscan_codes_and_recall(trained, model, images, tmp_path, ray_local):
    from conftest import make_cfg

    cfg = make_cfg(trained["workdir"], os.path.dirname(trained["cfg"].data.train_uri),
                   "index.index_type=ivf_pq_fastscan", "index.nlist=16", "index.nprobe=8",
                   "index.ivf_train_sample=1000")
    root = str(tmp_path / "ivf")
    summary, metrics = run_reindex(images, root, f"models:/sscq/{model.version}", cfg, log_mlflow=False)
    s = Searcher.open(root, cfg.storage)
    assert s.manifest.index_type == "ivf_pq_fastscan" and s.manifest.index_params["nlist"] == 16
    ids = np.concatenate([fi.index_codes(sh)[0] for sh in s.shards])
    assert sorted(ids.tolist()) == sorted(set(ids.tolist())) and len(ids) == 1797
    enc = encode_set(model.model, images, cfg)
    stored = {}
    for sh in s.shards:
        i, c = fi.index_codes(sh)
        stored.update(zip(i.tolist(), map(bytes, c)))
    assert all(stored[i] == bytes(c) for i, c in zip(enc.ids.tolist(), enc.codes))
    assert metrics["recall@10"] >= 0.95


def test_s3_root_and_incremental_append(trained, model, s3_bucket, ray_local):
    cfg = trained["cfg"]
    src = f"s3://{s3_bucket}/images"
    ingest("digits", src, rows_per_shard=250, splits=["train"], progress=False)  # 6 shards
    root = f"s3://{s3_bucket}/index"
    first = reindex(src + "/train", root, f"models:/sscq/{model.version}", cfg, loaded=model)
    assert first.encoded_shards == 6 and first.total_rows == 1500
    loc = resolve(root)
    m1 = read_manifest(loc, model.version)
    assert m1.complete and read_current(loc) == model.version
    # Two new source shards (the held-out digits, re-numbered as part-00006/7).
    import pyarrow.parquet as pq
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    ingest("digits", f"s3://{s3_bucket}/extra", rows_per_shard=150, splits=["test"], progress=False)
    for i, name in enumerate(sorted(n for n in s3.ls(f"{s3_bucket}/extra/test") if "/part-" in n)):  # not the record
        s3.copy(name, f"{s3_bucket}/images/train/part-{6 + i:05d}.parquet")
    second = reindex(src + "/train", root, f"models:/sscq/{model.version}", cfg, loaded=model)
    assert second.encoded_shards == 2 and second.encoded_rows == 297 and second.total_rows == 1797
    m2 = read_manifest(loc, model.version)
    old = {s.path: (s.index_shard, s.etag_or_checksum) for s in m1.sources}
    assert all(old[s.path] == (s.index_shard, s.etag_or_checksum) for s in m2.sources if s.path in old)
    _, ids = _all_index_ids(root, cfg)
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797


def test_killed_reindex_resumes_exactly_once(trained, model, images, tmp_path, ray_local):
    cfg = trained["cfg"]
    root = str(tmp_path / "killed")
    env = dict(os.environ, MLFLOW_TRACKING_URI=cfg.tracking.tracking_uri, PYTHONPATH=REPO,
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, os.path.join(REPO, "jobs", "reindex.py"), "--images", images, "--index-root", root,
           "--model", f"models:/sscq/{model.version}", "--config", os.path.join(REPO, "configs", "digits.yaml"),
           f"tracking.tracking_uri={cfg.tracking.tracking_uri}", f"tracking.output_dir={tmp_path}/out",
           f"data.queries_uri={cfg.data.queries_uri}", "index.encode_batch_size=32"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifest = os.path.join(root, "models", model.version, "manifest.json")
    deadline = time.time() + 180
    while time.time() < deadline:
        if os.path.exists(manifest) and json.load(open(manifest))["sources"]:
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    loc = resolve(root)
    partial = read_manifest(loc, model.version)
    assert not partial.complete and 1 <= len(partial.sources) < 18
    assert read_current(loc) is None  # CURRENT never named the partial build
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"encoded {18 - len(partial.sources)} shards" in out.stdout
    _, ids = _all_index_ids(root, cfg)
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797
    # No orphan files from the killed run stay in the version folder.
    files = os.listdir(os.path.join(root, "models", model.version))
    assert len([f for f in files if f.startswith("shard-")]) == 18


def test_new_champion_builds_beside_then_flips(trained, model, images, tmp_path, ray_local):
    import torch

    from sscq_dist.registry import log_and_register

    cfg = trained["cfg"]
    root = str(tmp_path / "flip")
    reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    state["quantizer.codebooks"] += 0.01 * torch.randn_like(state["quantizer.codebooks"])
    v2 = log_and_register(state, cfg, trained["result"].run_id, "sscq", cfg.data.train_uri, alias="flip-test")
    loaded2 = load_model(f"models:/sscq/{v2}", cfg.tracking)
    s = reindex(images, root, f"models:/sscq/{v2}", cfg, loaded=loaded2)
    loc = resolve(root)
    assert s.flipped and read_current(loc) == v2
    assert read_manifest(loc, model.version).complete and read_manifest(loc, v2).complete
    assert os.path.isdir(os.path.join(root, "models", model.version))  # the old build stays beside


def test_checksum_mismatch_and_lock_refusal(trained, model, images, tmp_path, ray_local):
    cfg = trained["cfg"]
    root = str(tmp_path / "guard")
    reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)
    loc = resolve(root)
    with IndexLock(loc, "someone-else", 60):
        with pytest.raises(IndexError_, match="locked by someone-else"):
            reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)
    m = read_manifest(loc, model.version)
    m.codebook_checksum = "sha256:" + "0" * 64
    write_manifest(loc, m)
    with pytest.raises(IndexError_, match="checksum"):
        reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)


def test_encoder_actor_count_explicit_and_auto(ray_local):
    from sscq_dist.config import load_config
    from sscq_dist.indexing.encode_job import encoder_actors

    assert encoder_actors(load_config(None, ["index.encode_concurrency=3"])) == 3
    # auto on CPU: the session Ray's 4 CPUs less one for reads, capped by the cores under it
    assert encoder_actors(load_config(None)) == max(1, min(3, os.cpu_count() or 1))
    assert encoder_actors(load_config(None, ["index.use_gpu=true"])) == 1  # no GPU here: at least one actor
