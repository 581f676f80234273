"""Incremental, exactly-once re-index of an image collection with a registered model.

`reindex()` reads as its stages (SPEC section 6):

    plan     one LIST of the source prefix, diffed against the version's latest snapshot
    build    one source shard -> one committed part, on a Ray Data actor pool (build.py)
    check    ids unique over the version (id_check.py)
    publish  one immutable manifest list over reused manifests, then CURRENT flips to it by
             compare-and-swap (publish.py)
    gc       garbage collection, its own step after the writer's lock is released (a failure
             there is a warning: the index is already published)

The driver coordinates and never touches per-image data: workers return part records only.
One writer per index root (IndexLock, with a fencing check before every publish write).
A shard whose build fails after its retries does not block the others: it is recorded in the
snapshot as skipped, with its reason, and the next run tries it again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from sscq_dist.config import Config
from sscq_dist.console import CONSOLE
from sscq_dist.errors import IndexError_
from sscq_dist.failpoints import failpoint
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.build import BuildJob, BuildResult, build_parts, raise_build_errors
from sscq_dist.indexing.encoder import model_object
from sscq_dist.indexing.formats import SkippedShard, Snapshot, part_name
from sscq_dist.indexing.id_check import check_unique_ids
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.plan import Plan, make_plan
from sscq_dist.indexing.publish import (GcPolicy, GcSummary, collect_garbage, flip_current, new_snapshot,
                                        next_generation, publish_snapshot)
from sscq_dist.indexing.trained import ensure_trained_index
from sscq_dist.registry import LoadedModel, load_model
from sscq_dist.storage import redact_uri, resolve
from sscq_dist.tracking import absolute_store_uri, tracking_uri

log = logging.getLogger(__name__)


@dataclass
class ReindexSummary:
    model_version: str
    index_root: str
    snapshot: str  # what CURRENT names after this run
    encoded_shards: int  # built by this run
    encoded_rows: int
    resumed_shards: int  # committed by a killed earlier run, published now
    removed_shards: int
    dropped_rows: int  # undecodable rows in the shards built now
    total_rows: int  # vectors the snapshot serves
    total_shards: int
    index_bytes: int
    seconds: float
    flipped: bool
    nothing_to_do: bool
    ids_checked: int = 0
    driver_received_bytes: int = 0
    gc: Optional[GcSummary] = None
    gc_warning: str = ""  # why garbage collection failed after a good publish
    skipped: list[SkippedShard] = field(default_factory=list)  # shards this snapshot does not serve (build failed)
    stage_seconds: dict = field(default_factory=dict)  # plan, ivf, build (build_first_part), check, publish, gc
    metrics: dict = field(default_factory=dict)

    def skipped_line(self) -> str:
        """'N source shards skipped (...): uri: reason; ...' naming up to 3, or ''."""
        if not self.skipped:
            return ""
        named = "; ".join(f"{redact_uri(s.source.uri)}: {s.reason[:200]}" for s in self.skipped[:3])
        more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return (f"reindex: {len(self.skipped)} source shard(s) skipped, their build failed "
                f"(the next run retries them): {named}{more}")

    def line(self) -> str:
        if self.nothing_to_do:
            return (f"reindex: nothing to do: {self.snapshot} at {self.index_root} covers all "
                    f"{self.total_rows} rows in {self.total_shards} shards")
        rate = self.encoded_rows / self.seconds if self.seconds else 0.0
        extra = [f"{self.resumed_shards} resumed"] if self.resumed_shards else []
        extra += [f"{self.removed_shards} removed"] if self.removed_shards else []
        return (f"reindex: version {self.model_version}: encoded {self.encoded_shards} shards / {self.encoded_rows} rows "
                f"({self.dropped_rows} undecodable skipped) at {rate:.0f} img/s"
                f"{' (' + ', '.join(extra) + ')' if extra else ''}; snapshot {self.snapshot}: {self.total_rows} rows "
                f"in {self.total_shards} parts, {self.index_bytes / max(1, self.total_rows):.1f} bytes/image"
                f"{'; CURRENT -> ' + self.snapshot if self.flipped else ''}")


def encode_config(cfg: Config, loaded: LoadedModel) -> Config:
    """The job's settings (index, storage) with the model's own architecture and input size.

    The tracking URI is resolved here, on the driver: actors load the model themselves, and a
    default or relative SQLite store would otherwise resolve against each actor's own working
    directory (another file, or none). Actors only: this config is never logged.
    """
    data = dataclasses.replace(cfg.data, image_size=loaded.cfg.data.image_size, channels=loaded.cfg.data.channels)
    tracking = dataclasses.replace(cfg.tracking, tracking_uri=absolute_store_uri(tracking_uri(cfg.tracking)))
    return dataclasses.replace(cfg, data=data, model=loaded.cfg.model, tracking=tracking)


def model_version(loaded: LoadedModel) -> str:
    """The registry version, or 'local-<codebook checksum>' for a model loaded from a folder."""
    if loaded.version:
        return loaded.version
    return "local-" + fi.codebook_checksum(loaded.codebooks).split(":")[1][:12]


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _Stages:
    """Wall seconds per stage, for the summary, the MLflow run and the scale benchmark."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


