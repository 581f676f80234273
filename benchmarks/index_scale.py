"""How the reindex's costs grow with source shards: the scale-out design vs the previous one.

Tiny 8x8 images, random int64 ids (every shard's id range overlaps every other's, the
worst case for the duplicate-id check), `--rows` rows per shard, S = `--shards` source
shards on local storage, a random 32-bit model (the rate does not depend on the weights).
For each S, in one run on one machine:

- full build: wall seconds, start-up (until the first part record), seconds per shard
  after start-up, metadata bytes written per shard (records + snapshot + CURRENT), bytes the
  driver receives per image, seconds per stage;
- "nothing to do": a rerun over the same S shards;
- at the largest S: appending `--append` shards (a new snapshot generation), with its stages
  and the metadata bytes that commit wrote;
- a one-part commit to a `--commit-parts`-part index through the real publish path (lock,
  manifests, manifest list, compare-and-swap of CURRENT): bytes written besides the part's
  own files (every file created or rewritten, counted on disk);
- fixed bytes per part (`--overhead-rows`): the same rows written as 20 and as 2,000 lean
  parts by the real part writer (codes from FAISS's encoder with the version's trained
  index), flat and IVF at nlist 1,024 and 16,384: (bytes at 2,000 - bytes at 20) / 1,980,
  counting part files, commit records and manifest entries; beside it, the trained index
  every part of the previous design copied;
- serving (no reindex, `--serving-only` runs just these): the part -> partition plan simulated
  on `--plan-parts` part names (parts moved by a one-part append, and from 8 to 9 partitions),
  and serving partitions swapping to a one-part append of a `--swap-parts`-part index (part
  files each reads from storage, seconds against loading from scratch).

The previous design (commit `--baseline-commit`: one manifest.json rewritten after every
shard, embeddings streamed to the driver) runs at S in `--baseline-shards` in a subprocess
on its own extracted copy of the package (`git archive`), measured the same way: bytes its
driver loop received (the batches' array bytes) and manifest bytes written (every rewrite).

    python benchmarks/index_scale.py                     # S = 100, 1000, 5000; baseline at 100, 1000
    python benchmarks/index_scale.py --smoke             # seconds: S = 8, 24; baseline at 8
    python benchmarks/index_scale.py --serving-only      # plan and swap rows only (no Ray)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_setup as bs  # noqa: E402

BASELINE_COMMIT = "cf6198d"  # the last commit with the manifest.json design


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--baseline-shards", type=int, nargs="*", default=[100, 1000])
    p.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    p.add_argument("--rows", type=int, default=20, help="rows per source shard")
    p.add_argument("--append", type=int, default=10, help="shards appended to the largest version")
    p.add_argument("--snapshot-parts", type=int, default=100_000,
                   help="also time writing and reading one snapshot listing this many parts (the 1B-image size)")
    p.add_argument("--commit-parts", type=int, default=2000,
                   help="measure a one-part append to an index of this many parts (metadata bytes written)")
    p.add_argument("--overhead-rows", type=int, default=100_000,
                   help="rows written as 20 and as 2,000 parts to measure the fixed bytes per part (0: skip)")
    p.add_argument("--plan-parts", type=int, default=100_000, help="parts of the simulated partition plan")
    p.add_argument("--plan-partitions", type=int, default=8)
    p.add_argument("--swap-parts", type=int, default=2000, help="parts of the index a one-part append swaps")
    p.add_argument("--swap-partitions", type=int, default=2)
    p.add_argument("--serving-only", action="store_true", help="only the plan and swap rows")
    p.add_argument("--out", default=None, help="work and output dir (default outputs/bench-index-scale)")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.shards, a.baseline_shards, a.rows, a.append, a.snapshot_parts = [8, 24], [], 10, 2, 1000
        a.commit_parts, a.overhead_rows, a.swap_parts = 200, 4000, 60
    a.out = os.path.abspath(a.out or os.path.join("outputs", "bench-index-scale" + ("-smoke" if a.smoke else "")))
    a.json = a.json or os.path.join(a.out, "index_scale.json")
    return a


def write_shards(folder: str, first: int, count: int, rows: int, rng: np.random.Generator) -> None:
    """Shards part-<first>.. of random 8x8 PNGs with random int64 ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sscq_dist.data.schema import IMAGE_SCHEMA
    from sscq_dist.ingest import png_bytes

    os.makedirs(folder, exist_ok=True)
    pngs = [png_bytes(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(64)]
    for s in range(first, first + count):
        ids = rng.integers(0, 2 ** 62, size=rows, dtype=np.int64)
        t = pa.table({"id": pa.array(ids, pa.int64()), "image": [pngs[i % 64] for i in range(rows)],
                      "uri": [f"mem://{i}" for i in ids], "label": pa.nulls(rows, pa.list_(pa.int32()))},
                     schema=IMAGE_SCHEMA)
        pq.write_table(t, os.path.join(folder, f"part-{s:05d}.parquet"))


def tree_bytes(root: str) -> dict:
    """Bytes under an index root by kind: metadata (JSON records, snapshots, manifests, CURRENT) vs data."""
    meta = data = 0
    for d, _, files in os.walk(root):
        for f in files:
            n = os.path.getsize(os.path.join(d, f))
            if f.endswith(".json") or f == "CURRENT":
                meta += n
            else:
                data += n
    return {"metadata": meta, "data": data}


def run_new(images: str, root: str, model: str, cfg) -> dict:
    from sscq_dist.indexing.reindex import reindex

    t0 = time.perf_counter()
    s = reindex(images, root, model, cfg, progress=False)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "encoded_shards": s.encoded_shards, "rows": s.total_rows, "parts": s.total_shards,
            "stages": s.stage_seconds, "driver_bytes": s.driver_received_bytes, "ids_checked": s.ids_checked,
            "nothing_to_do": s.nothing_to_do}


