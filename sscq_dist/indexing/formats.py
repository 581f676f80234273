"""On-disk formats of an index root (SPEC section 3), imported by the writer and every reader.

    <root>/CURRENT                                   "<model_version>/<generation>" that serves
    <root>/lock                                      the writer's lease (indexing/lock.py)
    <root>/models/<version>/ivf-trained.index        shared coarse quantizer (IVF only)
    <root>/models/<version>/parts/<part>.index       one FAISS part per source shard
    <root>/models/<version>/parts/<part>.ids.parquet its id map: id, uri, shard, row
    <root>/models/<version>/parts/<part>.json        the part's commit record (written last)
    <root>/models/<version>/manifests/<gen>-<i>-<sha>.jsonl  immutable manifest: up to
                                                     index.manifest_max_parts part entries
    <root>/models/<version>/snapshots/<gen>.json     immutable manifest list: the manifests
                                                     (and per manifest, its removed parts) that serve
    <root>/leases/<replica>.json                     a serving replica's reader lease (indexing/leases.py)

Commit protocol (Apache Iceberg's): part files first, the record last (each atomic), so a
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
import io
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

SCHEMA_VERSION = 2  # part records (and snapshots that listed every part inline, still read)
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
IVF_TRAINED_FILE = "ivf-trained.index"
INDEX_SUFFIX = ".index"
IDS_SUFFIX = ".ids.parquet"
RECORD_SUFFIX = ".json"
# Served-index quality report of a version (indexing/metrics.py), kept while the version serves.
METRICS_FILE = "index_metrics.json"
# The layout before snapshots: one manifest.json rewritten per shard (read for serving and migration).
LEGACY_MANIFEST = "manifest.json"

# A version becomes a path component: refuse separators and dot-dot.
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_GEN_WIDTH = 8
IDMAP_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("shard", pa.string()),  # the source shard's uri (dictionary-encoded: one value per part)
    pa.field("row", pa.int64()),  # row number inside that shard (thumbnails read it back)
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
    index_file / ids_file: paths relative to the version folder.
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
    ids_file: str
    ids_bytes: int


@dataclass
class PartRecord(PartEntry):
    """The commit record `parts/<part>.json`: the entry plus what it was built with and checksums."""

    index_sha256: str = ""
    ids_sha256: str = ""
    model_version: str = ""
    codebook_checksum: str = ""
    index_type: str = ""
    coarse_checksum: str = ""  # sha256 of ivf-trained.index ("" for exhaustive parts)
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
    coarse_checksum: str
    created_at: str
    previous: Optional[str]  # what CURRENT named when this one was published
    writer: str
    fence: int  # the writer's lock fencing token
    parts: list[PartEntry] = field(default_factory=list)
    legacy: bool = False  # adapted from a pre-snapshot manifest.json (read only)
    manifests: list[ManifestRef] = field(default_factory=list)
    skipped: list[SkippedShard] = field(default_factory=list)

    @property
    def name(self) -> str:
        """What CURRENT holds for this snapshot (a bare version for the legacy layout)."""
        return self.model_version if self.legacy else snapshot_name(self.model_version, self.generation)

    @property
    def total_rows(self) -> int:
        return sum(p.indexed for p in self.parts)

    @property
    def index_bytes(self) -> int:
        return sum(p.index_bytes for p in self.parts)

    @property
    def ids_bytes(self) -> int:
        return sum(p.ids_bytes for p in self.parts)

    def to_json(self) -> bytes:
        """The manifest list: every field but the parts (those are in the manifests)."""
        data = to_plain(self)
        data.pop("parts", None)
        data.pop("legacy", None)
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
    """'<version>/<gen>' -> (version, gen); a bare '<version>' (legacy layout) -> (version, None)."""
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
    return (entry.index_file, entry.ids_file, part_files(entry.part)[-1])


def version_loc(root: Location, version: str) -> Location:
    return root.join(MODELS_DIR, check_version(version))


def part_files(part: str) -> tuple[str, str, str]:
    """(index, id map, record) paths of a part, relative to its version folder."""
    base = f"{PARTS_DIR}/{part}"
    return base + INDEX_SUFFIX, base + IDS_SUFFIX, base + RECORD_SUFFIX


def snapshot_loc(root: Location, version: str, generation: int) -> Location:
    return version_loc(root, version).join(SNAPSHOTS_DIR, f"{generation:0{_GEN_WIDTH}d}.json")


def manifests_loc(root: Location, version: str) -> Location:
    return version_loc(root, version).join(MANIFESTS_DIR)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- id maps


def idmap_bytes(ids: np.ndarray, uris: list[Optional[str]] | pa.Array, shard: str, rows: np.ndarray) -> bytes:
    """Parquet id map (id, uri, shard, row) for one part."""
    n = len(ids)
    table = pa.table({
        "id": pa.array(np.asarray(ids, dtype=np.int64), pa.int64()),
        "uri": pa.array(uris, pa.string()),
        "shard": pa.array([shard] * n, pa.string()),
        "row": pa.array(np.asarray(rows, dtype=np.int64), pa.int64()),
    }, schema=IDMAP_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, use_dictionary=["shard", "uri"])
    return buf.getvalue()


def parse_idmap(data: bytes, what: str, columns: Optional[list[str]] = None) -> pa.Table:
    """Id map bytes -> table with columns id, uri, shard, row (shard/row null for legacy maps)."""
    try:
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexError_(f"id map {what}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
    for f in IDMAP_SCHEMA:
        if columns is not None and f.name not in columns:
            continue
        if f.name not in table.column_names:
            if f.name in ("shard", "row"):  # written before id maps carried them
                table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
                continue
            raise IndexError_(f"id map {what}: missing column '{f.name}'")
        if table.schema.field(f.name).type != f.type:
            raise IndexError_(f"id map {what}: column '{f.name}' is {table.schema.field(f.name).type}, expected {f.type}")
    return table


# --------------------------------------------------------------------------- read / write


def write_part_record(vloc: Location, record: PartRecord) -> None:
    storage.atomic_write_bytes(vloc.join(part_files(record.part)[2]), record_json(record, SCHEMA_VERSION, indent=1))


def parse_part_record(data: bytes, where: str) -> PartRecord:
    return parse_json_record(PartRecord, data, where, _err, SCHEMA_VERSION)


def read_part_record(vloc: Location, part: str) -> Optional[PartRecord]:
    """The part's commit record, or None when the part was never committed."""
    loc = vloc.join(part_files(part)[2])
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
    reuse = base is not None and not base.legacy and base.model_version == snap.model_version
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


