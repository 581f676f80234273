"""On-disk formats of an index root: part records, snapshots, CURRENT, lean part files, part names."""

import dataclasses
import json

import numpy as np
import pytest

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.records import parse_json_record, to_plain
from sscq_dist.indexing.formats import (ManifestCache, ManifestRef, PartEntry, PartRecord, Snapshot, SourceShard,
                                        check_codebooks, list_generations, parse_part_record, parse_snapshot_name,
                                        part_name, read_current, read_manifest, read_part_record, read_snapshot,
                                        read_snapshot_list, snapshot_name, unseen_manifests, version_loc,
                                        write_current, write_part_record, write_snapshot)

CB = np.ones((8, 16, 16), np.float32)


def entry(i: int) -> PartEntry:
    src = SourceShard(f"s3://b/images/part-{i:05d}.parquet", 1000 + i, f'"etag{i}"')
    name = part_name(src.uri, src.etag)
    return PartEntry(part=name, source=src, rows=10, indexed=9, dropped=1, id_min=10 * i, id_max=10 * i + 9,
                     index_file=f"parts/{name}.parquet", index_bytes=999)


def snapshot(gen=1, version="3", n=3) -> Snapshot:
    return Snapshot(generation=gen, model_uri="models:/sscq/3", model_version=version,
                    codebook_checksum=fi.codebook_checksum(CB), bits=32, M=8, K=16, index_type="ivf_pq_fastscan",
                    index_params={"nlist": 1024, "nprobe": 160}, coarse_checksum="ab" * 32,
                    created_at="2026-11-30T00:00:00+00:00", previous=None, writer="w", fence=7,
                    parts=[entry(i) for i in range(n)])


@pytest.fixture
def root(tmp_path):
    return storage.resolve(str(tmp_path / "index"))


def test_snapshot_round_trip_and_generation_listing(root):
    a, b = snapshot(1), snapshot(2)
    write_snapshot(root, a)
    write_snapshot(root, b)
    back = read_snapshot(root, "3/00000002")
    assert back == b and back.name == "3/00000002" and back.total_rows == 27
    assert list_generations(root, "3") == [1, 2]
    assert list_generations(root, "4") == []


def test_snapshots_are_never_rewritten(root):
    write_snapshot(root, snapshot(1))
    with pytest.raises(IndexError_, match="immutable"):
        write_snapshot(root, snapshot(1, n=1))
    assert len(read_snapshot(root, "3/00000001").parts) == 3


def test_part_record_round_trip(root):
    rec = PartRecord(**entry(4).__dict__, index_sha256="0" * 64, model_version="3",
                     codebook_checksum=fi.codebook_checksum(CB), index_type="pq_fastscan", created_at="now")
    vloc = version_loc(root, "3")
    assert read_part_record(vloc, rec.part) is None  # never committed
    write_part_record(vloc, rec)
    assert read_part_record(vloc, rec.part) == rec
    assert rec.entry() == entry(4)


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d.pop("fence"), "fence"),
    (lambda d: d["manifests"][0].pop("sha256"), "manifests[0].sha256"),
])
def test_missing_key_is_named(root, mutate, key):
    write_snapshot(root, snapshot())
    loc = version_loc(root, "3").join("snapshots", "00000001.json")
    data = json.loads(storage.read_bytes(loc))
    mutate(data)
    storage.atomic_write_bytes(loc, json.dumps(data).encode())
    with pytest.raises(IndexError_, match=rf"00000001.json: key '{key}': missing$".replace("[", r"\[").replace("]", r"\]")):
        read_snapshot(root, "3/00000001", cache=ManifestCache())


@pytest.mark.parametrize("drop,key", [(lambda e: e.pop("id_max"), "id_max"),
                                      (lambda e: e["source"].pop("etag"), "source.etag")])
def test_missing_key_in_a_manifest_line_is_named(root, drop, key):
    lines = [to_plain(entry(i)) for i in range(3)]
    drop(lines[1])
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    vloc = version_loc(root, "3")
    storage.atomic_write_bytes(vloc.join("manifests", "m.jsonl"), data)
    ref = ManifestRef(file="manifests/m.jsonl", sha256=storage_sha(data), bytes=len(data), parts=3)
    with pytest.raises(IndexError_, match=rf"m.jsonl line 2: key '{key}': missing$"):
        read_manifest(vloc, ref, ManifestCache())


