"""Publish step of a reindex: write the manifest list once, flip CURRENT, and garbage collection.

A snapshot generation is written once and never rewritten (its new manifests, then its
manifest list); CURRENT is a compare-and-swap to '<version>/<generation>' (a conditional PUT
on S3, a guarded rename locally: indexing/conditional.py), so of two writers racing a flip
exactly one wins and the other stops naming the conflict. Readers that opened an older
generation keep reading its files: garbage collection deletes a file only when no retained
or leased snapshot names it and it is older than the grace period, and it always keeps the
newest `keep_generations` of the CURRENT chain (a rollback target and the readers still on it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

import pyarrow.fs as pafs

from sscq_dist import storage
from sscq_dist.errors import IndexError_, StorageError
from sscq_dist.failpoints import failpoint
from sscq_dist.indexing.conditional import Conflict, put_if, read_versioned
from sscq_dist.indexing.formats import (CURRENT_NAME, MANIFESTS_DIR, METRICS_FILE, MODELS_DIR, PARTS_DIR,
                                        RECORD_SUFFIX, SNAPSHOTS_DIR, TRAINED_FILE, ManifestCache, ManifestRef,
                                        PartEntry, SkippedShard, Snapshot, current_bytes, entry_files, list_generations,
                                        now_iso, parse_current, parse_snapshot_name, read_current, read_manifest,
                                        read_snapshot, read_snapshot_list, version_loc, write_snapshot)
from sscq_dist.indexing.leases import leased_snapshots, read_leases
from sscq_dist.storage import Location

log = logging.getLogger(__name__)


def next_generation(root: Location, version: str) -> int:
    gens = list_generations(root, version)
    return gens[-1] + 1 if gens else 1


def _check_fence(root: Location, current: Optional[str], lock) -> None:
    """Refuse a writer that lost its lease; lift our fence above the served snapshot's if the
    root's counter restarted (a recreated lock object, or fences of the clock-valued design)."""
    lock.ensure_held()
    if current is None or parse_snapshot_name(current, root.uri)[1] is None:
        return
    served = read_snapshot(root, current)
    if served.fence >= lock.fence:
        log.info("fence of %s is %d >= ours %d; advancing the lock's counter", current, served.fence, lock.fence)
        lock.advance_fence(served.fence)


def flip_current(root: Location, name: str, expected: Optional[str], lock) -> None:
    """CURRENT -> name by compare-and-swap: only if CURRENT still is what this writer read (`expected`)
    and the lease (with its fence) is still ours. A lost race stops the job naming the winner."""
    lock.ensure_held()
    loc = root.join(CURRENT_NAME)
    seen = read_versioned(loc)
    now = parse_current(seen.data, loc.uri) if seen is not None else None
    if now != expected:
        raise IndexError_(f"{loc.uri} changed to {now} during this reindex (expected {expected}): another writer "
                          "committed first; stopped without flipping it")
    failpoint("publish.before_current_cas")
    try:
        put_if(loc, current_bytes(name), seen.tag if seen is not None else None)
    except Conflict as exc:
        raise IndexError_(f"lost the race to flip {loc.uri} to {name}: another writer committed first "
                          f"({exc}); stopped without flipping it") from None


def publish_snapshot(root: Location, snap: Snapshot, expected_current: Optional[str], lock,
                     base: Optional[Snapshot] = None, manifest_max_parts: int = 1000) -> Snapshot:
    """Write `snap` (generation already set) as a manifest list over `base`'s manifests, then flip CURRENT."""
    _check_fence(root, expected_current, lock)
    snap.fence = lock.fence
    lock.ensure_held()
    write_snapshot(root, snap, base=base, manifest_max_parts=manifest_max_parts)
    failpoint("reindex.before_current")
    flip_current(root, snap.name, expected_current, lock)
    return snap


# --------------------------------------------------------------------------- garbage collection
#
# Iceberg's expire_snapshots: its own step (`sscq gc`, and after a reindex unless --no-gc),
# batched deletes, retention by generations and age, and reader leases.


@dataclass
class GcPolicy:
    """keep_generations: newest generations of the CURRENT chain always kept (>= 1);
    grace_s: older ones, and unreferenced files, are kept until retired/written this long ago;
    delete_batch: keys per delete request (S3 DeleteObjects takes at most 1,000)."""

    keep_generations: int = 2
    grace_s: float = 86400.0
    delete_batch: int = 1000


