"""Scale-out reindex: lean parts built on workers, snapshots, plan by one listing, ids, GC, old formats.

Kill tests (driver at three points, an encoder actor mid-part) and the lock takeover are in
tests/test_reliability.py.
"""

import collections
import json
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from fault_helpers import assert_one_error_line, job_env, random_model_dir, record_s3_requests, run_job
from sscq_dist import storage
from sscq_dist.data.schema import IMAGE_SCHEMA
from sscq_dist.model.encoding import encode_set
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.build import BuildJob, build_parts
from sscq_dist.indexing.formats import list_generations, read_current, read_snapshot, snapshot_loc, version_loc
from sscq_dist.reindex_job import run_reindex
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.plan import list_source_shards
from sscq_dist.indexing.reindex import encode_config, model_version, reindex
from sscq_dist.indexing.trained import ensure_trained_index
from sscq_dist.ingest import ingest, png_bytes
from sscq_dist.registry import load_model
from sscq_dist.serving.searcher import Searcher
from sscq_dist.storage import resolve

DIGITS_YAML = os.path.join(REPO, "configs", "digits.yaml")


@pytest.fixture(scope="module")
def model(trained):
    r = trained["result"]
    return load_model(f"models:/sscq/{r.version}", trained["cfg"].tracking)


@pytest.fixture
def images(tmp_path):
    """All 1,797 digits in 100-row shards (18 source shards)."""
    ingest("digits", str(tmp_path / "imgs"), rows_per_shard=100, splits=["all"], progress=False)
    return str(tmp_path / "imgs" / "all")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """An untrained model folder: indexing only needs codes from one model."""
    return random_model_dir(str(tmp_path_factory.mktemp("model") / "m"), 0)


def small_cfg(tmp_path, *extra):
    from conftest import make_cfg

    return make_cfg(tmp_path, str(tmp_path), "index.encode_batch_size=64", *extra)


