"""The index manifest (SPEC section 3): JSON, the source of truth of an index version.

Layout under an index root:

    <root>/models/<model_version>/manifest.json
    <root>/models/<model_version>/shard-NNNNN.index, idmap-NNNNN.parquet
    <root>/CURRENT              the model_version that serves

Both manifest.json and CURRENT are replaced atomically, so a reader sees the previous or
the new content, never a partial one. JSON only (never pickle): a manifest is data a
reader may not trust to execute.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.indexing.faiss_index import codebook_checksum
from sscq_dist.storage import Location

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT"
MODELS_DIR = "models"
# A version becomes a path component: refuse separators and dot-dot.
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class SourceShard:
    """One source image Parquet shard and the index shard its rows went into."""

    path: str
    size: int
    etag_or_checksum: str
    rows: int
    index_shard: str  # file name of the index shard, e.g. "shard-00000.index"
    id_min: int
    id_max: int


@dataclass
class IndexShard:
    """One FAISS index file under models/<version>/ and its id map."""

    file: str
    rows: int
    bytes: int
    idmap_file: str  # "idmap-NNNNN.parquet": columns id int64, uri string
    idmap_bytes: int


@dataclass
class IndexManifest:
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
    sources: list[SourceShard] = field(default_factory=list)
    index_shards: list[IndexShard] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.index_shards)

    def to_json(self) -> str:
        data = {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}
        return json.dumps(data, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> "IndexManifest":
        """Parse and type-check; a missing or mistyped key raises IndexError_ naming it."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IndexError_(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise IndexError_(f"{source}: expected a JSON object at the top level")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise IndexError_(f"{source}: key 'schema_version' is {version!r}, this reader understands {SCHEMA_VERSION}")
        return _build(cls, data, source, "")


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict:
        return isinstance(value, dict)
    raise AssertionError(f"unhandled manifest field type {tp}")


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise IndexError_(f"{source}: key '{prefix.rstrip('.') or '<root>'}' must be an object")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in data:
            raise IndexError_(f"{source}: missing key '{key}'")
        value, tp = data[f.name], hints[f.name]
        if typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, list):
                raise IndexError_(f"{source}: key '{key}' must be a list, got {type(value).__name__}")
            kwargs[f.name] = [_build(item_tp, v, source, f"{key}[{i}].") for i, v in enumerate(value)]
        elif not _type_ok(value, tp):
            raise IndexError_(f"{source}: key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r:.80}")
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def now_iso() -> str:
    """UTC timestamp for created_at."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version) or ".." in version:
        raise IndexError_(f"model version {version!r} cannot name an index directory "
                          "(letters, digits, '.', '_', '-'; no '/' or '..')")
    return version


def version_loc(root: Location, version: str) -> Location:
    """<root>/models/<version>/"""
    return root.join(MODELS_DIR, check_version(version))


def manifest_loc(root: Location, version: str) -> Location:
    return version_loc(root, version).join(MANIFEST_NAME)


def read_manifest(root: Location, version: str) -> Optional[IndexManifest]:
    """The manifest of one version, or None when it has none yet."""
    loc = manifest_loc(root, version)
    if not storage.exists(loc):
        return None
    return IndexManifest.from_json(storage.read_bytes(loc), source=loc.uri)


def write_manifest(root: Location, manifest: IndexManifest) -> Location:
    """Atomically (re)write <root>/models/<manifest.model_version>/manifest.json."""
    loc = manifest_loc(root, manifest.model_version)
    storage.atomic_write_bytes(loc, manifest.to_json().encode())
    return loc


def read_current(root: Location) -> Optional[str]:
    """The version named by <root>/CURRENT, or None when the root has never served."""
    loc = root.join(CURRENT_NAME)
    if not storage.exists(loc):
        return None
    text = storage.read_bytes(loc).decode("utf-8", errors="replace").strip()
    if not text:
        raise IndexError_(f"{loc.uri} is empty; expected a model version")
    return check_version(text)


def write_current(root: Location, version: str) -> None:
    """Atomically point <root>/CURRENT at version."""
    storage.atomic_write_bytes(root.join(CURRENT_NAME), (check_version(version) + "\n").encode())


def check_codebooks(manifest: IndexManifest, codebooks: np.ndarray) -> None:
    """Refuse codebooks that are not the ones the index was built with."""
    got = codebook_checksum(codebooks)
    if got != manifest.codebook_checksum:
        raise IndexError_(f"codebook checksum mismatch for index version {manifest.model_version}: "
                          f"manifest has {manifest.codebook_checksum}, model gives {got}")