@dataclass
class GcSummary:
    retained: list[str] = field(default_factory=list)  # snapshot names kept
    leased: dict = field(default_factory=dict)  # snapshot name -> a replica leasing it
    deleted_snapshots: int = 0
    deleted_manifests: int = 0
    deleted_files: int = 0  # every object deleted, snapshots and manifests included
    deleted_bytes: int = 0
    delete_requests: int = 0
    manifests_read: int = 0
    expired_leases: int = 0

    def line(self) -> str:
        return (f"gc: kept {len(self.retained)} snapshots ({len(self.leased)} leased by readers); deleted "
                f"{self.deleted_snapshots} snapshots, {self.deleted_manifests} manifests, {self.deleted_files} files "
                f"({self.deleted_bytes / 1e6:.1f} MB) in {self.delete_requests} requests")


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


def _retained_chain(root: Location, policy: GcPolicy, now: float) -> dict[str, Snapshot]:
    """Manifest lists of CURRENT and its predecessors: the newest keep_generations always, older
    ones while retired (their successor's created_at) less than grace_s ago. Retirement times
    only decrease along the chain, so the walk stops at the first one beyond both limits."""
    out: dict[str, Snapshot] = {}
    name, retired_at, depth = read_current(root), math.inf, 0
    while name and name not in out:
        if depth >= max(1, policy.keep_generations) and retired_at < now - policy.grace_s:
            break
        try:
            snap = read_snapshot_list(root, name)
        except IndexError_ as exc:  # an already collected ancestor ends the chain
            log.debug("snapshot chain ends at %s: %s", name, exc)
            break
        out[name] = snap
        retired_at, name, depth = _ts(snap.created_at), snap.previous, depth + 1
    return out


def _protected(root: Location, version: str, snaps: list[Snapshot], summary: GcSummary) -> set[str]:
    """Paths (relative to the version folder) that the retained snapshots of one version need.

    Each manifest is read once, however many retained generations name it; a part counts as
    removed only if every retained snapshot naming its manifest has it on its delete list.
    """
    keep: set[str] = {TRAINED_FILE, METRICS_FILE} if snaps else set()
    refs: dict[str, ManifestRef] = {}
    gone: dict[str, set[str]] = {}
    for s in snaps:
        for m in s.manifests:
            refs.setdefault(m.file, m)
            gone[m.file] = set(m.deleted) if m.file not in gone else gone[m.file] & set(m.deleted)
    vloc = version_loc(root, version)
    cache = ManifestCache()
    for file, ref in refs.items():
        keep.add(file)
        for p in read_manifest(vloc, ref, cache):
            if p.part not in gone[file]:
                keep.update(entry_files(p))
    summary.manifests_read += cache.reads
    return keep


