"""Build step of a reindex: one source shard -> one committed part, on Ray Data actors.

Worker side (`PartBuilder`, one model load per actor): read the shard row group by row group
in batches (memory bounded by a batch plus the part's codes and row metadata), decode,
embed, assign codes with the version's trained index (`trained.index`: FAISS's own
encoder, no codebook copy in the part), then write the lean part file (id, code, [list],
label, uri, row group, row) and last its commit record, each atomically. It returns only the record (a few hundred bytes): the driver never receives
embeddings, so the driver's work per image is zero and adding nodes adds throughput.

Exactly once without a coordinator: the part's name derives from the source uri + etag, so
a retried task (an actor died) or a rerun (the driver died) rewrites the same names; a part
whose record already matches is returned as is ("resumed") instead of being rebuilt.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from sscq_dist import storage
from sscq_dist.config import Config, from_dict
from sscq_dist.console import CONSOLE
from sscq_dist.data.schema import check_schema
from sscq_dist.errors import IndexError_, SchemaError, SSCQError, StorageError
from sscq_dist.indexing import faiss_index as fi
from sscq_dist.indexing.encoder import ImageEncoder, actor_pool, encoder_actors
from sscq_dist.indexing.formats import (PART_META_SCHEMA, SCHEMA_VERSION, PartRecord, PartRows, SourceShard,
                                        parse_part_record, part_files, part_name, version_loc, write_part)
from sscq_dist.indexing.source_read import read_row_groups
from sscq_dist.indexing.trained import read_trained_index
from sscq_dist.records import record_json
from sscq_dist.storage import Location, resolve

log = logging.getLogger(__name__)

# Source shards per Ray Data input block: small enough that a retried block redoes little,
# large enough that 100k shards are not 100k blocks.
MAX_SHARDS_PER_BLOCK = 16
# At most one `[reindex] parts ...` progress line per this many seconds.
PROGRESS_EVERY_S = 10.0


@dataclass
class BuildJob:
    """What every builder needs, sent once per actor: plain data (actors load the model themselves)."""

    root_uri: str
    model_uri: str  # resolved: a registry version or a model folder, never an alias
    version: str
    codebook_checksum: str
    index_type: str
    coarse_checksum: str  # sha256 of the version's trained.index
    cfg_dict: dict  # the job's config with the model's architecture and input size
    model_ref: Any = None  # the driver's loaded model in the object store (encoder.model_object)


class PartBuilder:
    """Ray Data callable class: rows {uri, size, etag, part} -> rows {part, record, resumed, error}."""

    def __init__(self, job: dict):
        self.job = BuildJob(**job)
        self.cfg: Config = from_dict(self.job.cfg_dict)
        self.encoder = ImageEncoder(self.job.model_uri, self.job.cfg_dict, self.job.codebook_checksum,
                                    use_gpu=self.cfg.index.use_gpu, model_ref=self.job.model_ref)
        root = resolve(self.job.root_uri, self.cfg.storage)
        self.vloc = version_loc(root, self.job.version)
        # One trained empty index per actor: codes are assigned with it, never added to it.
        self.trained = read_trained_index(self.vloc, self.job.coarse_checksum, self.job.index_type)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"part": [], "record": [], "resumed": [], "error": [], "error_kind": []}
        for uri, size, etag, part in zip(batch["uri"], batch["size"], batch["etag"], batch["part"]):
            src = SourceShard(str(uri), int(size), str(etag))
            record, resumed, error, kind = None, False, "", ""
            try:
                record = self._committed(str(part), src)
                resumed = record is not None
                if record is None:
                    record = self.build(str(part), src)
            except SSCQError as exc:  # a bad shard is reported by the driver, never a crash here
                error, kind = str(exc), type(exc).__name__
            out["part"].append(str(part))
            out["record"].append(record_json(record, SCHEMA_VERSION).decode() if record else "")
            out["resumed"].append(resumed)
            out["error"].append(error)
            out["error_kind"].append(kind)
        return {k: np.asarray(v) for k, v in out.items()}

    # ------------------------------------------------------------------ one shard

    def _committed(self, part: str, src: SourceShard) -> Optional[PartRecord]:
        """The existing record if it commits this very shard with this model and whole files."""
        loc = self.vloc.join(part_files(part)[1])
        try:
            rec = parse_part_record(storage.read_bytes(loc), loc.uri)
        except storage.NotFound:
            return None
        except IndexError_:
            return None  # unreadable record: rebuild the part over it
        same = (rec.source == src and rec.codebook_checksum == self.job.codebook_checksum
                and rec.index_type == self.job.index_type and rec.coarse_checksum == self.job.coarse_checksum)
        if not same:
            return None
        f = self.vloc.join(rec.index_file)
        info = storage.with_retries(lambda: f.fs.get_file_info(f.path), f"stat {f.uri}", f.storage)
        return rec if info.size == rec.index_bytes else None

    def build(self, part: str, src: SourceShard) -> PartRecord:
        loc = resolve(src.uri, self.cfg.storage)
        try:
            rows, n_rows = self._encode(loc)
        except FileNotFoundError:
            raise StorageError(f"{src.uri}: not found (removed after the listing?); rerun the reindex") from None
        except PermissionError as exc:
            raise StorageError(f"{src.uri}: permission denied ({exc})") from None
        ids = rows.ids
        if len(ids) != len(np.unique(ids)):
            uniq, counts = np.unique(ids, return_counts=True)
            dup = int(uniq[counts > 1][0])
            raise IndexError_(f"{src.uri}: id {dup} appears {int(counts.max())} times in the shard; "
                              "ids must be unique over the collection")
        return write_part(self.vloc, part, src, rows, n_rows, model_version=self.job.version,
                          codebook_checksum=self.job.codebook_checksum, index_type=self.job.index_type,
                          coarse_checksum=self.job.coarse_checksum)

    def _encode(self, loc: Location) -> tuple[PartRows, int]:
        """Read one shard row group by row group, in batches: (the part's rows, source rows)."""
        ids, codes, lists, metas = [], [], [], []
        n_rows = 0
        try:
            # Each footer / row-group read is retried on its own (source_read.py), not the whole shard.
            cols = lambda sch: ["id", "image"] + [c for c in ("uri", "label") if c in sch.names]  # noqa: E731
            group, in_group = -1, 0
            for g, rb in read_row_groups(loc, cols, self.cfg.index.encode_batch_size,
                                         lambda sch: check_schema(sch, loc.uri)):
                if g != group:
                    group, in_group = g, 0
                b_ids = rb.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
                f, ok = self.encoder.embed(rb.column("image").to_pylist())
                if ok.any():
                    c, li = fi.encode(self.trained, f[ok])
                    keep = pa.array(ok)
                    ids.append(b_ids[ok])
                    codes.append(c)
                    lists.append(li)
                    metas.append(pa.table({
                        "label": _column(rb, "label", PART_META_SCHEMA.field("label").type).filter(keep),
                        "uri": _column(rb, "uri", pa.string()).filter(keep),
                        "row_group": pa.array(np.full(int(ok.sum()), g, np.int32)),
                        "row": pa.array((in_group + np.nonzero(ok)[0]).astype(np.int32)),
                    }, schema=PART_META_SCHEMA))
                in_group += rb.num_rows
                n_rows += rb.num_rows
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SchemaError(f"{loc.uri}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
        if not ids:  # nothing decoded: an empty part of the right code width
            c, li = fi.encode(self.trained, np.zeros((0, self.trained.d), np.float32))
            ids, codes, lists, metas = [np.zeros(0, np.int64)], [c], [li], [PART_META_SCHEMA.empty_table()]
        rows = PartRows(ids=np.concatenate(ids), codes=np.concatenate(codes),
                        lists=None if lists[0] is None else np.concatenate(lists), meta=pa.concat_tables(metas))
        return rows, n_rows


def _column(rb: pa.RecordBatch, name: str, tp: pa.DataType) -> pa.Array:
    """A source column cast to the part's type, or nulls when the shard has no such column."""
    if name in rb.schema.names:
        return rb.column(name).cast(tp)
    return pa.nulls(rb.num_rows, tp)


# --------------------------------------------------------------------------- driver side


@dataclass
class BuildResult:
    """What the build stage hands the driver: records only (no vectors), and counts."""

    records: dict[str, PartRecord] = field(default_factory=dict)
    built: int = 0  # shards encoded by this run
    resumed: int = 0  # shards a killed earlier run had already committed
    errors: list[tuple[str, str]] = field(default_factory=list)  # (error class name, message) per bad shard
    failed_parts: list[str] = field(default_factory=list)  # the part name of each entry in `errors`
    ids_checked: int = 0  # ids the duplicate check read (0 when the parts' id ranges are disjoint)
    built_rows: int = 0  # source rows of the shards built by this run
    first_record_s: float = 0.0  # seconds until the first record arrived (actor start-up, model load)
    seconds: float = 0.0
    received_bytes: int = 0  # bytes of rows the driver took from the stream


def row_bytes(row: dict) -> int:
    """Bytes of one row as the driver received it, every array in full (len(str(array)) would
    count numpy's abbreviated print of a large one)."""
    total = 0
    for v in row.values():
        if isinstance(v, (str, np.str_)):
            total += len(str(v).encode())
        elif isinstance(v, (bytes, np.bytes_)):
            total += len(v)
        elif isinstance(v, np.ndarray) and v.dtype == object:
            total += sum(row_bytes({"": x}) for x in v.ravel())
        else:
            total += np.asarray(v).nbytes
    return total


def build_parts(todo: list[SourceShard], job: BuildJob, cfg: Config, lock=None, progress: bool = True) -> BuildResult:
    """Build every todo shard on the actor pool; returns the records (deduplicated by part).

    lock: the writer's IndexLock; a lost lease stops the build (no more parts are awaited).
    """
    import ray

    result = BuildResult()
    if not todo:
        return result
    items = [{"uri": s.uri, "size": s.size, "etag": s.etag, "part": part_name(s.uri, s.etag)} for s in todo]
    actors = min(encoder_actors(cfg, work_bytes=sum(s.size for s in todo)), len(items))
    per_block = min(MAX_SHARDS_PER_BLOCK, max(1, math.ceil(len(items) / (actors * 64))))
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_block))
    ds = ds.map_batches(PartBuilder, fn_constructor_kwargs={"job": job.__dict__},
                        batch_size=1, batch_format="numpy", **actor_pool(cfg, actors))
    t0 = last = time.perf_counter()
    for row in ds.iter_rows():
        result.received_bytes += row_bytes(row)
        if lock is not None:
            lock.raise_if_lost()
        if row["error"]:
            result.errors.append((str(row["error_kind"]), str(row["error"])))
            result.failed_parts.append(str(row["part"]))
            continue
        if not result.first_record_s:
            result.first_record_s = time.perf_counter() - t0
        rec = parse_part_record(row["record"], f"record of part {row['part']}")
        if rec.part not in result.records:  # a retried block may return a part twice
            result.records[rec.part] = rec
            if row["resumed"]:
                result.resumed += 1
            else:
                result.built += 1
                result.built_rows += rec.rows
        if progress and time.perf_counter() - last > PROGRESS_EVERY_S:
            last = time.perf_counter()
            CONSOLE.line(f"[reindex] parts {len(result.records) + len(result.errors)}/{len(items)} "
                         f"({result.built} built, {result.resumed} resumed); {result.built_rows} rows at "
                         f"{result.built_rows / max(1e-9, last - t0):.0f} img/s")
    result.seconds = time.perf_counter() - t0
    return result



def raise_build_errors(result: BuildResult) -> None:
    """One error line for the first bad shard (same error class as on the worker), counting the rest."""
    if not result.errors:
        return
    import sscq_dist.errors as errors

    kind, msg = result.errors[0]
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, SSCQError)):
        cls = SSCQError
    more = f" (and {len(result.errors) - 1} more shards)" if len(result.errors) > 1 else ""
    raise cls(f"{msg}{more}; nothing published, committed parts are kept for the rerun")
