"""Publish step of a reindex: write the snapshot once, flip CURRENT, collect garbage.

A snapshot generation is written once and never rewritten; CURRENT is one atomic pointer
swap to '<version>/<generation>'. Readers that opened an older generation keep reading its
files: garbage collection deletes a file only when no retained snapshot names it and it is
older than the grace period, and it always keeps what the current and previous snapshots
name (a rollback target and the readers still on it).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

import pyarrow.fs as pafs

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.failpoints import failpoint
from sscq_dist.indexing.formats import (CURRENT_NAME, METRICS_FILE, MODELS_DIR, PARTS_DIR, RECORD_SUFFIX,
                                        TRAINED_FILE, SNAPSHOTS_DIR, PartEntry, Snapshot, list_generations,
                                        now_iso, parse_snapshot_name, part_files, read_current, read_snapshot,
                                        write_current, write_snapshot)
from sscq_dist.storage import Location

log = logging.getLogger(__name__)


def next_generation(root: Location, version: str) -> int:
    gens = list_generations(root, version)
    return gens[-1] + 1 if gens else 1


def _check_fence(root: Location, current: Optional[str], lock) -> None:
    """Refuse to publish over a snapshot whose writer held a later lease than ours."""
    if current is None or parse_snapshot_name(current, root.uri)[1] is None:
        return
    served = read_snapshot(root, current)
    if served.fence > lock.fence:
        raise IndexError_(f"lost the index lock to {served.writer or 'a later writer'} (it published {current} "
                          f"under fence {served.fence} > ours {lock.fence}); stopped without publishing")


def flip_current(root: Location, name: str, expected: Optional[str], lock) -> None:
    """CURRENT -> name, if CURRENT still names `expected` and the lease is still ours."""
    lock.ensure_held()
    now = read_current(root)
    if now != expected:
        raise IndexError_(f"{root.join(CURRENT_NAME).uri} changed to {now} during this reindex (expected "
                          f"{expected}); stopped without flipping it")
    write_current(root, name)


def publish_snapshot(root: Location, snap: Snapshot, expected_current: Optional[str], lock) -> Snapshot:
    """Write `snap` (generation already set) and flip CURRENT to it."""
    _check_fence(root, expected_current, lock)
    lock.ensure_held()
    write_snapshot(root, snap)
    failpoint("reindex.before_current")
    flip_current(root, snap.name, expected_current, lock)
    return snap


# --------------------------------------------------------------------------- garbage collection


@dataclass
class GcSummary:
    retained: list[str] = field(default_factory=list)  # snapshot names kept
    deleted_snapshots: int = 0
    deleted_files: int = 0
    deleted_bytes: int = 0


def _ts(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def _mtime(info: pafs.FileInfo) -> float:
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def _files(loc: Location) -> list[pafs.FileInfo]:
    """Every file directly under loc, temporary ones included (GC must see them)."""
    sel = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
    infos = storage.with_retries(lambda: loc.fs.get_file_info(sel), f"list {loc.uri}", loc.storage)
    return [i for i in infos if i.type == pafs.FileType.File]


def _dirs(loc: Location) -> list[str]:
    sel = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
    infos = storage.with_retries(lambda: loc.fs.get_file_info(sel), f"list {loc.uri}", loc.storage)
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _retained_chain(root: Location, grace_s: float, now: float) -> dict[str, Snapshot]:
    """CURRENT, the snapshot before it, and every earlier one retired less than grace_s ago.

    A snapshot is retired when its successor is published (the successor's created_at);
    retirement times only decrease along the chain, so the walk stops at the first one
    beyond the grace period.
    """
    out: dict[str, Snapshot] = {}
    name, retired_at, depth = read_current(root), math.inf, 0
    while name and name not in out:
        if depth >= 2 and retired_at < now - grace_s:
            break
        try:
            snap = read_snapshot(root, name)
        except IndexError_ as exc:  # an already collected ancestor ends the chain
            log.debug("snapshot chain ends at %s: %s", name, exc)
            break
        out[name] = snap
        retired_at, name, depth = _ts(snap.created_at), snap.previous, depth + 1
    return out


def _protected(snaps: list[Snapshot]) -> set[str]:
    """Paths (relative to the version folder) that the given snapshots of one version need."""
    keep: set[str] = {TRAINED_FILE, METRICS_FILE} if snaps else set()
    for s in snaps:
        for p in s.parts:
            keep.update(part_files(p.part))
    return keep


def collect_garbage(root: Location, grace_s: float, lock, now: Optional[float] = None) -> GcSummary:
    """Delete snapshots and part files no retained snapshot names, once older than grace_s.

    Retained: the CURRENT chain as in `_retained_chain`, plus any snapshot written less than
    grace_s ago. Commit records go before the files they describe, so a crash mid-way
    leaves files without a record (rebuilt or collected later), never a record without files.
    """
    now = time.time() if now is None else now
    cutoff = now - grace_s
    summary = GcSummary()
    retained = _retained_chain(root, grace_s, now)
    models = root.join(MODELS_DIR)
    for version in _dirs(models):
        vloc = models.join(version)
        snaps_dir = vloc.join(SNAPSHOTS_DIR)
        doomed_snaps = []
        for info in _files(snaps_dir):
            stem = info.base_name[:-5] if info.base_name.endswith(".json") else ""
            name = f"{version}/{stem}" if stem.isdigit() else None
            if name and name in retained:
                continue
            if _mtime(info) >= cutoff:
                if name:  # a recent snapshot that never served (a run killed before its flip)
                    retained[name] = read_snapshot(root, name)
                continue
            doomed_snaps.append(info)
        mine = [s for n, s in retained.items() if parse_snapshot_name(n, root.uri)[0] == version]
        keep = _protected(mine)
        lock.raise_if_lost()
        for info in doomed_snaps:
            _delete(snaps_dir.join(info.base_name), info, summary)
            summary.deleted_snapshots += 1
        parts = vloc.join(PARTS_DIR)
        candidates = [(parts, f"{PARTS_DIR}/{i.base_name}", i) for i in _files(parts)]
        candidates += [(vloc, i.base_name, i) for i in _files(vloc)]
        doomed = [(d, rel, i) for d, rel, i in candidates if rel not in keep and _mtime(i) < cutoff]
        doomed.sort(key=lambda x: not x[1].endswith(RECORD_SUFFIX))  # records first
        for d, rel, info in doomed:
            lock.raise_if_lost()
            _delete(d.join(info.base_name), info, summary)
    summary.retained = sorted(retained)
    return summary


def _delete(loc: Location, info: pafs.FileInfo, summary: GcSummary) -> None:
    def rm():
        try:
            loc.fs.delete_file(loc.path)
        except FileNotFoundError:
            pass
    storage.with_retries(rm, f"delete {loc.uri}", loc.storage)
    summary.deleted_files += 1
    summary.deleted_bytes += int(info.size or 0)


def new_snapshot(generation: int, parts: list[PartEntry], *, model_uri: str, version: str, codebook_checksum: str,
                 bits: int, M: int, K: int, index_type: str, index_params: dict, coarse_checksum: str,
                 previous: Optional[str], lock) -> Snapshot:
    """The snapshot object for a publish (parts sorted by source uri, so equal inputs give equal files)."""
    return Snapshot(generation=generation, model_uri=model_uri, model_version=version,
                    codebook_checksum=codebook_checksum, bits=bits, M=M, K=K, index_type=index_type,
                    index_params=index_params, coarse_checksum=coarse_checksum, created_at=now_iso(),
                    previous=previous, writer=lock.owner, fence=lock.fence,
                    parts=sorted(parts, key=lambda p: p.source.uri))
