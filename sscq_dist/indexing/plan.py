"""Plan step of a reindex: what changed since the snapshot this model version serves from.

One paged LIST of the source prefix (S3 returns size and ETag per object; local files give
mtime and size), diffed against the version's latest snapshot: new, changed and removed
source shards. No per-shard HEAD or footer read happens here, so "nothing to do" over 100k
shards costs one listing and one snapshot read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from sscq_dist import storage
from sscq_dist.data.dataset_record import SHARD_PREFIX, check_dataset
from sscq_dist.data.schema import no_shards_error
from sscq_dist.errors import IndexError_, SchemaError
from sscq_dist.indexing.formats import (PartEntry, Snapshot, SourceShard, list_generations, read_current,
                                        read_snapshot, snapshot_name, version_loc)
from sscq_dist.storage import Location


def list_source_shards(loc: Location) -> list[SourceShard]:
    """Every `part-*.parquet` directly under the prefix (or the one file named), with size and etag.

    One paged LIST: on S3 the listing carries each object's ETag; locally the etag is
    'mtime:<ns>-size:<bytes>', which changes whenever the file is rewritten. The same listing
    feeds the dataset check (`check_dataset`): a prefix an ingest left unfinished is refused
    and a dataset record is verified against the listed sizes, without another LIST.
    """
    if loc.path.endswith(".parquet"):  # one named shard: one HEAD
        return [stat_source_shard(loc)]
    if loc.is_s3:
        s3 = loc.fs.handler.fs
        try:
            entries = storage.with_retries(lambda: s3.ls(loc.path, detail=True, refresh=True), f"list {loc.uri}",
                                           loc.storage)
        except FileNotFoundError:
            entries = []
        rows = [(e["name"], int(e["size"]), None, str(e.get("ETag", "")).strip('"'))
                for e in entries if e.get("type") == "file"]
    else:
        try:
            with os.scandir(loc.path) as it:
                rows = [(e.path, st.st_size, st.st_mtime_ns, None) for e in it if e.is_file()
                        for st in [e.stat()]]
        except FileNotFoundError:
            rows = []
        except NotADirectoryError:
            raise SchemaError(f"{loc.uri} is a file, not a prefix of part-*.parquet shards") from None
    check_dataset(loc, {path.rsplit("/", 1)[-1]: size for path, size, _, _ in rows})
    return _local_or_s3(rows, loc, loc.uri.rstrip("/"))


def stat_source_shard(loc: Location) -> SourceShard:
    """One shard's size and etag as a listing gives them (one HEAD); the thumbnail check compares
    a part's recorded etag with this. SchemaError when there is no file."""
    if loc.is_s3:
        try:
            e = storage.with_retries(lambda: loc.fs.handler.fs.info(loc.path, refresh=True), f"stat {loc.uri}",
                                     loc.storage)
        except FileNotFoundError:
            raise SchemaError(f"no image shard at {loc.uri}") from None
        row = (loc.path, int(e["size"]), None, str(e.get("ETag", "")).strip('"'))
    else:
        info = storage.with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {loc.uri}", loc.storage)
        if info.size is None:
            raise SchemaError(f"no image shard at {loc.uri}")
        row = (loc.path, info.size, info.mtime_ns, None)
    return _local_or_s3([row], loc, loc.uri.rsplit("/", 1)[0])[0]


def _local_or_s3(rows: list, loc: Location, parent_uri: str) -> list[SourceShard]:
    out = []
    for path, size, mtime_ns, etag in rows:
        base = path.rsplit("/", 1)[-1]
        if not (base.startswith(SHARD_PREFIX) and base.endswith(".parquet")) and not loc.path.endswith(".parquet"):
            continue
        out.append(SourceShard(uri=f"{parent_uri}/{base}", size=int(size),
                               etag=etag or f"mtime:{mtime_ns}-size:{size}"))
    if not out:
        raise no_shards_error(loc)
    return sorted(out, key=lambda s: s.uri)


@dataclass
class Plan:
    """The diff between the listed source shards and the version's latest snapshot.

    base: that snapshot (None for a first build);
    keep: its entries whose source is unchanged; todo: new or changed shards to build;
    removed: its entries whose source is gone or changed.
    """

    root: Location
    version: str
    sources: list[SourceShard]
    current: Optional[str]
    base: Optional[Snapshot]
    keep: list[PartEntry] = field(default_factory=list)
    todo: list[SourceShard] = field(default_factory=list)
    removed: list[PartEntry] = field(default_factory=list)

    @property
    def vloc(self) -> Location:
        return version_loc(self.root, self.version)

    @property
    def unchanged(self) -> bool:
        """The base snapshot already lists exactly the current sources."""
        return self.base is not None and not self.todo and not self.removed

    @property
    def nothing_to_do(self) -> bool:
        return self.unchanged and self.current == self.base.name


def make_plan(images: Location, root: Location, version: str, codebook_checksum: str, index_type: str) -> Plan:
    """List the sources, read CURRENT and the version's latest snapshot, and diff them."""
    sources = list_source_shards(images)
    current = read_current(root)
    gens = list_generations(root, version)
    base = read_snapshot(root, snapshot_name(version, gens[-1])) if gens else None
    if base is not None:
        if base.codebook_checksum != codebook_checksum:
            raise IndexError_(f"index {base.name} at {root.uri} was built with codebooks {base.codebook_checksum}, "
                              f"the model gives {codebook_checksum}; refusing to mix codes of two models")
        if base.index_type != index_type:
            raise IndexError_(f"index {base.name} at {root.uri} is {base.index_type}, config asks {index_type}; "
                              "use a new index root to change the index type")
    plan = Plan(root=root, version=version, sources=sources, current=current, base=base)
    known = {p.source.uri: p for p in base.parts} if base else {}
    listed = {s.uri for s in sources}
    for s in sources:
        old = known.get(s.uri)
        if old is not None and (old.source.etag, old.source.size) == (s.etag, s.size):
            plan.keep.append(old)
        else:
            plan.todo.append(s)
            if old is not None:
                plan.removed.append(old)
    plan.removed += [p for uri, p in known.items() if uri not in listed]
    return plan