def write_image_shards(folder, n_shards: int, rows: int, seed: int = 0, ids=None) -> np.ndarray:
    """n_shards Parquet shards of tiny random 8x8 PNGs; random int64 ids unless given. Returns the ids."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    total = n_shards * rows
    ids = rng.choice(2 ** 62, size=total, replace=False).astype(np.int64) if ids is None else np.asarray(ids)
    pngs = [png_bytes(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(min(total, 64))]
    for s in range(n_shards):
        sl = ids[s * rows:(s + 1) * rows]
        t = pa.table({"id": pa.array(sl, pa.int64()), "image": [pngs[i % len(pngs)] for i in range(len(sl))],
                      "uri": [f"mem://{i}" for i in sl], "label": pa.nulls(len(sl), pa.list_(pa.int32()))},
                     schema=IMAGE_SCHEMA)
        pq.write_table(t, os.path.join(folder, f"part-{s:05d}.parquet"))
    return ids


def served_ids(root, cfg, snapshot=None):
    s = Searcher.open(root, cfg.storage, snapshot=snapshot)
    return s, np.concatenate([fi.index_codes(p)[0] for p in s.parts])


# --------------------------------------------------------------------------- build and serve


def test_codes_equal_model_argmin_and_search_finds_itself(trained, model, images, tmp_path, ray_local):
    cfg = trained["cfg"]
    root = str(tmp_path / "index")
    summary, metrics = run_reindex(images, root, f"models:/sscq/{model.version}", cfg, log_mlflow=False)
    assert summary.total_rows == 1797 and summary.total_shards == 18 and summary.flipped
    assert read_current(resolve(root)) == f"{model.version}/00000001" == summary.snapshot
    searcher = Searcher.open(root, cfg.storage)
    stored = {}
    for part in searcher.parts:
        ids, codes = fi.index_codes(part)
        stored.update(zip(ids.tolist(), map(bytes, codes)))
    enc = encode_set(model.model, images, cfg)
    assert len(stored) == 1797 and sorted(stored) == sorted(enc.ids.tolist())  # every id exactly once
    mismatched = [i for i, c in zip(enc.ids.tolist(), enc.codes) if stored[i] != bytes(c)]
    assert not mismatched, f"{len(mismatched)} codes differ from the model's argmin codes"
    # A database image as query: exhaustive ADC over the same codes ranks its own code first;
    # the fast-scan index rounds its tables to 8 bits, so it must find it in the top 5.
    res = searcher.search(enc.f[:200], 5)
    ids_all = np.array(sorted(stored))
    ref = fi.exhaustive_adc(model.codebooks, np.frombuffer(b"".join(stored[i] for i in ids_all), np.uint8)
                            .reshape(len(ids_all), -1), ids_all)
    _, ref_ids = ref.search(enc.f[:200], 1)
    for q in range(200):
        own = int(enc.ids[q])
        assert int(ref_ids[q, 0]) == own or stored[int(ref_ids[q, 0])] == stored[own]
    # Ties: where more than 5 images share the query's own code, the index may rank any 5 of
    # them first; then all 5 results must carry that code.
    sharing = collections.Counter(stored.values())
    own_top5 = np.mean([int(enc.ids[q]) in res.ids[q] or (sharing[stored[int(enc.ids[q])]] > 5 and all(
        stored[int(i)] == stored[int(enc.ids[q])] for i in res.ids[q])) for q in range(200)])
    own_top1 = np.mean([stored[int(res.ids[q, 0])] == stored[int(enc.ids[q])] for q in range(200)])
    assert own_top5 >= 0.9 and own_top1 >= 0.75, (own_top5, own_top1)
    assert res.uris[0][0].startswith("sklearn:digits/")
    # A part file carries per id its label, uri and exact place in the source (row group, row):
    # results show them without reading the source, thumbnails read back that one row.
    part = searcher.snapshot.parts[3]
    t = pq.read_table(os.path.join(root, "models", model.version, part.index_file))
    assert t.column_names == ["id", "code", "label", "uri", "row_group", "row"]
    src = pq.ParquetFile(part.source.uri)
    at = [src.read_row_group(g, columns=["id", "label", "uri"]).slice(r, 1).to_pylist()[0]
          for g, r in zip(t.column("row_group").to_pylist(), t.column("row").to_pylist())]
    assert [a["id"] for a in at] == t.column("id").to_pylist()
    assert [a["label"] for a in at] == t.column("label").to_pylist() and at[0]["label"] is not None
    assert [a["uri"] for a in at] == t.column("uri").to_pylist()
    src_all = pa.concat_tables([pq.read_table(os.path.join(images, f), columns=["id", "label"])
                                for f in sorted(os.listdir(images)) if f.startswith("part-")])
    label_of = dict(zip(src_all.column("id").to_pylist(), src_all.column("label").to_pylist()))
    assert [[label_of[i] for i in row] for row in res.ids.tolist()] == res.labels  # labels of results, from parts
    assert os.path.exists(os.path.join(root, "models", model.version, "trained.index"))
    m = json.loads(open(os.path.join(root, "models", model.version, "index_metrics.json")).read())
    assert m["recall@10"] >= 0.95 and m["rows"] == 1797 and m["snapshot"] == summary.snapshot
    # Nothing changed: nothing to do, and no new generation.
    again = reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)
    assert again.nothing_to_do and again.encoded_rows == 0
    assert list_generations(resolve(root), model.version) == [1]


def test_encoder_actors_take_the_drivers_model_not_the_tracking_store(trained, model, images, tmp_path, ray_local):
    """The driver loads the registry model once and its encoder actors get the weights through
    the object store: with the tracking store unreachable after that load (an MLflow server
    that went down; here a store path that does not exist), every shard is still encoded."""
    import dataclasses

    cfg = trained["cfg"]
    gone = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, tracking_uri=f"sqlite:///{tmp_path}/no-such-dir/mlflow.db"))
    summary = reindex(images, str(tmp_path / "index"), f"models:/sscq/{model.version}", gone, progress=False,
                      loaded=model)
    assert summary.encoded_shards == 18 and summary.total_rows == 1797 and not summary.skipped, summary.skipped


def test_ivf_fastscan_codes_and_recall(trained, model, images, tmp_path, ray_local):
    from conftest import make_cfg

    cfg = make_cfg(trained["workdir"], os.path.dirname(trained["cfg"].data.train_uri),
                   "index.index_type=ivf_pq_fastscan", "index.nlist=16", "index.nprobe=8",
                   "index.ivf_train_sample=1000")
    root = str(tmp_path / "ivf")
    summary, metrics = run_reindex(images, root, f"models:/sscq/{model.version}", cfg, log_mlflow=False)
    s, ids = served_ids(root, cfg)
    assert s.snapshot.index_type == "ivf_pq_fastscan" and s.snapshot.index_params["nlist"] == 16
    assert sorted(ids.tolist()) == sorted(set(ids.tolist())) and len(ids) == 1797
    enc = encode_set(model.model, images, cfg)
    stored = {}
    for part in s.parts:
        i, c = fi.index_codes(part)
        stored.update(zip(i.tolist(), map(bytes, c)))
    assert all(stored[i] == bytes(c) for i, c in zip(enc.ids.tolist(), enc.codes))
    assert metrics["recall@10"] >= 0.95
    # The served index uses the version's one coarse quantizer (trained.index); parts hold none.
    trained_q = fi.deserialize(open(os.path.join(root, "models", model.version, "trained.index"), "rb").read())
    q = fi.faiss.downcast_index(trained_q.quantizer)
    for part in s.parts:
        pq_ = fi.faiss.downcast_index(part.quantizer)
        np.testing.assert_array_equal(fi.faiss.rev_swig_ptr(pq_.get_xb(), pq_.ntotal * pq_.d),
                                      fi.faiss.rev_swig_ptr(q.get_xb(), q.ntotal * q.d))


def test_build_stage_returns_records_only_and_driver_memory_stays_flat(tmp_path, random_model, ray_local):
    """The driver receives part records (a few hundred bytes per shard) whatever the rows per
    shard; its Python heap does not grow with rows (embeddings would add 512 bytes a row)."""
    cfg = small_cfg(tmp_path)
    loaded = load_model(random_model, cfg.tracking)
    enc_cfg = encode_config(cfg, loaded)
    out = {}
    for rows in (50, 4000):
        folder = tmp_path / f"r{rows}"
        write_image_shards(str(folder), 3, rows, seed=rows)
        todo = list_source_shards(resolve(str(folder)))
        vloc = version_loc(resolve(str(tmp_path / f"idx{rows}")), model_version(loaded))
        trained_sha, _ = ensure_trained_index(vloc, todo, random_model, enc_cfg, loaded.codebooks)
        job = BuildJob(root_uri=str(tmp_path / f"idx{rows}"), model_uri=random_model,
                       version=model_version(loaded), codebook_checksum=fi.codebook_checksum(loaded.codebooks),
                       index_type="pq_fastscan", coarse_checksum=trained_sha, cfg_dict=enc_cfg.to_dict())
        tracemalloc.start()
        result = build_parts(todo, job, enc_cfg, progress=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert result.built == 3 and not result.errors
        assert sum(r.indexed for r in result.records.values()) == 3 * rows
        out[rows] = (result.received_bytes / 3, peak)
    small, large = out[50], out[4000]
    assert large[0] < 1.1 * small[0] and small[0] < 2000, out  # bytes per shard: flat, small
    # 80x the rows: the driver's peak heap grows by less than the embeddings would take (6 MB).
    assert large[1] - small[1] < 3 * 4000 * 512 / 2, out


def test_s3_plan_is_one_listing_and_append_publishes_a_new_generation(trained, model, s3_bucket, ray_local,
                                                                    monkeypatch):
    cfg = trained["cfg"]
    src = f"s3://{s3_bucket}/images"
    ingest("digits", src, rows_per_shard=250, splits=["train"], progress=False)  # 6 shards
    root = f"s3://{s3_bucket}/index"
    first = reindex(src + "/train", root, f"models:/sscq/{model.version}", cfg, loaded=model)
    assert first.encoded_shards == 6 and first.total_rows == 1500 and first.snapshot.endswith("/00000001")
    g1 = read_snapshot(resolve(root), first.snapshot)
    # "Nothing to do" costs one listing of the sources and no read of any source shard.
    original = storage.s3fs_filesystem
    calls = record_s3_requests(monkeypatch, lambda params: params.get("Key") or params.get("Prefix") or "")
    again = reindex(src + "/train", root, f"models:/sscq/{model.version}", cfg, loaded=model)
    monkeypatch.setattr(storage, "s3fs_filesystem", original)
    assert again.nothing_to_do
    on_sources = [c for c in calls if c[1].startswith("images/")]
    record = [c for c in on_sources if c[1].endswith("/_dataset.json")]  # the dataset check's one small object
    assert [c[0] for c in on_sources if c not in record] == ["ListObjectsV2"], calls
    assert {c[0] for c in record} <= {"HeadObject", "GetObject"} and len(record) <= 2, calls
    # Two new source shards (the held-out digits, re-numbered as part-00006/7): generation 2.
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    ingest("digits", f"s3://{s3_bucket}/extra", rows_per_shard=150, splits=["test"], progress=False)
    for i, name in enumerate(sorted(n for n in s3.ls(f"{s3_bucket}/extra/test") if "/part-" in n)):  # not the record
        s3.copy(name, f"{s3_bucket}/images/train/part-{6 + i:05d}.parquet")
    second = reindex(src + "/train", root, f"models:/sscq/{model.version}", cfg, loaded=model)
    assert second.encoded_shards == 2 and second.encoded_rows == 297 and second.total_rows == 1797
    assert second.snapshot == f"{model.version}/00000002" and read_current(resolve(root)) == second.snapshot
    g2 = read_snapshot(resolve(root), second.snapshot)
    assert g2.previous == g1.name
    assert [p for p in g2.parts if p.source.uri in {q.source.uri for q in g1.parts}] == g1.parts  # untouched
    _, ids = served_ids(root, cfg)
    assert len(ids) == 1797 and len(set(ids.tolist())) == 1797


def test_new_champion_builds_beside_then_flips(trained, model, images, tmp_path, ray_local):
    import torch

    from sscq_dist.registry import log_and_register

    cfg = trained["cfg"]
    root = str(tmp_path / "flip")
    a = reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    state["quantizer.codebooks"] += 0.01 * torch.randn_like(state["quantizer.codebooks"])
    v2 = log_and_register(state, cfg, trained["result"].run_id, "sscq", cfg.data.train_uri, alias="flip-test")
    loaded2 = load_model(f"models:/sscq/{v2}", cfg.tracking)
    b = reindex(images, root, f"models:/sscq/{v2}", cfg, loaded=loaded2)
    loc = resolve(root)
    assert b.flipped and read_current(loc) == f"{v2}/00000001"
    assert read_snapshot(loc, b.snapshot).previous == a.snapshot
    assert read_snapshot(loc, a.snapshot).model_version == model.version  # the old build stays beside
    # Back to the first model: its snapshot still covers every source, so this is a flip, not a build.
    back = reindex(images, root, f"models:/sscq/{model.version}", cfg, loaded=model)
    assert back.flipped and back.encoded_shards == 0 and read_current(loc) == a.snapshot


def test_auto_encoder_count_starts_one_actor_per_encode_bytes_per_actor(tmp_path, ray_local):
    """Auto mode caps the pool by the work (an actor's start-up is seconds a small job never
    wins back); an explicit index.encode_concurrency is taken as given."""
    from sscq_dist.indexing.encoder import encoder_actors

    cfg = small_cfg(tmp_path)
    per = cfg.index.encode_bytes_per_actor
    uncapped = encoder_actors(cfg)  # one per CPU less one for reads, at most one per core of a local Ray
    assert uncapped == max(1, min(int(ray_local.cluster_resources()["CPU"]) - 1, os.cpu_count()))
    assert encoder_actors(cfg, work_bytes=0) == 1
    assert encoder_actors(cfg, work_bytes=per) == 1
    assert encoder_actors(cfg, work_bytes=per + 1) == min(2, uncapped)
    assert encoder_actors(cfg, work_bytes=100 * per) == uncapped
    cfg.index.encode_bytes_per_actor = 0  # no cap
    assert encoder_actors(cfg, work_bytes=1) == uncapped
    cfg.index.encode_bytes_per_actor, cfg.index.encode_concurrency = per, 3
    assert encoder_actors(cfg, work_bytes=1) == 3


def test_checksum_mismatch_and_lock_refusal(tmp_path, random_model, images, ray_local):
    cfg = small_cfg(tmp_path)
    root = str(tmp_path / "guard")
    s = reindex(images, root, random_model, cfg, progress=False)
    loc = resolve(root)
    with IndexLock(loc, "someone-else", 60):
        with pytest.raises(IndexError_, match="locked by someone-else"):
            reindex(images, root, random_model, cfg, progress=False)
    # A later snapshot of this version that another model's codebooks wrote: refused, never mixed.
    snap = json.loads(storage.read_bytes(snapshot_loc(loc, s.model_version, 1)))
    snap.update(generation=2, codebook_checksum="sha256:" + "0" * 64)
    storage.atomic_write_bytes(snapshot_loc(loc, s.model_version, 2), json.dumps(snap).encode())
    with pytest.raises(IndexError_, match="refusing to mix codes of two models"):
        reindex(images, root, random_model, cfg, progress=False)


def test_index_metrics_measure_a_sample_of_parts_above_the_row_cap(tmp_path, random_model, images, ray_local):
    """The reindex driver's quality check loads at most index.metrics_max_rows vectors."""
    from sscq_dist.serving.index_quality import index_metrics

    cfg = small_cfg(tmp_path, "index.metrics_max_rows=450")
    reindex(images, str(tmp_path / "index"), random_model, cfg, progress=False)
    loaded = load_model(random_model)
    queries = np.random.default_rng(1).standard_normal((50, loaded.model.cfg.embedding_dim)).astype(np.float32)
    m = index_metrics(str(tmp_path / "index"), cfg, loaded.model, queries)
    assert m["rows"] == 1797 and m["parts"] == 18
    assert 300 <= m["measured_rows"] <= 450 and m["measured_parts"] < 18  # 100-row parts: 3 or 4 of them
    assert m["recall@10"] >= 0.95
    full = index_metrics(str(tmp_path / "index"), small_cfg(tmp_path), loaded.model, queries)
    assert full["measured_rows"] == 1797 and full["measured_parts"] == 18


