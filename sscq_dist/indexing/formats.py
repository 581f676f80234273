"""On-disk formats of an index root (SPEC section 3), imported by the writer and every reader.

    <root>/CURRENT                                   "<model_version>/<generation>" that serves
    <root>/lock                                      the writer's lease (indexing/lock.py)
    <root>/models/<version>/trained.index            the version's ONE trained empty FAISS index:
                                                     PQ codebooks (+ the IVF coarse quantizer)
    <root>/models/<version>/parts/<part>.parquet     one lean part per source shard: per row id,
                                                     code, (IVF) list, label, uri, row group, row
    <root>/models/<version>/parts/<part>.json        the part's commit record (written last)
    <root>/models/<version>/manifests/<gen>-<i>-<sha>.jsonl  immutable manifest: up to
                                                     index.manifest_max_parts part entries
    <root>/models/<version>/snapshots/<gen>.json     immutable manifest list: the manifests
                                                     (and per manifest, its removed parts) that serve
    <root>/leases/<replica>.json                     a serving replica's reader lease (indexing/leases.py)

A part holds codes, ids and row metadata only, never a codebook or a quantizer (FAISS's
`contrib/ondisk.py` idea: one trained index, parts contribute their lists), so its fixed
cost is its Parquet footer and its record whatever nlist is. Results are answered from the
parts: label and uri per row, and the thumbnail reference (source shard uri + etag in the
record, row group + row per row), so search never reads the source bucket.

Commit protocol (Apache Iceberg's): the part file first, the record last (each atomic), so a
record exists only for a whole part; a generation is a small manifest list naming immutable,
content-addressed manifests that later generations reuse, so a commit writes manifests for
its new parts only (a removed part goes on its manifest's delete list; a manifest with more
removed than live entries is rewritten); CURRENT is one compare-and-swap (publish.py). A
part's name derives from its source shard's uri + etag, so a retried or rerun build of the
same shard overwrites the same names. Readers cache manifests by name (`ManifestCache`), so a
new generation costs them the manifest list plus the manifests they have not seen.

JSON only (never pickle): these files are data a reader must not trust to execute.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.faiss_index import codebook_checksum
from sscq_dist.records import build_record, parse_json_record, record_json, to_plain
from sscq_dist.storage import Location

# Part records (and the part entries in manifests). 3: lean parts (one Parquet file of codes +
# row metadata against the version's trained.index); 2 (a FAISS index + id map per part, and
# snapshots listing parts inline) and the pre-snapshot manifest.json layout are refused.
SCHEMA_VERSION = 3
# snapshots/<gen>.json as a manifest list (manifests/*.jsonl lines are part entries); numbered
# apart from the part-record schema, so either can change without the other.
MANIFEST_LIST_SCHEMA = 4
CURRENT_NAME = "CURRENT"
MANIFESTS_DIR = "manifests"
MANIFEST_SUFFIX = ".jsonl"
# A manifest whose removed entries outnumber its live ones is rewritten (bounded read amplification).
REWRITE_DELETED_FRACTION = 0.5
MODELS_DIR = "models"
PARTS_DIR = "parts"
SNAPSHOTS_DIR = "snapshots"
TRAINED_FILE = "trained.index"
PART_SUFFIX = ".parquet"
RECORD_SUFFIX = ".json"
# Served-index quality report of a version (serving/index_quality.py), kept while the version serves.
METRICS_FILE = "index_metrics.json"
REBUILD_HINT = ("rebuild it: run the reindex into a new --index-root (this reader understands index format "
                f"{SCHEMA_VERSION}: lean parts against one trained.index)")

# A version becomes a path component: refuse separators and dot-dot.
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_GEN_WIDTH = 8
# Row metadata of a part (everything but id and code): what a result shows and where its image is.
PART_META_SCHEMA = pa.schema([
    pa.field("label", pa.list_(pa.int32())),  # null when the source has no label column
    pa.field("uri", pa.string()),
    pa.field("row_group", pa.int32()),  # row group of the source shard holding the row
    pa.field("row", pa.int32()),  # row inside that row group
])


def _err(msg: str) -> IndexError_:
    return IndexError_(msg)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- records


@dataclass
class SourceShard:
    """A source image shard as one LIST reports it (local files: etag = mtime + size)."""

    uri: str
    size: int
    etag: str


@dataclass
class PartEntry:
    """One part as a snapshot lists it: its source shard, counts, id range and files.

    rows: rows in the source shard; indexed: vectors in the part (rows - dropped).
    index_file: the part file (codes, ids, row metadata), relative to the version folder.
    The thumbnail reference of a row is source.uri + source.etag + its row group and row.
    """

    part: str
    source: SourceShard
    rows: int
    indexed: int
    dropped: int
    id_min: int
    id_max: int
    index_file: str
    index_bytes: int


@dataclass
class PartRecord(PartEntry):
    """The commit record `parts/<part>.json`: the entry plus what it was built with and checksums."""

    index_sha256: str = ""
    model_version: str = ""
    codebook_checksum: str = ""
    index_type: str = ""
    coarse_checksum: str = ""  # sha256 of the version's trained.index the codes were assigned with
    created_at: str = ""

    def entry(self) -> PartEntry:
        return PartEntry(**{f: getattr(self, f) for f in PartEntry.__dataclass_fields__})


@dataclass
class ManifestRef:
    """One manifest as a manifest list names it.

    file: path relative to the version folder; sha256/bytes: of that file (its name carries
    the hash, so a cached copy under the same name is the same content); parts: entries in
    the file; deleted: names of its entries this snapshot no longer serves.
    """

    file: str
    sha256: str
    bytes: int
    parts: int
    deleted: list[str] = field(default_factory=list)

    @property
    def live(self) -> int:
        return self.parts - len(self.deleted)


@dataclass
class SkippedShard:
    """A source shard whose build failed after its retries: not served by this snapshot, retried next run."""

    source: SourceShard
    reason: str
    error_kind: str = ""


@dataclass
class Snapshot:
    """An immutable list of the parts that serve, plus what a reader needs to trust them.

    On disk it is a manifest list (`manifests`); `parts` is what those manifests serve,
    filled in by `read_snapshot`. `skipped`: source shards this generation does not serve
    because their build failed.
    """

    generation: int
    model_uri: str
    model_version: str
    codebook_checksum: str
    bits: int
    M: int
    K: int
    index_type: str
    index_params: dict
    coarse_checksum: str  # sha256 of trained.index (codebooks + IVF quantizer)
    created_at: str
    previous: Optional[str]  # what CURRENT named when this one was published
    writer: str
    fence: int  # the writer's lock fencing token
    parts: list[PartEntry] = field(default_factory=list)
    manifests: list[ManifestRef] = field(default_factory=list)
    skipped: list[SkippedShard] = field(default_factory=list)

    @property
    def name(self) -> str:
        """What CURRENT holds for this snapshot."""
        return snapshot_name(self.model_version, self.generation)

    @property
    def total_rows(self) -> int:
        return sum(p.indexed for p in self.parts)

    @property
    def index_bytes(self) -> int:
        return sum(p.index_bytes for p in self.parts)

    def to_json(self) -> bytes:
        """The manifest list: every field but the parts (those are in the manifests)."""
        data = to_plain(self)
        data.pop("parts", None)
        return json.dumps({"schema_version": MANIFEST_LIST_SCHEMA, **data}, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- names


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version) or ".." in version:
        raise IndexError_(f"model version {version!r} cannot name an index directory "
                          "(letters, digits, '.', '_', '-'; no '/' or '..')")
    return version


def snapshot_name(version: str, generation: int) -> str:
    """What CURRENT holds: '<version>/<generation, 8 digits>'."""
    return f"{check_version(version)}/{generation:0{_GEN_WIDTH}d}"


def parse_snapshot_name(text: str, where: str) -> tuple[str, Optional[int]]:
    """'<version>/<gen>' -> (version, gen); a bare '<version>' (the old manifest.json layout) -> (version, None)."""
    version, sep, gen = text.strip().partition("/")
    check_version(version)
    if not sep:
        return version, None
    if not gen.isdigit():
        raise IndexError_(f"{where}: '{text.strip()}' is not <model_version>/<generation>")
    return version, int(gen)


def part_name(source_uri: str, etag: str) -> str:
    """Stable part name from the source shard's identity: '<shard stem>-<16 hex of sha256(uri, etag)>'."""
    stem = source_uri.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"\.parquet$", "", stem)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:64] or "shard"
    digest = hashlib.sha256(f"{source_uri}\0{etag}".encode()).hexdigest()[:16]
    return f"{stem}-{digest}"