BASELINE_SCRIPT = r"""
import json, os, sys, time
import numpy as np
import ray
from sscq_dist.config import load_config
from sscq_dist.indexing import manifest as man, reindex as rx
import torch
from sscq_dist.model import build_model
from sscq_dist.registry import write_model_dir
images, root, model, cfg_path = sys.argv[1:5]
cfg = load_config(cfg_path, sys.argv[5:])
torch.manual_seed(0)  # the same random model as the new design's, written by the old package
write_model_dir(model, build_model(cfg.model, cfg.data.channels).state_dict(), cfg)
written = {"manifest_bytes": 0, "driver_bytes": 0}
orig_write = man.write_manifest
def counting_write(r, m):
    written["manifest_bytes"] += len(m.to_json().encode())
    return orig_write(r, m)
rx.write_manifest = counting_write
orig_stream = rx.encode_stream
def counting_stream(*a, **k):
    for b in orig_stream(*a, **k):
        written["driver_bytes"] += sum(np.asarray(v).nbytes for v in b.values())
        yield b
rx.encode_stream = counting_stream
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
out = {}
for name in ("build", "nothing"):
    t0 = time.perf_counter()
    s = rx.reindex(images, root, model, cfg, progress=False)
    out[name] = {"wall_s": time.perf_counter() - t0, "encoded_shards": s.encoded_shards, "rows": s.total_rows,
                 **({} if name == "nothing" else dict(written))}
print("RESULT " + json.dumps(out))
"""


def run_baseline(commit: str, images: str, root: str, model: str, cfg_path: str, overrides: list) -> dict:
    """The previous design on the same shards, from its own extracted package."""
    pkg = tempfile.mkdtemp(prefix="sscq-baseline-")
    try:
        archive = subprocess.run(["git", "-C", bs.REPO, "archive", commit, "sscq_dist"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", pkg], input=archive, check=True)
        env = dict(os.environ, PYTHONPATH=pkg)
        proc = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, images, root, model, cfg_path, *overrides],
                              env=env, capture_output=True, text=True, cwd=pkg)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"baseline failed ({proc.returncode}): " + proc.stderr[-600:].replace("\n", " | "))
        return json.loads(line[0][len("RESULT "):])
    finally:
        shutil.rmtree(pkg, ignore_errors=True)