# --------------------------------------------------------------------------- ids


def test_duplicate_id_across_two_shards_is_one_error_line_naming_both(tmp_path, random_model, ray_local):
    """Random (hash-like) ids: every part's range overlaps, so the distributed pass runs; one id
    shared by two shards is named with both shards, and nothing is published."""
    folder = tmp_path / "dup"
    ids = write_image_shards(str(folder), 4, 40, seed=3)
    t = pq.read_table(folder / "part-00002.parquet").to_pylist()
    t[17]["id"] = int(ids[5])  # shard 0's sixth id, again in shard 2
    pq.write_table(pa.Table.from_pylist(t, schema=IMAGE_SCHEMA), folder / "part-00002.parquet")
    out = run_job("reindex.py", "--images", str(folder), "--index-root", str(tmp_path / "index"),
                  "--model", random_model, "--config", DIGITS_YAML,
                  f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.output_dir={tmp_path}/out",
                  "index.encode_batch_size=16", env=job_env(ray_local), cwd=str(tmp_path))
    line = assert_one_error_line(out, f"id {int(ids[5])} is in both", "part-00000.parquet", "part-00002.parquet")
    assert "unique over the collection" in line
    assert read_current(resolve(str(tmp_path / "index"))) is None


def test_id_check_counts_planted_duplicates_and_returns_at_most_20_examples(tmp_path, ray_local):
    """The hash join runs on Ray tasks over the parts' id columns: 30 ids planted in a second part
    are all counted, and the driver gets 20 examples, each naming a real shared id."""
    from sscq_dist.config import StorageConfig
    import pyarrow as pa

    from sscq_dist.indexing.formats import PART_META_SCHEMA, PartEntry, PartRows, SourceShard, part_bytes
    from sscq_dist.indexing.id_check import MAX_EXAMPLES, find_duplicates

    rng = np.random.default_rng(7)
    vloc = resolve(str(tmp_path / "v"))
    all_ids = rng.choice(2 ** 62, size=3000, replace=False).astype(np.int64)
    chunks = [all_ids[:1000], all_ids[1000:2000], np.concatenate([all_ids[2000:2970], all_ids[100:130]])]
    parts = []
    for n, ids in enumerate(chunks):
        meta = pa.table({"label": pa.nulls(len(ids), PART_META_SCHEMA.field("label").type),
                         "uri": pa.nulls(len(ids), pa.string()), "row_group": np.zeros(len(ids), np.int32),
                         "row": np.arange(len(ids), dtype=np.int32)}, schema=PART_META_SCHEMA)
        data = part_bytes(PartRows(ids, np.zeros((len(ids), 4), np.uint8), None, meta))
        storage.atomic_write_bytes(vloc.join(f"p{n}.parquet"), data)
        parts.append(PartEntry(part=f"p{n}", source=SourceShard(f"s{n}", 1, "e"), rows=len(ids), indexed=len(ids),
                               dropped=0, id_min=int(ids.min()), id_max=int(ids.max()), index_file=f"p{n}.parquet",
                               index_bytes=len(data)))
    count, examples = find_duplicates(vloc, parts, StorageConfig())
    assert count == 30 and len(examples) == MAX_EXAMPLES == 20
    planted = set(all_ids[100:130].tolist())
    assert all(i in planted and {a.part, b.part} == {"p0", "p2"} for i, a, b in examples)
    assert find_duplicates(vloc, parts[:2], StorageConfig()) == (0, [])