def collect_garbage(root: Location, policy: GcPolicy, lock=None, now: Optional[float] = None) -> GcSummary:
    """Delete snapshots, manifests and part files no retained or leased snapshot names, once older than grace_s.

    Retained: the CURRENT chain (`_retained_chain`), every snapshot an unexpired reader lease
    names, and any snapshot written less than grace_s ago (a run killed before its flip).
    Deletes go in batches, manifest lists first, then manifests, then part records, then
    the files they describe, so a crash mid-way never leaves a reader a list without its files.
    lock: an IndexLock held for this collection (checked between batches), or None.
    """
    now = time.time() if now is None else now
    cutoff = now - policy.grace_s
    summary = GcSummary()
    leases = read_leases(root)
    summary.leased = leased_snapshots(leases, now)
    retained = _retained_chain(root, policy, now)
    for name in summary.leased:
        if name not in retained:
            try:
                retained[name] = read_snapshot_list(root, name)
            except IndexError_ as exc:
                log.warning("reader lease names %s, which cannot be read: %s", name, exc)
    models = root.join(MODELS_DIR)
    doomed: list[tuple[int, Location, pafs.FileInfo]] = []  # (order, location, info)
    for version in _dirs(models):
        vloc = models.join(version)
        snaps_dir = vloc.join(SNAPSHOTS_DIR)
        for info in _files(snaps_dir):
            stem = info.base_name[:-5] if info.base_name.endswith(".json") else ""
            name = f"{version}/{stem}" if stem.isdigit() else None
            if name and name in retained:
                continue
            if _mtime(info) >= cutoff:
                if name:  # a recent snapshot that never served (a run killed before its flip)
                    retained[name] = read_snapshot_list(root, name)
                continue
            doomed.append((0, snaps_dir.join(info.base_name), info))
        mine = [s for n, s in retained.items() if parse_snapshot_name(n, root.uri)[0] == version]
        keep = _protected(root, version, mine, summary)
        for order, sub in ((1, MANIFESTS_DIR), (None, PARTS_DIR), (3, None)):
            d = vloc.join(sub) if sub else vloc
            for info in _files(d):
                rel = f"{sub}/{info.base_name}" if sub else info.base_name
                if rel in keep or _mtime(info) >= cutoff:
                    continue
                o = order if order is not None else (2 if rel.endswith(RECORD_SUFFIX) else 3)
                doomed.append((o, d.join(info.base_name), info))
    for loc, rec in leases:
        if rec.expires_at < cutoff:
            doomed.append((4, loc, pafs.FileInfo(loc.path, pafs.FileType.File, size=0)))
            summary.expired_leases += 1
    doomed.sort(key=lambda x: x[0])
    summary.deleted_snapshots = sum(1 for o, _, _ in doomed if o == 0)
    summary.deleted_manifests = sum(1 for o, _, _ in doomed if o == 1)
    for order in sorted({o for o, _, _ in doomed}):
        batch = [(loc, info) for o, loc, info in doomed if o == order]
        for i in range(0, len(batch), max(1, policy.delete_batch)):
            if lock is not None:
                lock.raise_if_lost()
            _delete_batch(batch[i:i + policy.delete_batch], summary)
    summary.retained = sorted(retained)
    return summary


def _delete_batch(batch: list[tuple[Location, pafs.FileInfo]], summary: GcSummary) -> None:
    """One S3 DeleteObjects request per bucket (at most 1,000 keys), or plain local deletes."""
    if not batch:
        return
    first = batch[0][0]
    if first.is_s3:
        s3 = first.fs.handler.fs
        bucket = first.path.partition("/")[0]
        keys = [{"Key": loc.path.partition("/")[2]} for loc, _ in batch]
        resp = storage.with_retries(lambda: s3.call_s3("delete_objects", Bucket=bucket,
                                                       Delete={"Objects": keys, "Quiet": True}),
                                    f"delete {len(keys)} objects under s3://{bucket}", first.storage)
        errors = resp.get("Errors") or []
        if errors:
            e = errors[0]
            raise StorageError(f"delete s3://{bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message', '')} "
                               f"({len(errors)} of {len(keys)} keys not deleted)")
        summary.delete_requests += 1
    else:
        for loc, _ in batch:
            try:
                os.remove(loc.path)
            except FileNotFoundError:
                pass
        summary.delete_requests += len(batch)
    summary.deleted_files += len(batch)
    summary.deleted_bytes += sum(int(info.size or 0) for _, info in batch)


def run_gc(root: Location, policy: GcPolicy, owner: str, lock_ttl_s: float) -> GcSummary:
    """`sscq gc`: collect garbage under the root's writer lock (a reindex and a GC never overlap)."""
    from sscq_dist.indexing.lock import IndexLock

    with IndexLock(root, owner, lock_ttl_s) as lock:
        return collect_garbage(root, policy, lock)


def new_snapshot(generation: int, parts: list[PartEntry], *, model_uri: str, version: str, codebook_checksum: str,
                 bits: int, M: int, K: int, index_type: str, index_params: dict, coarse_checksum: str,
                 previous: Optional[str], lock, skipped: Optional[list[SkippedShard]] = None) -> Snapshot:
    """The snapshot object for a publish (parts sorted by source uri, so equal inputs give equal files)."""
    return Snapshot(generation=generation, model_uri=model_uri, model_version=version,
                    codebook_checksum=codebook_checksum, bits=bits, M=M, K=K, index_type=index_type,
                    index_params=index_params, coarse_checksum=coarse_checksum, created_at=now_iso(),
                    previous=previous, writer=lock.owner, fence=lock.fence,
                    parts=sorted(parts, key=lambda p: p.source.uri),
                    skipped=sorted(skipped or [], key=lambda s: s.source.uri))
