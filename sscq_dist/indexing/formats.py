"""On-disk formats of an index root (SPEC section 3), imported by the writer and every reader.

    <root>/CURRENT                                   "<model_version>/<generation>" that serves
    <root>/lock                                      the writer's lease (indexing/lock.py)
    <root>/models/<version>/trained.index            the version's ONE trained empty FAISS index:
                                                     PQ codebooks (+ the IVF coarse quantizer)
    <root>/models/<version>/parts/<part>.parquet     one lean part per source shard: per row id,
                                                     code, (IVF) list, label, uri, row group, row
    <root>/models/<version>/parts/<part>.json        the part's commit record (written last)
    <root>/models/<version>/snapshots/<gen>.json     immutable snapshot: the parts that serve

A part holds codes, ids and row metadata only, never a codebook or a quantizer (FAISS's
`contrib/ondisk.py` idea: one trained index, parts contribute their lists), so its fixed
cost is its Parquet footer and its record whatever nlist is. Results are answered from the
parts: label and uri per row, and the thumbnail reference (source shard uri + etag in the
record, row group + row per row), so search never reads the source bucket.

Commit protocol (Iceberg-like): the part file first, the record last (each atomic), so a
record exists only for a whole part; a snapshot lists records' contents and is written
once; CURRENT is one atomic pointer swap. A part's name derives from its source shard's
uri + etag, so a retried or rerun build of the same shard overwrites the same names.

JSON only (never pickle): these files are data a reader must not trust to execute.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.faiss_index import codebook_checksum
from sscq_dist.records import parse_json_record, record_json
from sscq_dist.storage import Location

# 3: lean parts (one Parquet file of codes + row metadata against the version's trained.index).
# 2 (per-part FAISS index + id map) and the pre-snapshot manifest.json layout are refused.
SCHEMA_VERSION = 3
CURRENT_NAME = "CURRENT"
MODELS_DIR = "models"
PARTS_DIR = "parts"
SNAPSHOTS_DIR = "snapshots"
TRAINED_FILE = "trained.index"
PART_SUFFIX = ".parquet"
RECORD_SUFFIX = ".json"
# Served-index quality report of a version (indexing/metrics.py), kept while the version serves.
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
class Snapshot:
    """An immutable list of the parts that serve, plus what a reader needs to trust them."""

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
        return record_json(self, SCHEMA_VERSION)


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


def version_loc(root: Location, version: str) -> Location:
    return root.join(MODELS_DIR, check_version(version))


def part_files(part: str) -> tuple[str, str]:
    """(part file, record) paths of a part, relative to its version folder."""
    base = f"{PARTS_DIR}/{part}"
    return base + PART_SUFFIX, base + RECORD_SUFFIX


def snapshot_loc(root: Location, version: str, generation: int) -> Location:
    return version_loc(root, version).join(SNAPSHOTS_DIR, f"{generation:0{_GEN_WIDTH}d}.json")


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


def write_snapshot(root: Location, snap: Snapshot) -> Location:
    """Write snapshots/<gen>.json once; an existing generation is never rewritten."""
    loc = snapshot_loc(root, snap.model_version, snap.generation)
    if storage.exists(loc):
        raise IndexError_(f"{loc.uri} exists; snapshots are immutable (another writer?)")
    storage.atomic_write_bytes(loc, snap.to_json())
    return loc


def _refuse_old_format(what: str, found: str) -> None:
    raise IndexError_(f"{what} was written by an older index format ({found}); {REBUILD_HINT}")


def read_snapshot(root: Location, name: str) -> Snapshot:
    """The snapshot '<version>/<gen>'; a root of an older format is refused with the rebuild hint."""
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
    snap = parse_json_record(Snapshot, data, loc.uri, _err, SCHEMA_VERSION)
    if (snap.model_version, snap.generation) != (version, gen):
        raise IndexError_(f"{loc.uri} holds snapshot {snap.name}, not {name}")
    return snap


def _check_schema_version(data: bytes, where: str) -> None:
    """Refuse a record of an older schema with the rebuild hint (a newer one is parse_json_record's error)."""
    m = re.match(rb'\s*\{\s*"schema_version"\s*:\s*(\d+)', data)
    if m and int(m.group(1)) < SCHEMA_VERSION:
        _refuse_old_format(where, f"schema {int(m.group(1))}: a FAISS index and an id map per part")


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
        text = storage.read_bytes(loc).decode("utf-8", errors="replace").strip()
    except storage.NotFound:
        return None
    if not text:
        raise IndexError_(f"{loc.uri} is empty; expected <model_version>/<generation>")
    parse_snapshot_name(text, loc.uri)
    return text


def write_current(root: Location, name: str) -> None:
    """Atomically point CURRENT at a snapshot (the publish step's last write)."""
    parse_snapshot_name(name, root.uri)
    storage.atomic_write_bytes(root.join(CURRENT_NAME), (name + "\n").encode())


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