def test_a_bad_shard_is_skipped_named_and_retried_next_run(tmp_path, random_model, ray_local):
    """One truncated shard among four: the other three publish, the snapshot records it as
    skipped with its reason, the summary names it; once the shard is fixed, the next run
    builds it (and only it) and the snapshot has nothing skipped."""
    cfg = small_cfg(tmp_path)
    folder = tmp_path / "src"
    write_image_shards(str(folder), 4, 20, seed=11)
    bad = folder / "part-00002.parquet"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])
    root = str(tmp_path / "index")
    s = reindex(str(folder), root, random_model, cfg, progress=False)
    assert s.flipped and s.total_shards == 3 and s.total_rows == 60
    assert [k.source.uri for k in s.skipped] == [str(bad)] and "not a readable Parquet file" in s.skipped[0].reason
    assert "1 source shard(s) skipped" in s.skipped_line() and str(bad) in s.skipped_line()
    snap = read_snapshot(resolve(root), s.snapshot)
    assert [k.source.uri for k in snap.skipped] == [str(bad)]
    again = reindex(str(folder), root, random_model, cfg, progress=False)  # still bad: nothing new to publish
    assert not again.flipped and again.snapshot == s.snapshot and len(again.skipped) == 1
    bad.write_bytes(good_bytes)
    fixed = reindex(str(folder), root, random_model, cfg, progress=False)
    assert fixed.flipped and fixed.encoded_shards == 1 and fixed.total_rows == 80 and fixed.skipped == []
    assert read_snapshot(resolve(root), fixed.snapshot).skipped == []


