"""Write image collections as sharded Parquet per the shard contract (SPEC section 3).

Sources: scikit-learn's bundled digits, Fashion-MNIST IDX files, a folder of image files
and existing Parquet (re-shard). Datasets that come with splits write `<dest>/<split>/`.
Ids are stable across reruns: positions in the source for the datasets, a hash of the
relative path for folders, the existing id for Parquet.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from sscq_dist.config import DataConfig, StorageConfig
from sscq_dist.data import dataset_record as dr
from sscq_dist.data.schema import IMAGE_SCHEMA, SHARD_PREFIX, shard_files, validate_shards
from sscq_dist.errors import SSCQError, StorageError
from sscq_dist.storage import Location, atomic_write_bytes, delete, list_files, resolve, with_retries

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Fixed split of the 1,797 digits: 1,500 database/train images, 297 held-out queries.
DIGITS_TRAIN = 1500
DIGITS_SPLIT_SEED = 0
# Fashion-MNIST test ids follow the train ids so ids are unique over the collection.
FASHION_TEST_ID_OFFSET = 60_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Record:
    id: int
    image: bytes
    uri: Optional[str]
    label: Optional[list[int]]


@dataclass
class IngestSummary:
    dest: str
    rows: int
    shards: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (f"ingest: {self.rows} rows, {self.shards} shards, {self.bytes / 1e6:.2f} MB "
                f"-> {self.dest} in {self.seconds:.1f}s")


def png_bytes(arr: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- sources


def digits_records(split: str) -> list[Record]:
    """scikit-learn's bundled 8x8 digits (values 0-16) as grey PNGs; split train/test/all."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(d.target))
    chosen = {"train": order[:DIGITS_TRAIN], "test": order[DIGITS_TRAIN:], "all": order}[split]
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return [Record(int(i), png_bytes(images[i]), f"sklearn:digits/{int(i)}", [int(d.target[i])])
            for i in sorted(int(x) for x in chosen)]


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SSCQError(f"IDX file not found: {path}") from None
    except OSError as exc:
        raise SSCQError(f"IDX file {path}: unreadable ({exc})") from None
    if len(data) < 4:
        raise SSCQError(f"IDX file {path}: too short for a header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SSCQError(f"IDX file {path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SSCQError(f"IDX file {path}: {body.size} values, header says {dims}")
    return body.reshape(dims)


def _find(directory: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise SSCQError(f"Fashion-MNIST file '{stem}[.gz]' not found in {directory} "
                    f"(install the Debian package dataset-fashion-mnist or pass --source-path)")


def fashion_mnist_records(split: str, directory: str = FASHION_MNIST_DIR) -> Iterator[Record]:
    """Fashion-MNIST IDX files: train ids 0..59999, test ids 60000.. (stable across reruns)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise SSCQError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {directory}")
    offset = 0 if split == "train" else FASHION_TEST_ID_OFFSET
    for i in range(len(images)):
        yield Record(offset + i, png_bytes(images[i]), f"fashion-mnist:{split}/{i}", [int(labels[i])])


def path_id(rel_path: str) -> int:
    """Stable non-negative int64 id from a relative path (first 63 bits of its sha256)."""
    return int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") & ((1 << 63) - 1)


def folder_records(directory: str) -> Iterator[Record]:
    """Image files under a folder; a first-level sub-folder name that is an integer is the label."""
    root = Path(directory)
    if not root.is_dir():
        raise SSCQError(f"image folder not found: {directory}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SSCQError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
    for p in files:
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        label = [int(parts[0])] if len(parts) > 1 and parts[0].lstrip("-").isdigit() else None
        yield Record(path_id(rel), p.read_bytes(), str(p.resolve()), label)


def parquet_records(uri: str, storage: Optional[StorageConfig]) -> Iterator[Record]:
    """Rows of existing image shards (re-sharding keeps ids)."""
    for f in validate_shards(resolve(uri, storage)):
        with f.fs.open_input_file(f.path) as fh:
            table = pq.read_table(fh)
        cols = table.column_names
        ids = table.column("id").to_pylist()
        imgs = table.column("image").to_pylist()
        uris = table.column("uri").to_pylist() if "uri" in cols else [None] * len(ids)
        labels = table.column("label").to_pylist() if "label" in cols else [None] * len(ids)
        for r in zip(ids, imgs, uris, labels):
            yield Record(*r)


# ----------------------------------------------------------------------------- writer


def records_to_table(records: Sequence[Record]) -> pa.Table:
    return pa.Table.from_pydict({
        "id": [r.id for r in records],
        "image": [r.image for r in records],
        "uri": [r.uri for r in records],
        "label": [r.label for r in records],
    }, schema=IMAGE_SCHEMA)


def row_group_bounds(image_sizes: Sequence[int], max_rows: int, max_bytes: int) -> list[int]:
    """Row-group starts (plus the end) cutting at max_rows rows or max_bytes image bytes,
    whichever comes first; a single image above max_bytes gets a group of its own."""
    bounds, rows, size = [0], 0, 0
    for i, n in enumerate(image_sizes):
        if rows and (rows >= max_rows or size + n > max_bytes):
            bounds.append(i)
            rows, size = 0, 0
        rows, size = rows + 1, size + n
    if rows:
        bounds.append(len(image_sizes))
    return bounds


def table_bytes(table: pa.Table, row_group_rows: int = DataConfig.row_group_rows,
                row_group_bytes: int = DataConfig.row_group_bytes) -> bytes:
    """One shard as Parquet, in small row groups (a thumbnail reads one row group of one column)."""
    sizes = pc.binary_length(table.column("image")).fill_null(0).to_numpy(zero_copy_only=False)
    bounds = row_group_bounds(sizes.tolist(), row_group_rows, row_group_bytes)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="zstd") as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
    return sink.getvalue().to_pybytes()


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:05d}.parquet"


def write_shards(records: Iterator[Record], dest: Location, rows_per_shard: int, overwrite: bool,
                 total: Optional[int] = None, progress: bool = True, check_duplicates: bool = True,
                 source: str = "", data_cfg: Optional[DataConfig] = None) -> IngestSummary:
    """Stream records into `part-NNNNN.parquet` shards under dest; each shard appears whole.

    The prefix is marked as being written (`_writing.json`) before the first shard, and the
    dataset record (`_dataset.json`) is written after the last one, so a reader can tell a
    whole dataset from what a dead ingest left (sscq_dist.data.dataset_record). A non-empty
    destination is refused unless overwrite; with overwrite, every shard the new record does
    not list is removed before the record is written.
    """
    from tqdm import tqdm

    from sscq_dist.console import CONSOLE

    if rows_per_shard < 1:
        raise SSCQError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    data_cfg = data_cfg or DataConfig()
    listing = list_files(dest)
    existing = shard_files(dest, listing)
    unfinished = any(i.base_name == dr.MARKER for i in listing)
    if (existing or unfinished) and not overwrite:
        what = f"holds {len(existing)} shard(s)" + (" from an unfinished ingest" if unfinished else "")
        raise StorageError(f"destination {dest.uri} already {what}; pass --overwrite to replace them")
    t0 = time.perf_counter()
    seen: set[int] = set()
    buf: list[Record] = []
    entries: list[dr.ShardEntry] = []
    n_rows = 0
    bar = tqdm(total=total, desc=f"ingest {dest.uri}", unit="img", disable=not progress, file=CONSOLE.err,
               mininterval=1.0)

    def flush() -> None:
        data = table_bytes(records_to_table(buf), data_cfg.row_group_rows, data_cfg.row_group_bytes)
        name = shard_name(len(entries))
        if not entries:  # marked before the first shard: a source that fails earlier leaves dest as it was
            atomic_write_bytes(dest.join(dr.MARKER), dr.marker_bytes(source))
        atomic_write_bytes(dest.join(name), data)
        entries.append(dr.ShardEntry(name, len(buf), len(data), hashlib.sha256(data).hexdigest()))
        buf.clear()

    for rec in records:
        if check_duplicates:
            if rec.id in seen:
                raise SSCQError(f"duplicate id {rec.id} in the source (ids must be unique); nothing after shard "
                                f"{len(entries)} was written and {dest.uri} stays marked unfinished")
            seen.add(rec.id)
        buf.append(rec)
        n_rows += 1
        bar.update(1)
        if len(buf) >= rows_per_shard:
            flush()
    if buf:
        flush()
    bar.close()
    if n_rows == 0:
        raise SSCQError("the source holds no images; nothing was written")
    record = dr.new_record(source, entries)
    # A fresh listing: also catches shards another (dead) ingest wrote after ours started.
    written = {e.name for e in entries}
    for old in shard_files(dest):
        if old.path.rsplit("/", 1)[-1] not in written:
            delete(old)
    atomic_write_bytes(dest.join(dr.RECORD), record.to_json())
    delete(dest.join(dr.MARKER))
    return IngestSummary(dest.uri, n_rows, len(entries), record.bytes, time.perf_counter() - t0)


def ingest(source: str, dest_uri: str, rows_per_shard: int = 10_000, overwrite: bool = False,
           source_path: Optional[str] = None, splits: Sequence[str] = ("train", "test"),
           storage: Optional[StorageConfig] = None, progress: bool = True,
           data_cfg: Optional[DataConfig] = None) -> list[IngestSummary]:
    """Ingest one source into dest_uri; returns one summary per written prefix.

    data_cfg: row-group limits of the written shards (data.row_group_rows / row_group_bytes)."""
    dest = resolve(dest_uri, storage)
    with_retries(lambda: dest.fs.get_file_info(dest.path), f"reach {dest.uri}", storage)
    out: list[IngestSummary] = []
    if source == "digits":
        for split in splits:
            recs = digits_records(split)
            out.append(write_shards(iter(recs), dest.join(split), rows_per_shard, overwrite, len(recs), progress,
                                    source=f"digits (scikit-learn), split {split}", data_cfg=data_cfg))
    elif source == "fashion_mnist":
        directory = source_path or FASHION_MNIST_DIR
        for split in splits:
            total = 60_000 if split == "train" else 10_000
            out.append(write_shards(fashion_mnist_records(split, directory), dest.join(split), rows_per_shard,
                                    overwrite, total, progress, source=f"fashion_mnist {directory}, split {split}",
                                    data_cfg=data_cfg))
    elif source == "folder":
        if not source_path:
            raise SSCQError("--source folder needs --source-path DIR")
        out.append(write_shards(folder_records(source_path), dest, rows_per_shard, overwrite, None, progress,
                                source=f"folder {source_path}", data_cfg=data_cfg))
    elif source == "parquet":
        if not source_path:
            raise SSCQError("--source parquet needs --source-path URI")
        out.append(write_shards(parquet_records(source_path, storage), dest, rows_per_shard, overwrite, None, progress,
                                source=f"parquet {source_path}", data_cfg=data_cfg))
    else:
        raise SSCQError(f"unknown --source {source!r} (digits, fashion_mnist, folder, parquet)")
    return out