def storage_sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _written(root) -> dict:
    """Bytes of every file under the root by path (what a commit wrote is the difference)."""
    import os

    out = {}
    for d, _, files in os.walk(root.path):
        for f in files:
            out[os.path.join(d, f)] = os.path.getsize(os.path.join(d, f))
    return out


def test_one_part_append_to_2000_parts_writes_one_small_manifest(root):
    """A generation is a manifest list over reused manifests: appending one part to a
    2,000-part snapshot writes one manifest of one entry and a small list (< 64 KB together),
    and a reader holding the old generation reads only the new manifest."""
    base = snapshot(1, n=2000)
    write_snapshot(root, base, manifest_max_parts=1000)
    assert [m.parts for m in base.manifests] == [1000, 1000]
    cache = ManifestCache()
    assert len(read_snapshot(root, "3/00000001", cache=cache).parts) == 2000 and cache.reads == 2
    before = _written(root)
    nxt = snapshot(2, n=2001)
    write_snapshot(root, nxt, base=base, manifest_max_parts=1000)
    after = _written(root)
    new = {p: n for p, n in after.items() if p not in before}
    assert len(new) == 2 and sum(new.values()) < 64_000, new  # one manifest + the manifest list
    assert [m.file for m in nxt.manifests[:2]] == [m.file for m in base.manifests]  # reused, not rewritten
    assert unseen_manifests(root, read_snapshot_list(root, "3/00000002"), cache) == nxt.manifests[2:]
    back = read_snapshot(root, "3/00000002", cache=cache)
    assert cache.reads == 3 and len(back.parts) == 2001 and back.parts == sorted(nxt.parts, key=lambda p: p.source.uri)


def test_removed_parts_go_on_a_delete_list_then_the_manifest_is_rewritten(root):
    base = snapshot(1, n=10)
    write_snapshot(root, base, manifest_max_parts=10)
    one_gone = snapshot(2, n=10)
    one_gone.parts = one_gone.parts[1:]
    write_snapshot(root, one_gone, base=base, manifest_max_parts=10)
    assert len(one_gone.manifests) == 1 and one_gone.manifests[0].file == base.manifests[0].file
    assert one_gone.manifests[0].deleted == [entry(0).part]
    assert [p.part for p in read_snapshot(root, "3/00000002", cache=ManifestCache()).parts] == \
        [entry(i).part for i in range(1, 10)]
    most_gone = snapshot(3, n=10)
    most_gone.parts = most_gone.parts[7:]  # more than half removed: its live entries are rewritten
    write_snapshot(root, most_gone, base=one_gone, manifest_max_parts=10)
    assert len(most_gone.manifests) == 1 and most_gone.manifests[0].file != base.manifests[0].file
    assert most_gone.manifests[0].parts == 3 and most_gone.manifests[0].deleted == []


def test_a_snapshot_of_the_inline_layout_is_refused_with_the_rebuild_hint(root):
    """Generations written before lean parts and manifest lists (schema 2, every part inline,
    each part a FAISS index with its own codebooks) are refused with one line that says to rebuild."""
    snap = snapshot(1)
    data = {"schema_version": 2, **to_plain(snap)}
    data.pop("manifests"), data.pop("skipped")
    storage.atomic_write_bytes(version_loc(root, "3").join("snapshots", "00000001.json"), json.dumps(data).encode())
    with pytest.raises(IndexError_, match="older index format .*schema 2.*rebuild it"):
        read_snapshot(root, "3/00000001")