def test_unique_random_ids_pass_and_disjoint_ranges_skip_the_pass(tmp_path, random_model, ray_local):
    cfg = small_cfg(tmp_path)
    write_image_shards(str(tmp_path / "rand"), 4, 30, seed=4)
    s = reindex(str(tmp_path / "rand"), str(tmp_path / "i1"), random_model, cfg, progress=False)
    assert s.total_rows == 120 and s.ids_checked == 120  # overlapping ranges: every id read once
    write_image_shards(str(tmp_path / "seq"), 4, 30, ids=np.arange(120))
    s = reindex(str(tmp_path / "seq"), str(tmp_path / "i2"), random_model, cfg, progress=False)
    assert s.total_rows == 120 and s.ids_checked == 0  # disjoint ranges: no part file read at all


# --------------------------------------------------------------------------- snapshots and GC


def test_searcher_on_a_generation_survives_append_and_gc(tmp_path, random_model, ray_local):
    """A searcher opened on g keeps answering the same while appends publish g+1, g+2 and GC runs;
    it sees new rows only when reopened; GC keeps the current and previous snapshots' files and,
    with a zero grace period, deletes what only older snapshots named."""
    cfg = small_cfg(tmp_path, "index.gc_grace_s=0")
    folder = tmp_path / "src"
    write_image_shards(str(folder), 3, 50, seed=5)
    root = str(tmp_path / "index")
    g1 = reindex(str(folder), root, random_model, cfg, progress=False)
    s1 = Searcher.open(root, cfg.storage)
    queries = np.random.default_rng(0).standard_normal((20, s1.dim)).astype(np.float32)
    before = s1.search(queries, 10)
    # Append one shard and rewrite another (a changed shard gets a new part name).
    write_image_shards(str(tmp_path / "more"), 1, 50, seed=6)
    os.replace(tmp_path / "more" / "part-00000.parquet", folder / "part-00003.parquet")
    write_image_shards(str(tmp_path / "redo"), 1, 50, seed=7)
    os.replace(tmp_path / "redo" / "part-00000.parquet", folder / "part-00001.parquet")
    g2 = reindex(str(folder), root, random_model, cfg, progress=False)
    assert (g2.encoded_shards, g2.removed_shards, g2.snapshot[-1]) == (2, 1, "2")
    after = s1.search(queries, 10)
    np.testing.assert_array_equal(after.ids, before.ids)  # the open searcher: same answers
    assert s1.version == g1.snapshot and Searcher.open(root, cfg.storage).ntotal == 200
    # g1 is the previous snapshot: a reader can still open it, whatever the grace period.
    old = Searcher.open(root, cfg.storage, snapshot=g1.snapshot)
    np.testing.assert_array_equal(old.search(queries, 10).ids, before.ids)
    replaced = next(p for p in read_snapshot(resolve(root), g1.snapshot).parts if p.source.uri.endswith("01.parquet"))
    vdir = os.path.join(root, "models", g1.model_version)
    assert os.path.exists(os.path.join(vdir, replaced.index_file))
    # One more append: g1 is now neither current nor previous, and the grace is 0.
    write_image_shards(str(tmp_path / "more2"), 1, 50, seed=8)
    os.replace(tmp_path / "more2" / "part-00000.parquet", folder / "part-00004.parquet")
    g3 = reindex(str(folder), root, random_model, cfg, progress=False)
    assert g3.gc.deleted_snapshots == 1 and g3.gc.retained == sorted([g2.snapshot, g3.snapshot])
    assert not os.path.exists(os.path.join(vdir, replaced.index_file))  # only g1 named it
    assert not os.path.exists(os.path.join(vdir, "snapshots", "00000001.json"))
    np.testing.assert_array_equal(s1.search(queries, 10).ids, before.ids)  # held in memory: still answers
    _, ids = served_ids(root, cfg)
    assert len(ids) == 250 == len(set(ids.tolist()))


