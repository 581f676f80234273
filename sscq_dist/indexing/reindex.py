"""Incremental, exactly-once re-index of an image collection with a registered model.

Unit of work: one source image shard -> one index shard file + one id-map file. The manifest
is the source of truth and is rewritten atomically after every finished shard, so:
- a killed run leaves a valid manifest listing only finished shards; files it wrote for an
  unfinished shard are not listed and are overwritten by the rerun (same file name),
- a rerun encodes exactly the source shards the manifest lacks (or whose size/etag
  changed), so every source row is indexed once,
- a new model version is built beside the serving one; CURRENT flips only after its
  manifest is complete.
One writer per index root at a time (IndexLock with an expiry).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from sscq_dist.config import Config
from sscq_dist.data.schema import validate_shards
from sscq_dist.errors import IndexError_, SSCQError
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.encode_job import PATH_COLUMN, encode_stream
from sscq_dist.indexing.lock import IndexLock
from sscq_dist.indexing.manifest import (IndexManifest, IndexShard, SourceShard, now_iso, read_current,
                                         read_manifest, version_loc, write_current, write_manifest)
from sscq_dist.registry import LoadedModel, load_model
from sscq_dist.search import idmap_name, index_shard_name, read_idmap, write_idmap
from sscq_dist.storage import (Location, atomic_write_bytes, delete, exists, read_bytes, redact_uri, resolve,
                               with_retries)

log = logging.getLogger(__name__)

IVF_TRAINED_FILE = "ivf-trained.index"
METRICS_FILE = "index_metrics.json"


@dataclass
class SourceInfo:
    loc: Location
    size: int
    etag: str
    rows: int


@dataclass
class ReindexSummary:
    model_version: str
    index_root: str
    encoded_shards: int
    encoded_rows: int
    dropped_rows: int
    total_rows: int
    total_shards: int
    index_bytes: int
    seconds: float
    flipped: bool
    nothing_to_do: bool
    metrics: dict = field(default_factory=dict)

    def line(self) -> str:
        if self.nothing_to_do:
            return (f"reindex: nothing to do: version {self.model_version} at {self.index_root} covers all "
                    f"{self.total_rows} rows in {self.total_shards} shards")
        rate = self.encoded_rows / self.seconds if self.seconds else 0.0
        return (f"reindex: version {self.model_version}: encoded {self.encoded_shards} shards / {self.encoded_rows} rows "
                f"({self.dropped_rows} undecodable skipped) at {rate:.0f} img/s; index {self.total_rows} rows in "
                f"{self.total_shards} shards, {self.index_bytes / max(1, self.total_rows):.1f} bytes/image"
                f"{'; CURRENT -> ' + self.model_version if self.flipped else ''}")


def source_infos(images_uri: str, cfg: Config) -> list[SourceInfo]:
    """Every source shard with size, etag (or mtime-size for local files) and row count."""
    out = []
    for f in validate_shards(resolve(images_uri, cfg.storage)):
        info = with_retries(lambda f=f: f.fs.get_file_info(f.path), f"stat {f.uri}", cfg.storage)
        etag = _etag(f) or f"mtime:{info.mtime_ns}-size:{info.size}"

        def _rows(f=f):
            with f.fs.open_input_file(f.path) as fh:
                return pq.ParquetFile(fh).metadata.num_rows
        out.append(SourceInfo(f, int(info.size), etag, int(with_retries(_rows, f"read footer of {f.uri}", cfg.storage))))
    return out


def _etag(loc: Location) -> Optional[str]:
    if not loc.is_s3:
        return None
    handler = getattr(loc.fs, "handler", None)
    s3 = getattr(handler, "fs", None)
    if s3 is None:
        return None
    try:
        return str(s3.info(loc.path).get("ETag", "")).strip('"') or None
    except Exception:
        return None


def encode_config(cfg: Config, loaded: LoadedModel) -> Config:
    """The job's settings (index, storage) with the model's own architecture and input size."""
    import dataclasses

    data = dataclasses.replace(cfg.data, image_size=loaded.cfg.data.image_size, channels=loaded.cfg.data.channels)
    return dataclasses.replace(cfg, data=data, model=loaded.cfg.model)


def _model_version(loaded: LoadedModel) -> str:
    if loaded.version:
        return loaded.version
    return "local-" + fi.codebook_checksum(loaded.codebooks).split(":")[1][:12]


def _new_manifest(loaded: LoadedModel, version: str, cfg: Config, params: dict) -> IndexManifest:
    cb = loaded.codebooks
    return IndexManifest(model_uri=loaded.uri, model_version=version, codebook_checksum=fi.codebook_checksum(cb),
                         bits=loaded.cfg.model.bits, M=cb.shape[0], K=cb.shape[1], index_type=cfg.index.index_type,
                         index_params=params, created_at=now_iso(), complete=False, sources=[], index_shards=[])


def _empty_index(cfg: Config, codebooks: np.ndarray, trained_ivf: Optional[bytes]):
    if cfg.index.index_type == "ivf_pq_fastscan":
        assert trained_ivf is not None
        return fi.deserialize(trained_ivf)
    return fi.build_pq_fastscan(codebooks)


def _train_ivf(vloc: Location, sources: list[SourceInfo], loaded: LoadedModel, state: dict, cfg: Config) -> bytes:
    """Train the coarse quantizer once per version on a uniform sample; stored beside the shards."""
    loc = vloc.join(IVF_TRAINED_FILE)
    if exists(loc):
        return read_bytes(loc)
    total = sum(s.rows for s in sources)
    nlist = min(cfg.index.nlist, max(1, total // 39))  # FAISS wants ~39 points per centroid
    want = max(cfg.index.ivf_train_sample, nlist * 39)
    fraction = min(1.0, 1.2 * want / max(1, total))
    sampler = fi.ReservoirSampler(want, seed=cfg.train.seed)
    by_path = {s.loc.path: s for s in sources}
    for batch in encode_stream(list(by_path), sources[0].loc.fs, state, encode_config(cfg, loaded), sample_fraction=fraction,
                               seed=cfg.train.seed):
        sampler.add(batch["f"][batch["ok"].astype(bool)])
    sample = sampler.sample()
    index = fi.build_ivf_pq_fastscan(loaded.codebooks, sample, nlist, cfg.index.nprobe, seed=cfg.train.seed,
                                     niter=cfg.index.kmeans_iters)
    data = fi.serialize(index)
    atomic_write_bytes(loc, data)
    log.info("trained IVF coarse quantizer: nlist=%d on %d sampled embeddings", nlist, len(sample))
    return data


class _OpenShard:
    """Rows of one source shard collected until all of them have arrived."""

    def __init__(self, src: SourceInfo, index):
        self.src = src
        self.index = index
        self.ids: list[np.ndarray] = []
        self.seen = 0
        self.dropped = 0

    def add(self, ids: np.ndarray, f: np.ndarray, ok: np.ndarray) -> None:
        self.seen += len(ids)
        self.dropped += int((~ok).sum())
        if ok.any():
            fi.add(self.index, f[ok], ids[ok])
            self.ids.append(ids[ok])

    @property
    def done(self) -> bool:
        return self.seen >= self.src.rows


def _check_ids(shard_ids: np.ndarray, src: SourceInfo, manifest: IndexManifest, vloc: Location) -> None:
    """Duplicate ids inside a shard or across shards would break exactly-once lookups."""
    uniq = np.unique(shard_ids)
    if len(uniq) != len(shard_ids):
        raise IndexError_(f"{src.loc.uri}: duplicate ids inside the shard; ids must be unique over the collection")
    if len(uniq) == 0:
        return
    lo, hi = int(uniq[0]), int(uniq[-1])
    for s in manifest.sources:
        if s.path == src.loc.uri or s.id_max < lo or s.id_min > hi:
            continue
        sh = next(x for x in manifest.index_shards if x.file == s.index_shard)
        other, _ = read_idmap(vloc.join(sh.idmap_file))
        common = np.intersect1d(uniq, other)
        if len(common):
            raise IndexError_(f"{src.loc.uri}: id {int(common[0])} is also in {s.path}; "
                              f"ids must be unique across shards ({len(common)} duplicates)")


def _read_uris(src: SourceInfo, cfg: Config) -> dict:
    def _read():
        with src.loc.fs.open_input_file(src.loc.path) as fh:
            schema = pq.read_schema(fh)
            if "uri" not in schema.names:
                return {}
            t = pq.read_table(fh, columns=["id", "uri"])
        return dict(zip(t.column("id").to_pylist(), t.column("uri").to_pylist()))
    return with_retries(_read, f"read uris of {src.loc.uri}", cfg.storage)


def reindex(images_uri: str, index_root_uri: str, model_uri: str, cfg: Config,
            owner: Optional[str] = None, progress: bool = True,
            loaded: Optional[LoadedModel] = None) -> ReindexSummary:
    """Bring <index_root> up to date with the images under images_uri for model_uri
    (or the already loaded model)."""
    t0 = time.perf_counter()
    root = resolve(index_root_uri, cfg.storage)
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    with IndexLock(root, owner, cfg.index.lock_ttl_s) as lock:
        loaded = loaded or load_model(model_uri, cfg.tracking)
        version = _model_version(loaded)
        vloc = version_loc(root, version)
        current = read_current(root)
        manifest = read_manifest(root, version)
        checksum = fi.codebook_checksum(loaded.codebooks)
        if manifest is not None and manifest.codebook_checksum != checksum:
            raise IndexError_(f"index {vloc.uri}: manifest codebook checksum {manifest.codebook_checksum} does not "
                              f"match model {loaded.uri} ({checksum}); refusing to mix codes of two models")
        sources = source_infos(images_uri, cfg)
        if not any(s.rows for s in sources):
            raise IndexError_(f"{redact_uri(images_uri)}: no rows to index ({len(sources)} shard(s), all empty)")
        params = {"nlist": cfg.index.nlist, "nprobe": cfg.index.nprobe} if cfg.index.index_type == "ivf_pq_fastscan" else {}
        if manifest is None:
            manifest = _new_manifest(loaded, version, cfg, params)
        if manifest.index_type != cfg.index.index_type:
            raise IndexError_(f"index {vloc.uri} is {manifest.index_type}, config asks {cfg.index.index_type}; "
                              f"use a new index root to change the index type")
        known = {s.path: s for s in manifest.sources}
        todo = [s for s in sources if s.loc.uri not in known or known[s.loc.uri].etag_or_checksum != s.etag
                or known[s.loc.uri].size != s.size]
        src_uris = {s.loc.uri for s in sources}
        removed = [s for s in manifest.sources if s.path not in src_uris]
        if not todo and not removed and manifest.complete and current == version:
            return ReindexSummary(version, root.uri, 0, 0, 0, manifest.total_rows, len(manifest.index_shards),
                                  sum(x.bytes for x in manifest.index_shards), time.perf_counter() - t0, False, True)
        state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
        trained_ivf = _train_ivf(vloc, sources, loaded, state, cfg) if cfg.index.index_type == "ivf_pq_fastscan" else None
        if removed:
            gone = {s.index_shard for s in removed}
            manifest.sources = [s for s in manifest.sources if s.path in src_uris]
            manifest.index_shards = [x for x in manifest.index_shards if x.file not in gone]
            write_manifest(root, manifest)
        encoded_rows = dropped = 0
        next_no = _next_shard_no(manifest)
        if todo:
            total_rows = sum(s.rows for s in todo)
            log.info("reindex %s: encoding %d source shards (%d rows) with %s", root.uri, len(todo), total_rows, loaded.uri)
            # A 0-row source has nothing to encode: commit it (empty index shard) so reruns skip it.
            for src in (s for s in todo if s.rows == 0):
                empty = _OpenShard(src, _empty_index(cfg, loaded.codebooks, trained_ivf))
                manifest = _commit_shard(empty, next_no, manifest, root, vloc, cfg)
                next_no += 1
            by_path = {s.loc.path: s for s in todo if s.rows}
            open_shards: dict[str, _OpenShard] = {}
            # Shards finish in arrival order; numbering follows the order they finish.
            last_log = time.perf_counter()
            stream = encode_stream(list(by_path), todo[0].loc.fs, state, encode_config(cfg, loaded)) if by_path else ()
            for batch in stream:
                paths = batch[PATH_COLUMN]
                ids, f, ok = batch["id"], batch["f"], batch["ok"].astype(bool)
                for p in np.unique(paths):
                    sel = paths == p
                    sh = open_shards.get(p)
                    if sh is None:
                        sh = open_shards[p] = _OpenShard(by_path[p], _empty_index(cfg, loaded.codebooks, trained_ivf))
                    sh.add(ids[sel], f[sel], ok[sel])
                    if sh.done:
                        manifest = _commit_shard(sh, next_no, manifest, root, vloc, cfg)
                        next_no += 1
                        encoded_rows += sh.seen
                        dropped += sh.dropped
                        del open_shards[p]
                        lock.refresh()
                if progress and time.perf_counter() - last_log > 5:
                    rows_now = encoded_rows + sum(s.seen for s in open_shards.values())
                    print(f"[reindex] {rows_now}/{total_rows} rows encoded "
                          f"({rows_now / max(1e-9, time.perf_counter() - t0):.0f} img/s)", flush=True)
                    last_log = time.perf_counter()
            if open_shards:
                raise IndexError_(f"encoding ended before all rows of {sorted(open_shards)[0]} arrived "
                                  f"(expected {next(iter(open_shards.values())).src.rows})")
        manifest.complete = True
        write_manifest(root, manifest)
        _remove_orphans(vloc, manifest)
        flipped = current != version
        if flipped:
            write_current(root, version)
        index_bytes = sum(x.bytes for x in manifest.index_shards)
        return ReindexSummary(version, root.uri, len(todo), encoded_rows, dropped, manifest.total_rows,
                              len(manifest.index_shards), index_bytes, time.perf_counter() - t0, flipped, False)


def _remove_orphans(vloc: Location, manifest: IndexManifest) -> None:
    """Delete shard / id-map files a killed run wrote but never listed in the manifest."""
    from sscq_dist.storage import list_files

    listed = {x.file for x in manifest.index_shards} | {x.idmap_file for x in manifest.index_shards}
    for info in list_files(vloc):
        name = info.base_name
        if (name.startswith("shard-") or name.startswith("idmap-")) and name not in listed:
            delete(vloc.join(name))


def _next_shard_no(manifest: IndexManifest) -> int:
    nums = [int(x.file.split("-")[1].split(".")[0]) for x in manifest.index_shards]
    return max(nums) + 1 if nums else 0


def _commit_shard(sh: _OpenShard, shard_no: int, manifest: IndexManifest, root: Location, vloc: Location,
                  cfg: Config) -> IndexManifest:
    ids = np.concatenate(sh.ids) if sh.ids else np.zeros(0, np.int64)
    _check_ids(ids, sh.src, manifest, vloc)
    uris_by_id = _read_uris(sh.src, cfg)
    index_bytes = fi.serialize(sh.index)
    file, idfile = index_shard_name(shard_no), idmap_name(shard_no)
    atomic_write_bytes(vloc.join(file), index_bytes)
    idmap_bytes = write_idmap(vloc.join(idfile), ids, [uris_by_id.get(int(i)) for i in ids])
    entry = SourceShard(path=sh.src.loc.uri, size=sh.src.size, etag_or_checksum=sh.src.etag, rows=sh.src.rows,
                        index_shard=file, id_min=int(ids.min()) if len(ids) else 0,
                        id_max=int(ids.max()) if len(ids) else -1)
    old_files = {s.index_shard for s in manifest.sources if s.path == sh.src.loc.uri}
    stale = [x for x in manifest.index_shards if x.file in old_files]
    manifest.sources = [s for s in manifest.sources if s.path != sh.src.loc.uri] + [entry]
    manifest.index_shards = [x for x in manifest.index_shards if x.file not in old_files] + [
        IndexShard(file=file, rows=len(ids), bytes=len(index_bytes), idmap_file=idfile, idmap_bytes=idmap_bytes)]
    # The manifest write is the commit point of this shard.
    write_manifest(root, manifest)
    for x in stale:  # files of a replaced (changed) source shard, now unlisted
        delete(vloc.join(x.file))
        delete(vloc.join(x.idmap_file))
    return manifest