def test_mistyped_key_unknown_schema_and_bad_json_are_one_line():
    good = {"schema_version": 3, **to_plain(snapshot())}
    bad = dict(good, bits="32")
    with pytest.raises(IndexError_, match="snap.json: key 'bits': expected an integer, got str"):
        parse_json_record(Snapshot, json.dumps(bad), "snap.json", IndexError_, 3)
    with pytest.raises(IndexError_, match="key 'rows': expected an integer, got float"):
        parse_part_record(json.dumps({**good["parts"][0], "rows": 1.5, "schema_version": 3}), "rec.json")
    with pytest.raises(IndexError_, match="'schema_version': 9, this reader understands 3"):
        parse_part_record(json.dumps({**good["parts"][0], "schema_version": 9}), "rec.json")
    with pytest.raises(IndexError_, match="rec.json: not valid JSON"):
        parse_part_record("{nope", "rec.json")


def test_current_names_a_generation_or_a_legacy_version(root):
    assert read_current(root) is None
    write_current(root, snapshot_name("7", 12))
    assert read_current(root) == "7/00000012"
    assert parse_snapshot_name("7/00000012", "x") == ("7", 12)
    assert parse_snapshot_name("7", "x") == ("7", None)  # the pre-snapshot layout
    for bad in ("../etc", "7/abc", "a/b/c", ""):
        with pytest.raises(IndexError_):
            write_current(root, bad)


def test_part_names_derive_from_uri_and_etag():
    a = part_name("s3://b/images/part-00001.parquet", '"e1"')
    assert a == part_name("s3://b/images/part-00001.parquet", '"e1"')  # a rerun writes the same names
    assert a.startswith("part-00001-") and len(a) == len("part-00001-") + 16
    assert a != part_name("s3://b/images/part-00001.parquet", '"e2"')  # a rewritten shard gets new files
    assert a != part_name("s3://b/other/part-00001.parquet", '"e1"')
    assert "/" not in part_name("s3://b/x/we ird/../name.parquet", "e")


def test_check_codebooks_names_both_checksums():
    with pytest.raises(IndexError_, match=r"snapshot has sha256:\w+, model gives sha256:\w+"):
        check_codebooks(snapshot(), CB * 2)
    check_codebooks(snapshot(), CB)


@pytest.mark.parametrize("ivf", [False, True])
def test_a_lean_part_costs_under_4kb_beyond_its_rows_and_holds_no_codebook(root, ivf):
    """The same 20,000 rows in 2 and in 200 parts: the bytes a part adds (part file footer,
    commit record, snapshot entry) stay under 4 KB, and no part holds the codebooks."""
    import pyarrow as pa

    from sscq_dist.indexing.formats import PART_META_SCHEMA, PartRows, write_part

    rng = np.random.default_rng(0)
    cb = rng.standard_normal((8, 16, 16)).astype(np.float32)
    n = 20_000
    ids = np.arange(n, dtype=np.int64) * 3
    codes = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    lists = rng.integers(0, 16_384, n) if ivf else None
    meta = pa.table({"label": [[int(i % 10)] for i in ids], "uri": [f"s3://b/img/{i}.jpg" for i in ids],
                     "row_group": (np.arange(n) // 1024 % 10).astype(np.int32),
                     "row": (np.arange(n) % 1024).astype(np.int32)}, schema=PART_META_SCHEMA)

    def total_bytes(n_parts: int, version: str) -> int:
        vloc = version_loc(root, version)
        entries, written = [], 0
        for j, p in enumerate(np.array_split(np.arange(n), n_parts)):
            src = SourceShard(f"s3://b/images/part-{j:05d}.parquet", 10**8, f'"{j:032x}"')
            rows = PartRows(ids[p], codes[p], lists[p] if ivf else None, meta.take(p))
            rec = write_part(vloc, part_name(src.uri, src.etag), src, rows, len(p), model_version=version,
                             codebook_checksum=fi.codebook_checksum(cb), index_type="pq_fastscan",
                             coarse_checksum="ab" * 32)
            data = storage.read_bytes(vloc.join(rec.index_file))
            assert cb[0].tobytes()[:64] not in data  # codes only: the codebooks live in trained.index
            written += len(data) + len(storage.read_bytes(vloc.join(f"parts/{rec.part}.json")))
            entries.append(rec.entry())
        snap = dataclasses.replace(snapshot(1, version), parts=entries)
        return written + len(snap.to_json())

    few, many = total_bytes(2, "a"), total_bytes(200, "b")
    fixed = (many - few) / 198
    assert fixed < 4096, fixed