def reindex(images_uri: str, index_root_uri: str, model_uri: str, cfg: Config,
            owner: Optional[str] = None, progress: bool = True,
            loaded: Optional[LoadedModel] = None) -> ReindexSummary:
    """Bring <index_root> up to date with the images under images_uri for model_uri (or `loaded`)."""
    t0 = time.perf_counter()
    root = resolve(index_root_uri, cfg.storage)
    images = resolve(images_uri, cfg.storage)
    stages = _Stages()
    owner = owner or default_owner()
    with IndexLock(root, owner, cfg.index.lock_ttl_s) as lock:
        loaded = loaded or load_model(model_uri, cfg.tracking)
        version = model_version(loaded)
        checksum = fi.codebook_checksum(loaded.codebooks)
        plan = make_plan(images, root, version, checksum, cfg.index.index_type)
        stages.done("plan")
        if plan.nothing_to_do:
            return _summary(plan, plan.base, BuildResult(), t0, stages, flipped=False, nothing=True)
        if plan.unchanged:  # a whole snapshot that does not serve yet (killed before its flip, or a rollback)
            flip_current(root, plan.base.name, plan.current, lock)
            stages.done("publish")
            summary = _summary(plan, plan.base, BuildResult(), t0, stages, flipped=True)
        else:
            snap, built, skipped = _build_and_assemble(plan, loaded, cfg, lock, progress, stages)
            if snap is None:  # only shards that failed again: the serving snapshot already says so
                return _summary(plan, plan.base, built, t0, stages, flipped=False, skipped=skipped)
            failpoint("reindex.before_snapshot")
            publish_snapshot(root, snap, plan.current, lock, base=plan.base,
                             manifest_max_parts=cfg.index.manifest_max_parts)
            stages.done("publish")
            summary = _summary(plan, snap, built, t0, stages, flipped=True, skipped=skipped)
    if cfg.index.gc_after_reindex:
        summary.gc, summary.gc_warning = gc_after_publish(root, cfg, owner)
        stages.done("gc")
        summary.stage_seconds = dict(stages.seconds)
    return summary


def gc_policy(cfg: Config) -> GcPolicy:
    return GcPolicy(keep_generations=cfg.index.gc_keep_generations, grace_s=cfg.index.gc_grace_s,
                    delete_batch=cfg.index.gc_delete_batch)


def gc_after_publish(root, cfg: Config, owner: str) -> tuple[Optional[GcSummary], str]:
    """Garbage collection after a publish, under its own short lock: a failure is a warning
    (the index is published; the next run or `sscq gc` collects what is left)."""
    try:
        with IndexLock(root, owner + ":gc", cfg.index.lock_ttl_s) as lock:
            return collect_garbage(root, gc_policy(cfg), lock), ""
    except Exception as exc:  # noqa: BLE001 - never fails a published reindex
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
        log.warning("garbage collection after the publish failed (the index is published): %s", reason)
        return None, f"garbage collection failed after the publish (the index is published; run `sscq gc`): {reason}"


def _skipped(plan: Plan, built: BuildResult) -> list[SkippedShard]:
    by_part = {part_name(s.uri, s.etag): s for s in plan.todo}
    return [SkippedShard(source=by_part[p], reason=msg, error_kind=kind)
            for p, (kind, msg) in zip(built.failed_parts, built.errors) if p in by_part]


