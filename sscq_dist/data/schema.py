"""The image-shard contract (SPEC section 3) and its checks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from sscq_dist.data.dataset_record import SHARD_PREFIX, check_dataset, listed_sizes
from sscq_dist.errors import SchemaError, StorageError
from sscq_dist.storage import Location, first_line, list_dirs, list_files, with_causes

IMAGE_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("uri", pa.string(), nullable=True),
    pa.field("label", pa.list_(pa.int32()), nullable=True),
])
REQUIRED = {"id": "int64", "image": "binary"}
OPTIONAL = {"uri": "string", "label": "list<int32>"}


def _type_ok(name: str, typ: pa.DataType) -> bool:
    if name == "id":
        return pa.types.is_int64(typ)
    if name == "image":
        return pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
    if name == "uri":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)
    if name == "label":
        return (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type) \
            or pa.types.is_null(typ)
    return True


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise SchemaError naming the file and the column when `schema` breaks the contract."""
    names = set(schema.names)
    for col, expected in REQUIRED.items():
        if col not in names:
            raise SchemaError(f"{where}: missing column '{col}' (expected {expected})")
    for col, expected in {**REQUIRED, **OPTIONAL}.items():
        if col in names and not _type_ok(col, schema.field(col).type):
            raise SchemaError(f"{where}: column '{col}' has type {schema.field(col).type}, expected {expected}")


def shard_files(loc: Location, listing=None) -> list:
    """The `part-*.parquet` files under a prefix (or the single file the URI names).

    listing: the prefix's `list_files` result when the caller already has it.
    """
    if loc.path.endswith(".parquet"):
        return [loc]
    infos = [i for i in (listing if listing is not None else list_files(loc))
             if i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(".parquet")]
    return [Location(loc.fs, i.path, loc.uri.rstrip("/") + "/" + i.base_name, loc.storage) for i in infos]


def no_shards_error(loc: Location, max_folders: int = 20) -> SchemaError:
    """The error for a prefix without shards, naming the sub-folders that have some.

    `--images data/digits` (the prefix `make demo` ingests into, with train/ and test/
    under it) gets "did you mean data/digits/train?". Costs one LIST per sub-folder, at
    most `max_folders`, and only on this error path.
    """
    msg = f"no image shards (part-*.parquet) under {loc.uri}"
    if loc.path.endswith(".parquet"):
        return SchemaError(msg)
    with_shards = [d for d in list_dirs(loc)[:max_folders]
                   if any(i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(".parquet")
                          for i in list_files(loc.join(d)))]
    if with_shards:
        base = loc.uri.rstrip("/")
        msg += (f": did you mean {' or '.join(f'{base}/{d}' for d in with_shards[:3])}? "
                f"(a prefix is one split; sub-folders are not searched)")
    return SchemaError(msg)


def validate_shards(loc: Location) -> list[Location]:
    """Check a prefix is a whole image dataset and every shard's footer schema (metadata only).

    An unfinished ingest or a shard that differs from the dataset record is a DatasetError
    (`check_dataset`); a truncated or non-Parquet file, a missing or mistyped column, or an
    empty prefix is a SchemaError; a shard that cannot be read is a StorageError naming why
    (not found, permission denied, unreachable). Each names the file.
    """
    listing = None if loc.path.endswith(".parquet") else list_files(loc)
    check_dataset(loc, None if listing is None else listed_sizes(listing))
    files = shard_files(loc, listing)
    if not files:
        raise no_shards_error(loc)
    for f in files:
        check_schema(read_shard_schema(f), f.uri)
    return files


def read_shard_schema(f: Location) -> pa.Schema:
    """One shard's footer schema; errors name the file and the real cause."""
    def _schema():
        with f.fs.open_input_file(f.path) as fh:
            return pq.read_schema(fh)
    try:
        return with_causes(_schema, f"read schema of {f.uri}", f.storage)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:  # the bytes came back but are not Parquet
        raise SchemaError(f"{f.uri}: not a readable Parquet file ({first_line(exc)})") from None
    except OSError as exc:
        raise StorageError(f"{f.uri}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from None

