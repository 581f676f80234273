"""Error types whose message is the one line a user sees."""


class SSCQError(Exception):
    """Base class: the message names the cause (file, column, key, URI)."""


class ConfigError(SSCQError):
    """Invalid configuration: unknown key, wrong type or out-of-range value."""


class SchemaError(SSCQError):
    """A Parquet shard does not follow the image-shard contract (SPEC section 3)."""


class StorageError(SSCQError):
    """A URI cannot be used: bad scheme, missing path or unreachable endpoint."""


class TrainingError(SSCQError):
    """Training cannot continue (for example a non-finite loss term)."""


class RegistryError(SSCQError):
    """The model registry cannot be read or updated."""


class IndexError_(SSCQError):
    """An index root is inconsistent (manifest, checksum, lock)."""


class DatasetError(SSCQError):
    """An image-shard prefix is not a whole dataset (an ingest died there, or a shard changed)."""