def entry_files(entry: PartEntry) -> tuple[str, ...]:
    """Every file (relative to the version folder) a part entry needs: its data files and its record."""
    return (entry.index_file, part_files(entry.part)[-1])


def version_loc(root: Location, version: str) -> Location:
    return root.join(MODELS_DIR, check_version(version))


def part_files(part: str) -> tuple[str, str]:
    """(part file, record) paths of a part, relative to its version folder."""
    base = f"{PARTS_DIR}/{part}"
    return base + PART_SUFFIX, base + RECORD_SUFFIX


def snapshot_loc(root: Location, version: str, generation: int) -> Location:
    return version_loc(root, version).join(SNAPSHOTS_DIR, f"{generation:0{_GEN_WIDTH}d}.json")


def manifests_loc(root: Location, version: str) -> Location:
    return version_loc(root, version).join(MANIFESTS_DIR)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- part files


@dataclass
class PartRows:
    """One part's rows in file order: ids (n,) int64, codes (n, code_size) uint8 packed PQ
    codes (FAISS's nbits=4 layout), lists (n,) int64 IVF list numbers (None for exhaustive
    parts) and meta, a table with PART_META_SCHEMA's columns."""

    ids: np.ndarray
    codes: np.ndarray
    lists: Optional[np.ndarray]
    meta: pa.Table


