"""Whole datasets only: the ingest marker and the dataset record of an image-shard prefix.

Ingest writes `_writing.json` under the prefix before its first shard and `_dataset.json`
(every shard's name, rows, bytes and sha256, the totals and the source) after its last,
then removes the marker. Readers call `check_dataset` before using a prefix:

- marker present: an ingest died there (or is still running): refused, naming the fix;
- record present: every shard it lists must exist with the recorded size;
- neither (Parquet written by another tool): accepted, with one warning.

The check costs one LIST and one small read, never a read per shard.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import pyarrow.fs as pafs

from sscq_dist.errors import DatasetError
from sscq_dist.records import parse_json_record
from sscq_dist.storage import Location, list_files, read_bytes, redact_uri

log = logging.getLogger(__name__)

MARKER = "_writing.json"
RECORD = "_dataset.json"
SHARD_PREFIX = "part-"
RECORD_FORMAT = 1
# Prefixes already warned about in this process (one warning per prefix, not per call).
_warned: set[str] = set()


@dataclass
class ShardEntry:
    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class DatasetRecord:
    """What one complete ingest wrote under a prefix."""

    source: str
    shards: list[ShardEntry]
    created: str = ""
    format: int = RECORD_FORMAT
    rows: int = field(init=False)
    bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = sum(s.rows for s in self.shards)
        self.bytes = sum(s.bytes for s in self.shards)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "DatasetRecord":
        """Parse with the package's one typed-record loader (same one-line errors as config and index files)."""
        def error(msg: str) -> DatasetError:
            return DatasetError(f"{msg}; rerun the ingest with --overwrite")

        rec = parse_json_record(cls, data, where, error)
        if rec.format != RECORD_FORMAT:
            raise DatasetError(f"{where}: dataset record format {rec.format}, this version reads {RECORD_FORMAT}")
        return rec


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def marker_bytes(source: str) -> bytes:
    """The marker's content: who is writing, since when (for the refusal message)."""
    return json.dumps({"source": redact_uri(source), "started": _now(), "host": socket.gethostname()}).encode()


def new_record(source: str, shards: Sequence[ShardEntry]) -> DatasetRecord:
    return DatasetRecord(redact_uri(source), list(shards), _now())


def check_dataset(loc: Location, files: Optional[Mapping[str, Optional[int]]] = None) -> Optional[DatasetRecord]:
    """Refuse an image-shard prefix an ingest left unfinished; verify its record when present.

    loc: the prefix (a Location naming one `.parquet` file is not a dataset: returns None).
    files: {base name: size in bytes} of every file directly under the prefix, when the
    caller has listed it already (one non-recursive LIST; `listed_sizes` turns a
    `storage.list_files` result into it), so the check adds no LIST of its own.
    Returns the record, or None for a prefix without one (warned about once per process).
    Raises DatasetError naming the prefix and the fix.
    """
    if loc.path.endswith(".parquet"):
        return None
    files = dict(files) if files is not None else listed_sizes(list_files(loc))
    fix = f"rerun `jobs/ingest.py ... --dest {loc.uri} --overwrite` once no ingest is writing it"
    if MARKER in files:
        started = _marker_field(loc.join(MARKER), "started")
        raise DatasetError(f"{loc.uri} is marked as being written by an ingest{started} ({MARKER}): the ingest "
                           f"died or is still running, so its shards may be incomplete; {fix}")
    shards = sorted(n for n in files if n.startswith(SHARD_PREFIX) and n.endswith(".parquet"))
    if RECORD not in files:
        if shards and loc.uri not in _warned:
            _warned.add(loc.uri)
            log.warning("%s has no dataset record (%s): accepting its %d shard(s) as they are "
                        "(written by another tool?); ingest writes one", loc.uri, RECORD, len(shards))
        return None
    rec = DatasetRecord.from_json(read_bytes(loc.join(RECORD)), loc.join(RECORD).uri)
    for s in rec.shards:
        if s.name not in files:
            raise DatasetError(f"{loc.uri}/{s.name} is listed in the dataset record but missing "
                               f"({len(rec.shards)} shards recorded); {fix}")
        size = files[s.name]
        if size is not None and int(size) != s.bytes:
            raise DatasetError(f"{loc.uri}/{s.name} holds {size} bytes, the dataset record says {s.bytes} "
                               f"(changed after the ingest); {fix}")
    extra = sorted(set(shards) - {s.name for s in rec.shards})
    if extra and loc.uri not in _warned:
        _warned.add(loc.uri)
        log.warning("%s: %d shard(s) not in its dataset record (first: %s), added after the ingest; using them too",
                    loc.uri, len(extra), extra[0])
    return rec


def listed_sizes(infos: Iterable[pafs.FileInfo]) -> dict[str, Optional[int]]:
    """{base name: size} of a listing, the form check_dataset takes."""
    return {i.base_name: i.size for i in infos}


def _marker_field(marker: Location, key: str) -> str:
    """' (started <time>)' from the marker, or '' if it cannot be read (a message detail only)."""
    try:
        return f" (started {json.loads(read_bytes(marker))[key]})"
    except Exception:  # noqa: BLE001 - the refusal stands without the detail
        return ""