def read_snapshot_list(root: Location, name: str) -> Snapshot:
    """The manifest list of '<version>/<gen>' without its parts (one small read)."""
    version, gen = parse_snapshot_name(name, root.uri)
    if gen is None:
        return read_legacy_manifest(root, version)
    loc = snapshot_loc(root, version, gen)
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        raise IndexError_(f"index root {root.uri}: snapshot {name} does not exist ({loc.uri})") from None
    try:
        schema = json.loads(data).get("schema_version")
    except (ValueError, AttributeError):
        schema = None
    # Generations written before manifest lists carry their parts inline (schema 2): still read.
    snap = parse_json_record(Snapshot, data, loc.uri, _err, SCHEMA_VERSION if schema == SCHEMA_VERSION
                             else MANIFEST_LIST_SCHEMA)
    if (snap.model_version, snap.generation) != (version, gen):
        raise IndexError_(f"{loc.uri} holds snapshot {snap.name}, not {name}")
    return snap


def unseen_manifests(root: Location, snap: Snapshot, cache: Optional[ManifestCache] = None) -> list[ManifestRef]:
    """The manifests of `snap` that `cache` does not hold yet (what a reader must read to open it)."""
    cache = MANIFEST_CACHE if cache is None else cache
    vuri = version_loc(root, snap.model_version).uri
    return [m for m in snap.manifests if (vuri, m.file) not in cache]


def read_snapshot(root: Location, name: str, cache: Optional[ManifestCache] = None) -> Snapshot:
    """The snapshot '<version>/<gen>' with its parts (or, for a bare legacy version, its manifest adapted).

    Reads the manifest list, then only the manifests `cache` (default: the process's) has not seen.
    """
    snap = read_snapshot_list(root, name)
    if snap.manifests:
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
    """What CURRENT names ('<version>/<gen>', or a bare version in the legacy layout); None if never published."""
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


# --------------------------------------------------------------------------- legacy layout


@dataclass
class _LegacySource:
    path: str
    size: int
    etag_or_checksum: str
    rows: int
    index_shard: str
    id_min: int
    id_max: int


@dataclass
class _LegacyShard:
    file: str
    rows: int
    bytes: int
    idmap_file: str
    idmap_bytes: int


@dataclass
class _LegacyManifest:
    model_uri: str
    model_version: str
    codebook_checksum: str
    bits: int
    M: int
    K: int
    index_type: str
    index_params: dict
    created_at: str
    complete: bool
    sources: list[_LegacySource]
    index_shards: list[_LegacyShard]


def read_legacy_manifest(root: Location, version: str) -> Snapshot:
    """A root written before snapshots (CURRENT = bare version, models/<v>/manifest.json),
    adapted to a read-only Snapshot (generation 0) whose parts point at the old files."""
    loc = version_loc(root, version).join(LEGACY_MANIFEST)
    try:
        data = storage.read_bytes(loc)
    except storage.NotFound:
        raise IndexError_(f"index root {root.uri}: CURRENT names {version}, which has no snapshot or "
                          f"{LEGACY_MANIFEST}") from None
    m = parse_json_record(_LegacyManifest, data, loc.uri, _err, 1)
    if not m.complete:
        raise IndexError_(f"{loc.uri}: version {version} is incomplete (manifest complete=false)")
    shards = {s.file: s for s in m.index_shards}
    parts = []
    for s in m.sources:
        sh = shards.get(s.index_shard)
        if sh is None:
            raise IndexError_(f"{loc.uri}: source {s.path} names index shard {s.index_shard}, which is not listed")
        parts.append(PartEntry(part=sh.file.rsplit(".", 1)[0], source=SourceShard(s.path, s.size, s.etag_or_checksum),
                               rows=s.rows, indexed=sh.rows, dropped=s.rows - sh.rows, id_min=s.id_min,
                               id_max=s.id_max, index_file=sh.file, index_bytes=sh.bytes,
                               ids_file=sh.idmap_file, ids_bytes=sh.idmap_bytes))
    return Snapshot(generation=0, model_uri=m.model_uri, model_version=m.model_version,
                    codebook_checksum=m.codebook_checksum, bits=m.bits, M=m.M, K=m.K, index_type=m.index_type,
                    index_params=m.index_params, coarse_checksum="", created_at=m.created_at, previous=None,
                    writer="", fence=0, parts=parts, legacy=True)