def part_bytes(rows: PartRows) -> bytes:
    """One part as Parquet: id, code (fixed-size binary), [list], label, uri, row_group, row.

    Footer kept small (it is most of a part's fixed cost): no statistics (the record holds
    the id range), no embedded Arrow schema, no dictionaries (uris and codes are unique).
    """
    n, code_size = rows.codes.shape
    codes = np.ascontiguousarray(rows.codes, np.uint8)
    cols = {"id": pa.array(np.asarray(rows.ids, np.int64), pa.int64()),
            "code": pa.Array.from_buffers(pa.binary(code_size), n, [None, pa.py_buffer(codes)])}
    if rows.lists is not None:
        cols["list"] = pa.array(np.asarray(rows.lists, np.int32), pa.int32())
    for f in PART_META_SCHEMA:
        cols[f.name] = rows.meta.column(f.name).cast(f.type)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf, compression="zstd", write_statistics=False, store_schema=False,
                   use_dictionary=False)
    return buf.getvalue().to_pybytes()


def _read_parquet(data: bytes, what: str, columns: Optional[list[str]]) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexError_(f"part file {what}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None


def parse_part(data: bytes, what: str, ivf: bool) -> PartRows:
    """Part file bytes -> PartRows, or one error line naming the file and the column."""
    table = _read_parquet(data, what, None)
    want = [("id", pa.int64()), ("code", None)] + ([("list", pa.int32())] if ivf else [])
    want += [(f.name, f.type) for f in PART_META_SCHEMA]
    for name, tp in want:
        if name not in table.column_names:
            raise IndexError_(f"part file {what}: missing column '{name}'")
        got = table.schema.field(name).type
        ok = pa.types.is_fixed_size_binary(got) if tp is None else got.equals(tp, check_metadata=False) or (
            pa.types.is_list(tp) and pa.types.is_list(got) and got.value_type == tp.value_type)
        if not ok:
            raise IndexError_(f"part file {what}: column '{name}' is {got}, expected {tp or 'fixed-size binary'}")
    code = table.column("code").combine_chunks()
    code_size = code.type.byte_width
    raw = code.buffers()[1]
    codes = np.frombuffer(raw, np.uint8)[code.offset * code_size:(code.offset + len(code)) * code_size]
    return PartRows(ids=table.column("id").to_numpy(), codes=codes.reshape(len(code), code_size),
                    lists=table.column("list").to_numpy().astype(np.int64) if ivf else None,
                    meta=table.select([f.name for f in PART_META_SCHEMA]))


def parse_part_ids(data: bytes, what: str) -> np.ndarray:
    """Only the id column of a part file (the id check reads nothing else)."""
    table = _read_parquet(data, what, ["id"])
    if table.schema.field("id").type != pa.int64():
        raise IndexError_(f"part file {what}: column 'id' is {table.schema.field('id').type}, expected int64")
    return table.column("id").to_numpy()


# --------------------------------------------------------------------------- read / write


def write_part(vloc: Location, part: str, source: SourceShard, rows: PartRows, source_rows: int, *,
               model_version: str, codebook_checksum: str, index_type: str, coarse_checksum: str) -> PartRecord:
    """Commit one part: its file first, its record last (each atomic); returns the record."""
    ids = rows.ids
    index_file, _ = part_files(part)
    data = part_bytes(rows)
    storage.atomic_write_bytes(vloc.join(index_file), data)
    rec = PartRecord(part=part, source=source, rows=source_rows, indexed=len(ids), dropped=source_rows - len(ids),
                     id_min=int(ids.min()) if len(ids) else 0, id_max=int(ids.max()) if len(ids) else -1,
                     index_file=index_file, index_bytes=len(data), index_sha256=sha256_hex(data),
                     model_version=model_version, codebook_checksum=codebook_checksum, index_type=index_type,
                     coarse_checksum=coarse_checksum, created_at=now_iso())
    write_part_record(vloc, rec)
    return rec


def write_part_record(vloc: Location, record: PartRecord) -> None:
    storage.atomic_write_bytes(vloc.join(part_files(record.part)[1]), record_json(record, SCHEMA_VERSION))


def parse_part_record(data: bytes, where: str) -> PartRecord:
    return parse_json_record(PartRecord, data, where, _err, SCHEMA_VERSION)


def read_part_record(vloc: Location, part: str) -> Optional[PartRecord]:
    """The part's commit record, or None when the part was never committed."""
    loc = vloc.join(part_files(part)[1])
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        return None
    return parse_part_record(data, loc.uri)


class ManifestCache:
    """Parsed manifests by (version folder, file name), LRU-bounded by part entries.

    Manifests are immutable and their names carry their content hash, so a cached entry
    never goes stale; a reader that keeps one cache reads only the manifests it has not seen
    (`reads` counts the manifest files this cache read from storage).
    """

    def __init__(self, max_parts: int = 500_000):
        self.max_parts = max_parts
        self._items: OrderedDict[tuple[str, str], list[PartEntry]] = OrderedDict()
        self._parts = 0
        self._lock = threading.Lock()
        self.reads = 0

    def get(self, key: tuple[str, str]) -> Optional[list[PartEntry]]:
        with self._lock:
            got = self._items.get(key)
            if got is not None:
                self._items.move_to_end(key)
            return got

    def put(self, key: tuple[str, str], entries: list[PartEntry]) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = entries
            self._parts += len(entries)
            while self._parts > self.max_parts and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._parts -= len(old)

    def __contains__(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return key in self._items


# One per process: every reader of an index root (searcher, partitions, ingress) shares it.
MANIFEST_CACHE = ManifestCache()


def manifest_bytes(entries: list[PartEntry]) -> bytes:
    """JSON lines, one part entry each (PartEntry serialised as a record, whatever fields it has)."""
    return b"".join(json.dumps(to_plain(e), separators=(",", ":")).encode() + b"\n" for e in entries)


def write_manifest(vloc: Location, generation: int, seq: int, entries: list[PartEntry]) -> ManifestRef:
    """Write one immutable manifest named by its generation, sequence and content hash."""
    data = manifest_bytes(entries)
    digest = sha256_hex(data)
    rel = f"{MANIFESTS_DIR}/{generation:0{_GEN_WIDTH}d}-{seq:03d}-{digest[:16]}{MANIFEST_SUFFIX}"
    storage.atomic_write_bytes(vloc.join(rel), data)
    return ManifestRef(file=rel, sha256=digest, bytes=len(data), parts=len(entries))


def read_manifest(vloc: Location, ref: ManifestRef, cache: Optional[ManifestCache] = None) -> list[PartEntry]:
    """A manifest's entries (all of them, deleted ones included), from the cache when it holds them."""
    cache = MANIFEST_CACHE if cache is None else cache
    key = (vloc.uri, ref.file)
    got = cache.get(key)
    if got is not None:
        return got
    loc = vloc.join(ref.file)
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        raise IndexError_(f"manifest {loc.uri} is missing (collected while a reader still needed it?); "
                          "reopen CURRENT") from None
    cache.reads += 1
    if sha256_hex(data) != ref.sha256:
        raise IndexError_(f"manifest {loc.uri}: content does not match its sha256 {ref.sha256[:16]}")
    entries = []
    for i, line in enumerate(data.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise IndexError_(f"{loc.uri} line {i + 1}: not valid JSON ({exc})") from None
        entries.append(build_record(PartEntry, obj, lambda m, i=i: IndexError_(f"{loc.uri} line {i + 1}: {m}")))
    if len(entries) != ref.parts:
        raise IndexError_(f"manifest {loc.uri}: {len(entries)} entries, the manifest list says {ref.parts}")
    cache.put(key, entries)
    return entries


def _live_entries(vloc: Location, ref: ManifestRef, cache: Optional[ManifestCache]) -> list[PartEntry]:
    entries = read_manifest(vloc, ref, cache)
    if not ref.deleted:
        return entries
    gone = set(ref.deleted)
    return [e for e in entries if e.part not in gone]


def plan_manifests(vloc: Location, snap: Snapshot, base: Optional[Snapshot], manifest_max_parts: int,
                   merge_min_count: int = 16,
                   cache: Optional[ManifestCache] = None) -> tuple[list[ManifestRef], list[list[PartEntry]]]:
    """(manifests reused from `base`, with their delete lists; groups of entries to write as new manifests).

    Reused: every base manifest that still serves a part (its removed parts on its delete
    list), unless more than half of it is removed (then its live entries are rewritten).
    Small manifests (under half of manifest_max_parts) are merged once there are
    merge_min_count of them (Iceberg's min-count-to-merge), so many small appends do not grow
    the manifest list without bound.
    """
    want = {p.part: p for p in snap.parts}
    kept: list[ManifestRef] = []
    pending: list[PartEntry] = []
    claimed: set[str] = set()
    reuse = base is not None and base.model_version == snap.model_version
    for ref in (base.manifests if reuse else []):
        entries = read_manifest(vloc, ref, cache)
        deleted = set(ref.deleted)
        for e in entries:
            if e.part not in want or e.part in claimed:
                deleted.add(e.part)
        live = [e for e in entries if e.part not in deleted]
        claimed.update(e.part for e in live)
        if not live:
            continue
        if len(deleted) > REWRITE_DELETED_FRACTION * len(entries):
            pending += live
            continue
        kept.append(ManifestRef(ref.file, ref.sha256, ref.bytes, ref.parts, sorted(deleted)))
    small = [r for r in kept if r.live < manifest_max_parts // 2]
    if len(small) >= merge_min_count:
        names = {r.file for r in small}
        for r in small:
            pending += _live_entries(vloc, r, cache)
        kept = [r for r in kept if r.file not in names]
    pending += [p for p in snap.parts if p.part not in claimed]
    groups = [pending[i:i + manifest_max_parts] for i in range(0, len(pending), manifest_max_parts)]
    return kept, groups


def write_snapshot(root: Location, snap: Snapshot, base: Optional[Snapshot] = None, manifest_max_parts: int = 1000,
                   merge_min_count: int = 16) -> Location:
    """Write the manifests `snap` needs beyond `base`'s, then its manifest list, once.

    An existing generation is never rewritten. Sets `snap.manifests`.
    """
    loc = snapshot_loc(root, snap.model_version, snap.generation)
    if storage.exists(loc):
        raise IndexError_(f"{loc.uri} exists; snapshots are immutable (another writer?)")
    vloc = version_loc(root, snap.model_version)
    kept, groups = plan_manifests(vloc, snap, base, max(1, manifest_max_parts), merge_min_count)
    snap.manifests = kept + [write_manifest(vloc, snap.generation, i, g) for i, g in enumerate(groups)]
    storage.atomic_write_bytes(loc, snap.to_json())
    return loc


def _refuse_old_format(what: str, found: str) -> None:
    raise IndexError_(f"{what} was written by an older index format ({found}); {REBUILD_HINT}")


def read_snapshot_list(root: Location, name: str) -> Snapshot:
    """The manifest list of '<version>/<gen>' without its parts (one small read); an older
    format is refused with the rebuild hint."""
    version, gen = parse_snapshot_name(name, root.uri)
    if gen is None:
        _refuse_old_format(f"index root {root.uri}", f"CURRENT names a bare version {version!r}: the "
                                                     "manifest.json layout")
    loc = snapshot_loc(root, version, gen)
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        raise IndexError_(f"index root {root.uri}: snapshot {name} does not exist ({loc.uri})") from None
    _check_schema_version(data, loc.uri)
    snap = parse_json_record(Snapshot, data, loc.uri, _err, MANIFEST_LIST_SCHEMA)
    if (snap.model_version, snap.generation) != (version, gen):
        raise IndexError_(f"{loc.uri} holds snapshot {snap.name}, not {name}")
    return snap


def _check_schema_version(data: bytes, where: str) -> None:
    """Refuse a record of an older schema with the rebuild hint (a newer one is parse_json_record's error)."""
    m = re.match(rb'\s*\{\s*"schema_version"\s*:\s*(\d+)', data)
    if m and int(m.group(1)) < SCHEMA_VERSION:
        _refuse_old_format(where, f"schema {int(m.group(1))}: a FAISS index and an id map per part")


def unseen_manifests(root: Location, snap: Snapshot, cache: Optional[ManifestCache] = None) -> list[ManifestRef]:
    """The manifests of `snap` that `cache` does not hold yet (what a reader must read to open it)."""
    cache = MANIFEST_CACHE if cache is None else cache
    vuri = version_loc(root, snap.model_version).uri
    return [m for m in snap.manifests if (vuri, m.file) not in cache]


def read_snapshot(root: Location, name: str, cache: Optional[ManifestCache] = None) -> Snapshot:
    """The snapshot '<version>/<gen>' with its parts.

    Reads the manifest list, then only the manifests `cache` (default: the process's) has not seen.
    """
    snap = read_snapshot_list(root, name)
    vloc = version_loc(root, snap.model_version)
    parts = [p for m in snap.manifests for p in _live_entries(vloc, m, cache)]
    snap.parts = sorted(parts, key=lambda p: p.source.uri)
    return snap


def list_generations(root: Location, version: str) -> list[int]:
    """Generations with a snapshot file, ascending (one LIST)."""
    out = []
    for info in storage.list_files(version_loc(root, version).join(SNAPSHOTS_DIR), ".json"):
        stem = info.base_name[:-len(".json")]
        if stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def read_current(root: Location) -> Optional[str]:
    """What CURRENT names ('<version>/<gen>'; a bare version in the old layout); None if never published."""
    loc = root.join(CURRENT_NAME)
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        return None
    return parse_current(data, loc.uri)


def parse_current(data: bytes, where: str) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    if not text:
        raise IndexError_(f"{where} is empty; expected <model_version>/<generation>")
    parse_snapshot_name(text, where)
    return text


def current_bytes(name: str) -> bytes:
    return (name + "\n").encode()


def write_current(root: Location, name: str) -> None:
    """Point CURRENT at a snapshot unconditionally (tests and benchmarks; a reindex flips it by
    compare-and-swap, publish.flip_current)."""
    parse_snapshot_name(name, root.uri)
    storage.atomic_write_bytes(root.join(CURRENT_NAME), current_bytes(name))


def open_current(root: Location) -> Snapshot:
    """The snapshot CURRENT names, or one error line saying why there is none."""
    name = read_current(root)
    if name is None:
        raise IndexError_(f"index root {root.uri} has no CURRENT; run a reindex first")
    return read_snapshot(root, name)


def check_codebooks(snap: Snapshot, codebooks: np.ndarray) -> None:
    """Refuse a query encoder whose codebooks are not the ones the index was built with."""
    got = codebook_checksum(codebooks)
    if got != snap.codebook_checksum:
        raise IndexError_(f"codebook checksum mismatch for index {snap.name}: "
                          f"snapshot has {snap.codebook_checksum}, model gives {got}")