def file_states(root: str) -> dict:
    """path -> (size, mtime_ns, inode) of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def written_since(before: dict, root: str, exclude: str = os.sep + "parts" + os.sep) -> dict:
    """Bytes of the files created or rewritten since `before`, outside `exclude` (the parts' own files)."""
    after = file_states(root)
    changed = {p: st[0] for p, st in after.items() if before.get(p) != st and exclude not in p}
    return {"bytes": sum(changed.values()), "files": sorted(os.path.relpath(p, root) for p in changed)}


def _bench_entry(i: int):
    from sscq_dist.indexing.formats import PartEntry, SourceShard, part_files, part_name

    src = SourceShard(f"s3://bucket/images/part-{i:06d}.parquet", 40_000_000 + i, f"{i:032x}")
    name = part_name(src.uri, src.etag)
    index_file, _ = part_files(name)
    return PartEntry(part=name, source=src, rows=10_000, indexed=9_990, dropped=10, id_min=i * 10_000,
                     id_max=i * 10_000 + 9_999, index_file=index_file, index_bytes=380_000)


def commit_cost(n_parts: int, root: str, manifest_max_parts: int) -> dict:
    """Metadata bytes a one-part append to an n_parts index writes (publish path, local root)."""
    from sscq_dist.indexing.formats import read_current, read_snapshot
    from sscq_dist.indexing.lock import IndexLock
    from sscq_dist.indexing.publish import new_snapshot, publish_snapshot
    from sscq_dist.storage import resolve

    loc = resolve(root)
    kw = dict(model_uri="models:/sscq/7", version="7", codebook_checksum="sha256:" + "0" * 64, bits=32, M=8, K=16,
              index_type="ivf_pq_fastscan", index_params={"nlist": 65536, "nprobe": 160}, coarse_checksum="0" * 64)
    parts = [_bench_entry(i) for i in range(n_parts)]
    with IndexLock(loc, "bench", 120) as lock:
        base = new_snapshot(1, parts, previous=None, lock=lock, **kw)
        publish_snapshot(loc, base, None, lock, manifest_max_parts=manifest_max_parts)
    before = file_states(root)
    t0 = time.perf_counter()
    with IndexLock(loc, "bench", 120) as lock:
        cur = read_current(loc)
        nxt = new_snapshot(2, parts + [_bench_entry(n_parts)], previous=cur, lock=lock, **kw)
        publish_snapshot(loc, nxt, cur, lock, base=read_snapshot(loc, cur), manifest_max_parts=manifest_max_parts)
    w = written_since(before, root)
    return {"parts": n_parts, "commit_s": time.perf_counter() - t0, "bytes": w["bytes"], "files": w["files"],
            "manifests": len(nxt.manifests)}


def snapshot_cost(n_parts: int, root: str) -> dict:
    """Seconds to write and read back (parse + type-check) one snapshot of n_parts parts."""
    from sscq_dist.indexing.formats import (PartEntry, Snapshot, SourceShard, part_files, part_name,
                                            read_snapshot, write_snapshot)
    from sscq_dist.storage import resolve

    parts = []
    for i in range(n_parts):
        src = SourceShard(f"s3://bucket/images/part-{i:06d}.parquet", 40_000_000 + i, f"{i:032x}")
        name = part_name(src.uri, src.etag)
        parts.append(PartEntry(part=name, source=src, rows=10_000, indexed=9_990, dropped=10, id_min=i * 10_000,
                               id_max=i * 10_000 + 9_999, index_file=part_files(name)[0], index_bytes=400_000))
    snap = Snapshot(generation=1, model_uri="models:/sscq/7", model_version="7", codebook_checksum="sha256:" + "0" * 64,
                    bits=32, M=8, K=16, index_type="ivf_pq_fastscan", index_params={"nlist": 65536, "nprobe": 160},
                    coarse_checksum="0" * 64, created_at="2026-11-30T00:00:00+00:00", previous=None, writer="bench",
                    fence=1, parts=parts)
    loc = resolve(root)
    t0 = time.perf_counter()
    write_snapshot(loc, snap)
    t1 = time.perf_counter()
    back = read_snapshot(loc, snap.name)
    t2 = time.perf_counter()
    assert len(back.parts) == n_parts
    size = os.path.getsize(os.path.join(root, "models", "7", "snapshots", "00000001.json"))
    size += sum(m.bytes for m in snap.manifests)  # the manifest list and every manifest it names
    return {"parts": n_parts, "bytes": size, "manifests": len(snap.manifests), "write_s": t1 - t0, "read_s": t2 - t1}


OVERHEAD_KINDS = (("flat", "pq_fastscan", 0), ("IVF nlist 1,024", "ivf_pq_fastscan", 1024),
                  ("IVF nlist 16,384", "ivf_pq_fastscan", 16_384))
OVERHEAD_PARTS = (20, 2000)


def trained_index(kind: str, nlist: int, codebooks: np.ndarray, rng: np.random.Generator):
    """The version's trained empty index; the IVF quantizer holds random centroids (only the
    list numbers a part stores depend on it, and k-means at nlist 16,384 is not what is measured)."""
    import faiss

    from sscq_dist.indexing import faiss_index as fi

    if kind == "pq_fastscan":
        return fi.build_pq_fastscan(codebooks)
    m, _, d = codebooks.shape
    quantizer = faiss.IndexFlatL2(m * d)
    quantizer.add(rng.standard_normal((nlist, m * d)).astype(np.float32))
    index = faiss.IndexIVFPQFastScan(quantizer, m * d, nlist, m, 4)
    index.by_residual = False
    faiss.copy_array_to_vector(codebooks.ravel(), index.pq.centroids)
    index.is_trained, index.own_fields = True, True
    quantizer.this.disown()
    return index


def part_overhead(n_rows: int, root: str) -> list[dict]:
    """Fixed bytes a lean part adds beyond its rows: the same rows as 20 and as 2,000 parts."""
    import pyarrow as pa

    from sscq_dist.indexing import faiss_index as fi
    from sscq_dist.indexing.formats import (PART_META_SCHEMA, PartRows, SourceShard, manifest_bytes, part_files,
                                            part_name, sha256_hex, version_loc, write_part)
    from sscq_dist.storage import resolve

    rng = np.random.default_rng(0)
    codebooks = rng.standard_normal((8, 16, 16)).astype(np.float32)
    x, _ = fi.synthetic_embeddings(codebooks, n_rows, 0.5, rng)
    ids = rng.integers(0, 2 ** 62, n_rows, dtype=np.int64)
    rows_in = np.arange(n_rows)
    meta = pa.table({"label": [[int(i % 10)] for i in ids], "uri": [f"s3://bucket/images/{i}.jpg" for i in ids],
                     "row_group": (rows_in % 10_000 // 1024).astype(np.int32),
                     "row": (rows_in % 1024).astype(np.int32)}, schema=PART_META_SCHEMA)
    out = []
    for label, kind, nlist in OVERHEAD_KINDS:
        trained = trained_index(kind, nlist, codebooks, rng)
        trained_bytes = fi.serialize(trained)
        coarse, checksum = sha256_hex(trained_bytes), fi.codebook_checksum(codebooks)  # once, not per part
        codes, lists = fi.encode(trained, x)
        total = {}
        for n_parts in OVERHEAD_PARTS:
            version = f"{kind}-{nlist}-{n_parts}"
            vloc = version_loc(resolve(root), version)
            entries, written = [], 0
            for j, sel in enumerate(np.array_split(rows_in, n_parts)):
                src = SourceShard(f"s3://bucket/images/part-{j:06d}.parquet", 300_000_000, f"{j:032x}")
                rows = PartRows(ids[sel], codes[sel], None if lists is None else lists[sel], meta.take(sel))
                rec = write_part(vloc, part_name(src.uri, src.etag), src, rows, len(sel), model_version=version,
                                 codebook_checksum=checksum, index_type=kind, coarse_checksum=coarse)
                written += sum(os.path.getsize(os.path.join(root, "models", version, f))
                               for f in part_files(rec.part))
                entries.append(rec.entry())
            # Each part's entry in the generation's manifests (the manifest list itself is O(manifests)).
            total[n_parts] = written + len(manifest_bytes(entries))
        few, many = OVERHEAD_PARTS
        out.append({"kind": label, "rows": n_rows, "bytes_20": total[few], "bytes_2000": total[many],
                    "fixed_bytes_per_part": (total[many] - total[few]) / (many - few),
                    "trained_index_bytes": len(trained_bytes)})
        print(json.dumps(out[-1]), flush=True)
    return out


def plan_stability(n_parts: int, partitions: int) -> dict:
    """The part -> partition plan, simulated on n_parts part names: moves on a one-part append
    and from `partitions` to `partitions + 1` partitions."""
    from sscq_dist.indexing.formats import part_name
    from sscq_dist.serving.planner import plan_moves

    names = [part_name(f"s3://bucket/images/part-{i:06d}.parquet", f"{i:032x}") for i in range(n_parts + 1)]
    t0 = time.perf_counter()
    out = {"append": plan_moves(names, partitions, partitions, appended=1),
           "grow": plan_moves(names[:n_parts], partitions, partitions + 1)}
    out["seconds"] = time.perf_counter() - t0
    # The previous planner (greedy bytes-balanced, largest part first) on the same names, with
    # part sizes +-10 % around 130 kB: the fraction of existing parts a one-part append moved.
    sizes = np.random.default_rng(0).integers(117_000, 143_000, size=n_parts + 1)
    old, new = _greedy_plan(names[:n_parts], sizes[:n_parts], partitions), _greedy_plan(names, sizes, partitions)
    out["greedy_append_moved_fraction"] = float(np.mean([old[n] != new[n] for n in old]))
    return out


def _greedy_plan(names: list, sizes: np.ndarray, partitions: int) -> dict:
    """name -> partition of the previous planner (LPT: each part, biggest first, to the lightest partition)."""
    import heapq

    heap, where = [(0, p) for p in range(partitions)], {}
    for i in sorted(range(len(names)), key=lambda i: (-int(sizes[i]), names[i])):
        load, p = heapq.heappop(heap)
        where[names[i]] = p
        heapq.heappush(heap, (load + int(sizes[i]), p))
    return where


def swap_reads(n_parts: int, partitions: int, folder: str) -> dict:
    """Serving partitions (SnapshotHolder, no cache folder) on an n_parts-part index swap to
    the next generation, which appends one part: part files read from storage, and seconds,
    against the first load."""
    import pathlib

    from sscq_dist import storage
    from sscq_dist.indexing.formats import write_current
    from sscq_dist.serving.holder import SnapshotHolder
    from test_serving_partition import generations  # the tests' index writer (real part files)

    root, _ = generations(pathlib.Path(folder), "pq_fastscan", n_parts + 1, 10 * (n_parts + 1), slice(None))
    holders = [SnapshotHolder(root, i, partitions, None, None, retain_previous_s=3600) for i in range(partitions)]
    reads: list[tuple[str, int]] = []
    real = storage.read_bytes

    def counting(loc):
        data = real(loc)
        reads.append((loc.uri, len(data)))
        return data

    storage.read_bytes = counting
    try:
        t0 = time.perf_counter()
        for h in holders:
            h.load_current()
        first_s, first_reads = time.perf_counter() - t0, len(reads)
        write_current(root, "5/00000002")
        reads.clear()
        t0 = time.perf_counter()
        for h in holders:
            h.load_current()
        swap_s = time.perf_counter() - t0
    finally:
        storage.read_bytes = real
    new = [h.get("5/00000002", lambda n: None) for h in holders]
    part_reads = [(u, n) for u, n in reads if "/parts/" in u]
    return {"parts": n_parts, "partitions": partitions, "first_load_s": first_s, "first_load_reads": first_reads,
            "swap_s": swap_s, "swap_part_files_read": len(part_reads),
            "swap_part_bytes_read": sum(n for _, n in part_reads), "swap_other_reads": len(reads) - len(part_reads),
            "read_parts": [p.read_parts for p in new], "kept_parts": [p.kept_parts for p in new]}


def serving_markdown(res: dict) -> list[str]:
    lines = []
    if res.get("plan"):
        ap, gr = res["plan"]["append"], res["plan"]["grow"]
        lines += ["", f"Part -> partition plan (rendezvous hashing, simulated on {gr['parts']:,} parts, "
                      f"{res['plan']['seconds']:.1f} s): a one-part append moves {ap['moved']} existing parts; "
                      f"{gr['before']} -> {gr['after']} partitions moves {gr['moved']:,} "
                      f"({100 * gr['moved_fraction']:.2f} %, bound 1/{gr['after']} + 1 % = "
                      f"{100 * (1 / gr['after'] + 0.01):.2f} %); largest partition {gr['max_over_mean']:.3f}x the mean. "
                      f"The previous greedy bytes-balanced plan moved "
                      f"{100 * res['plan']['greedy_append_moved_fraction']:.1f} % of the parts on the same append."]
    if res.get("swap"):
        sw = res["swap"]
        lines += ["", f"Swap to a one-part append of a {sw['parts']:,}-part index ({sw['partitions']} partitions): "
                      f"part files read {sw['swap_part_files_read']} ({sw['swap_part_bytes_read']:,} bytes; "
                      f"parts read per partition {sw['read_parts']}, kept from memory {sw['kept_parts']}), "
                      f"{sw['swap_s']:.2f} s, against {sw['first_load_reads']} reads and {sw['first_load_s']:.2f} s "
                      "for the first load."]
    return lines


def markdown(res: dict) -> str:
    if not res["new"] and not res["baseline"]:  # --serving-only
        return "\n".join(serving_markdown(res)[1:])
    rows = res["rows_per_shard"]
    lines = [f"Reindex scale ({rows} rows per shard, 8x8 images, random int64 ids, {res['cores']} cores, "
             f"{res['actors']} part builders):", "",
             "| design | S shards | build s | start-up s | s/shard after start-up | metadata bytes written/shard | "
             "driver bytes received/image | nothing-to-do s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["new"]:
        b = r["build"]
        per = (b["stages"].get("build", 0) - b["first_record_s"]) / max(1, r["shards"] - 1)
        lines.append(f"| snapshots (this) | {r['shards']} | {b['wall_s']:.1f} | {b['first_record_s']:.1f} | "
                     f"{per:.4f} | {r['bytes']['metadata'] / r['shards']:.0f} | "
                     f"{b['driver_bytes'] / max(1, b['rows']):.1f} | {r['nothing']['wall_s']:.2f} |")
    for r in res["baseline"]:
        b = r["build"]
        lines.append(f"| manifest.json ({res['baseline_commit']}) | {r['shards']} | {b['wall_s']:.1f} | - | "
                     f"{b['wall_s'] / r['shards']:.4f} | {b['manifest_bytes'] / r['shards']:.0f} | "
                     f"{b['driver_bytes'] / max(1, b['rows']):.1f} | {r['nothing']['wall_s']:.2f} |")
    if res.get("append"):
        ap = res["append"]
        st = ", ".join(f"{k} {v:.2f}" for k, v in ap["stages"].items() if k != "build_first_part")
        lines += ["", f"Append {ap['encoded_shards']} shards to the {ap['base_shards']}-shard version: "
                      f"{ap['wall_s']:.1f} s ({st}); ids read by the duplicate check: {ap['ids_checked']}; "
                      f"metadata written besides the parts: {ap.get('metadata_written', 0):,} bytes."]
    if res.get("commit"):
        c = res["commit"]
        lines += ["", f"One-part append to a {c['parts']:,}-part index (publish path: lock, manifest, manifest "
                      f"list, CAS of CURRENT): {c['bytes']:,} bytes of metadata written besides the part "
                      f"({len(c['files'])} files: {', '.join(c['files'])}), {c['manifests']} manifests, "
                      f"{c['commit_s']:.2f} s."]
    if res.get("snapshot"):
        sn = res["snapshot"]
        lines += ["", f"One snapshot of {sn['parts']:,} parts: {sn['bytes'] / 1e6:.1f} MB in "
                      f"{sn.get('manifests', 0)} manifests and their manifest list, written in "
                      f"{sn['write_s']:.2f} s, read and type-checked in {sn['read_s']:.2f} s."]
    if res.get("part_overhead"):
        po = res["part_overhead"]
        lines += ["", f"Fixed bytes per lean part ({po[0]['rows']:,} rows written as 20 and as 2,000 parts; part "
                      "file + commit record + manifest entry):", "",
                  "| index | bytes, 20 parts | bytes, 2,000 parts | fixed bytes per part | trained.index (once per "
                  "version; the previous design copied it into every part) |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {o['kind']} | {o['bytes_20']:,} | {o['bytes_2000']:,} | {o['fixed_bytes_per_part']:,.0f} | "
                  f"{o['trained_index_bytes']:,} |" for o in po]
    lines += serving_markdown(res)
    lines += ["", "Stages of each full build (s): " + "; ".join(
        f"S={r['shards']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["build"]["stages"].items()
                                          if k != "build_first_part") for r in res["new"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    from sscq_dist.config import load_config
    from sscq_dist.indexing.encoder import encoder_actors

    sys.path.insert(0, os.path.join(bs.REPO, "tests"))
    from fault_helpers import random_model_dir

    a = parse_args(argv)
    t_start = time.perf_counter()
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    cfg_path = bs.default_config("digits")
    overrides = [f"tracking.tracking_uri=sqlite:///{a.out}/mlflow.db", f"index.encode_batch_size={a.rows}"]
    cfg = load_config(cfg_path, overrides + ["index.gc_grace_s=0"])
    model = random_model_dir(os.path.join(a.out, "model"), 0)
    rng = np.random.default_rng(0)
    res = {"rows_per_shard": a.rows, "cores": bs.cpu_cores(), "baseline_commit": a.baseline_commit,
           # What the previous design shipped to the driver per image: the float32 embedding.
           "embedding_bytes_per_image": 4 * cfg.model.num_codebooks * cfg.model.codeword_dim,
           "new": [], "baseline": []}
    res["plan"] = plan_stability(a.plan_parts, a.plan_partitions)
    if a.swap_parts:
        res["swap"] = swap_reads(a.swap_parts, a.swap_partitions, os.path.join(a.out, "swap"))
    for S in ([] if a.serving_only else sorted(set(a.shards) | set(a.baseline_shards))):
        images = os.path.join(a.out, f"images-{S}")
        write_shards(images, 0, S, a.rows, rng)
        if S in a.baseline_shards:
            print(f"=== baseline S={S}", flush=True)
            b = run_baseline(a.baseline_commit, images, os.path.join(a.out, f"old-{S}"),
                             os.path.join(a.out, f"old-model-{S}"), cfg_path, overrides)
            res["baseline"].append({"shards": S, **b})
            print(json.dumps(res["baseline"][-1]), flush=True)
        if S not in a.shards:
            continue
        bs.start_ray(bs.cpu_cores() + 1, quiet=True)
        res["actors"] = encoder_actors(cfg)
        root = os.path.join(a.out, f"new-{S}")
        print(f"=== snapshots S={S}", flush=True)
        build = run_new(images, root, model, cfg)
        build["first_record_s"] = build["stages"].get("build_first_part", 0.0)
        r = {"shards": S, "build": build, "bytes": tree_bytes(root), "nothing": run_new(images, root, model, cfg)}
        res["new"].append(r)
        print(json.dumps(r), flush=True)
        if S == max(a.shards) and a.append:
            write_shards(images, S, a.append, a.rows, rng)
            before = file_states(root)
            ap = run_new(images, root, model, cfg)
            res["append"] = {"base_shards": S, **ap, "metadata_written": written_since(before, root)["bytes"]}
            print(json.dumps(res["append"]), flush=True)
    if a.snapshot_parts and not a.serving_only:
        res["snapshot"] = snapshot_cost(a.snapshot_parts, os.path.join(a.out, "snapshot-only"))
    if a.commit_parts and not a.serving_only:
        res["commit"] = commit_cost(a.commit_parts, os.path.join(a.out, "commit-only"), cfg.index.manifest_max_parts)
        print(json.dumps(res["commit"]), flush=True)
    if a.overhead_rows and not a.serving_only:
        res["part_overhead"] = part_overhead(a.overhead_rows, os.path.join(a.out, "part-overhead"))
    res["command"] = "python benchmarks/index_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["wall_s"] = time.perf_counter() - t_start
    bs.write_json(a.json, res)
    print(markdown(res))
    print(f"index scale: results {a.json}; {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    from sscq_dist.cli import run_main

    run_main(lambda: main())