def test_gc_respects_the_grace_period(tmp_path, random_model, ray_local):
    cfg = small_cfg(tmp_path, "index.gc_grace_s=3600")
    folder = tmp_path / "src"
    write_image_shards(str(folder), 2, 20, seed=9)
    root = str(tmp_path / "index")
    for i in range(3):  # g1, then two appends
        if i:
            write_image_shards(str(tmp_path / f"add{i}"), 1, 20, seed=10 + i)
            os.replace(tmp_path / f"add{i}" / "part-00000.parquet", folder / f"part-{1 + i:05d}.parquet")
        last = reindex(str(folder), root, random_model, cfg, progress=False)
    assert last.gc.deleted_files == 0 and len(last.gc.retained) == 3  # g1 retired < 1 h ago: kept
    assert list_generations(resolve(root), last.model_version) == [1, 2, 3]


# --------------------------------------------------------------------------- old layout


def test_a_root_of_the_previous_part_format_is_refused_with_the_rebuild_message(tmp_path, random_model, images):
    """Schema 2 (a FAISS index + an id map per part) is neither appended to nor served."""
    cfg = small_cfg(tmp_path)
    root = resolve(str(tmp_path / "old"))
    version = model_version(load_model(random_model))
    storage.atomic_write_bytes(snapshot_loc(root, version, 1), json.dumps({"schema_version": 2, "generation": 1,
                                                                          "parts": []}).encode())
    storage.atomic_write_bytes(root.join("CURRENT"), f"{version}/00000001\n".encode())
    for attempt in (lambda: reindex(images, root.uri, random_model, cfg, progress=False),
                    lambda: Searcher.open(root.uri, cfg.storage)):
        with pytest.raises(IndexError_, match=r"older index format \(schema 2.*rebuild it: run the reindex into a "
                                              "new --index-root"):
            attempt()