def _build_and_assemble(plan: Plan, loaded: LoadedModel, cfg: Config, lock, progress: bool,
                        stages: _Stages) -> tuple[Optional[Snapshot], BuildResult, list[SkippedShard]]:
    """Build the todo shards, check ids, and return the snapshot to publish (not yet written).

    None when the only work was shards that failed again exactly as the base snapshot records.
    """
    enc_cfg = encode_config(cfg, loaded)
    checksum = fi.codebook_checksum(loaded.codebooks)
    # The version's one trained empty index (codebooks, IVF quantizer): parts hold codes only.
    model_ref = model_object(loaded)  # the encoder actors' weights: no MLflow in the actors
    coarse, params = ensure_trained_index(plan.vloc, plan.sources, loaded.uri, enc_cfg, loaded.codebooks, model_ref)
    stages.done("ivf")
    if progress:
        CONSOLE.line(f"[reindex] {plan.root.uri}: {len(plan.todo)} of {len(plan.sources)} source shards to build "
                     f"for version {plan.version}")
    job = BuildJob(root_uri=plan.root.uri, model_uri=loaded.uri, version=plan.version, codebook_checksum=checksum,
                   index_type=cfg.index.index_type, coarse_checksum=coarse, cfg_dict=enc_cfg.to_dict(),
                   model_ref=model_ref)
    built = build_parts(plan.todo, job, enc_cfg, lock, progress)
    stages.done("build")
    stages.seconds["build_first_part"] = built.first_record_s  # actor start-up and model load, within build
    parts = plan.keep + [r.entry() for r in built.records.values()]
    if built.errors and not any(p.rows for p in parts):
        raise_build_errors(built)  # nothing would serve: the first bad shard is the error
    skipped = _skipped(plan, built)
    if skipped:
        log.warning("%d source shard(s) failed to build and are skipped: %s", len(skipped),
                    "; ".join(f"{s.source.uri}: {s.reason[:200]}" for s in skipped[:5]))
    base_skipped = {(s.source.uri, s.source.etag) for s in plan.base.skipped} if plan.base else set()
    if (plan.base is not None and not built.records and not plan.removed and plan.current == plan.base.name
            and {(s.source.uri, s.source.etag) for s in skipped} == base_skipped):
        return None, built, skipped
    if not any(p.rows for p in parts):
        raise IndexError_(f"{redact_uri(plan.sources[0].uri.rsplit('/', 1)[0])}: no rows to index "
                          f"({len(plan.sources)} shard(s), all empty)")
    built.ids_checked = check_unique_ids(plan.vloc, parts, set(built.records), cfg.storage)
    stages.done("check")
    cb = loaded.codebooks
    snap = new_snapshot(next_generation(plan.root, plan.version), parts, model_uri=loaded.uri, version=plan.version,
                        codebook_checksum=checksum, bits=loaded.cfg.model.bits, M=cb.shape[0], K=cb.shape[1],
                        index_type=cfg.index.index_type, index_params=params, coarse_checksum=coarse,
                        previous=plan.current, lock=lock, skipped=skipped)
    return snap, built, skipped


def _summary(plan: Plan, snap: Snapshot, built: BuildResult, t0: float, stages: _Stages, flipped: bool,
             nothing: bool = False, skipped: Optional[list[SkippedShard]] = None) -> ReindexSummary:
    fresh = list(built.records.values())
    return ReindexSummary(
        model_version=plan.version, index_root=plan.root.uri, snapshot=snap.name, encoded_shards=built.built,
        encoded_rows=built.built_rows, resumed_shards=built.resumed, removed_shards=len(plan.removed),
        dropped_rows=sum(r.dropped for r in fresh), total_rows=snap.total_rows, total_shards=len(snap.parts),
        index_bytes=snap.index_bytes, seconds=time.perf_counter() - t0, flipped=flipped, nothing_to_do=nothing,
        ids_checked=built.ids_checked,
        driver_received_bytes=built.received_bytes, stage_seconds=dict(stages.seconds),
        skipped=list(skipped if skipped is not None else (snap.skipped if snap is not None else [])))
