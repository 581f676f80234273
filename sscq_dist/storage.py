"""One place that turns a URI into a filesystem (local path, file://, s3://).

The pyarrow filesystem returned here serves pyarrow.parquet, Ray Data and plain reads and
writes alike. S3 goes through s3fs (wrapped for pyarrow), with the endpoint from config or
`AWS_ENDPOINT_URL` and credentials only from the standard AWS chain; no credential is ever
read, stored or logged by this module.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from sscq_dist.config import StorageConfig
from sscq_dist.errors import StorageError

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("", "file", "s3")
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str
    # Retry settings for every call through this location (None: StorageConfig defaults).
    storage: Optional[StorageConfig] = field(default=None, compare=False)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> "Location":
        path = "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])
        uri = "/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(self.fs, path, uri, self.storage)


def validate_uri(uri: str) -> str:
    """Refuse schemes outside the allow-list (local path, file://, s3://) before any use."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty storage URI: {uri!r}")
    scheme = urlparse(uri).scheme.lower()
    # A Windows drive letter parses as a one-letter scheme; treat it as local.
    if len(scheme) == 1:
        scheme = ""
    if scheme not in ALLOWED_SCHEMES:
        raise StorageError(f"unsupported URI scheme '{scheme}://' in {redact_uri(uri)} (allowed: local path, file://, s3://)")
    if scheme == "s3" and not urlparse(uri).netloc:
        raise StorageError(f"S3 URI without a bucket: {redact_uri(uri)}")
    # A key is literal text, not a path: '..' would name other objects than the reader meant.
    if scheme == "s3" and any(seg in (".", "..") for seg in urlparse(uri).path.split("/")):
        raise StorageError(f"S3 URI with a '.' or '..' segment: {redact_uri(uri)}")
    return uri


def redact_uri(uri: str) -> str:
    """Drop any user:password@ part so a URI can be logged."""
    p = urlparse(uri)
    if p.password or p.username:
        netloc = p.hostname or ""
        if p.port:
            netloc += f":{p.port}"
        return p._replace(netloc=netloc).geturl()
    return uri


def endpoint_url(cfg: Optional[StorageConfig] = None) -> Optional[str]:
    return (cfg.endpoint_url if cfg and cfg.endpoint_url else None) or os.environ.get("AWS_ENDPOINT_URL") or None


def s3fs_filesystem(cfg: Optional[StorageConfig] = None):
    """An s3fs filesystem for the configured endpoint (credentials from the AWS chain).

    Every request is one HTTP try with the configured timeouts: botocore's and s3fs's own
    retry loops are switched off, so `with_retries` alone decides how often and how long
    (nested, they once turned one hung call into 429 s).
    """
    from sscq_dist.s3_filesystem import BoundedS3FileSystem

    cfg = cfg or StorageConfig()
    connect_s, read_s = try_timeouts(cfg)
    client_kwargs = {}
    url = endpoint_url(cfg)
    if url:
        client_kwargs["endpoint_url"] = url
    region = cfg.region or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    return BoundedS3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"},
                       "connect_timeout": connect_s, "read_timeout": read_s},
        use_listings_cache=False,
        skip_instance_cache=True,
    )


class _FSSpecHandler(pafs.FSSpecHandler):
    """pyarrow's fsspec bridge, with storage's retry policy on every file it opens.

    The stock handler first asks `isfile`, which answers False for any error, so an
    unreachable endpoint would read as a missing file and never be retried; here opening
    lets connection errors through. Opening and each read of the file are retried by
    `with_retries`, so readers that use the filesystem directly (Ray Data tasks) get the
    same bounded tries and deadline as our own calls, never nested inside them.
    """

    def __init__(self, fs, storage: Optional[StorageConfig] = None):
        super().__init__(fs)
        self.storage = storage

    def open_input_stream(self, path):
        return self._open(path)

    def open_input_file(self, path):
        return self._open(path)

    def _open(self, path):
        what = f"read s3://{path}"
        f = _retried(lambda: self.fs.open(path, mode="rb"), what, self.storage)
        return pa.PythonFile(_RetriedReads(f, what, self.storage), mode="r")


class _RetriedReads:
    """A binary file whose reads go through `with_retries` (s3fs keeps the position when a
    read fails, so a retry reads the same bytes)."""

    def __init__(self, f, what: str, storage: Optional[StorageConfig]):
        self._f, self._what, self._storage = f, what, storage

    def read(self, n=-1):
        return _retried(lambda: self._f.read(n), self._what, self._storage)

    def __getattr__(self, name):
        return getattr(self._f, name)


# True while with_retries runs a call, so the reads inside it are not retried a second time.
_IN_RETRIES: contextvars.ContextVar[bool] = contextvars.ContextVar("sscq_storage_in_retries", default=False)


def _retried(fn: Callable[[], T], what: str, cfg: Optional[StorageConfig]) -> T:
    return fn() if _IN_RETRIES.get() else with_retries(fn, what, cfg)


def resolve(uri: str, cfg: Optional[StorageConfig] = None) -> Location:
    """URI -> Location(fs, path). Local paths become absolute."""
    validate_uri(uri)
    p = urlparse(uri)
    scheme = p.scheme.lower() if len(p.scheme) > 1 else ""
    if scheme == "s3":
        fs = pafs.PyFileSystem(_FSSpecHandler(s3fs_filesystem(cfg), cfg))
        path = (p.netloc + p.path).rstrip("/")
        return Location(fs, path, f"s3://{path}", cfg)
    local = p.path if scheme == "file" else uri
    local = os.path.abspath(os.path.expanduser(local))
    return Location(pafs.LocalFileSystem(), local, local, cfg)


def with_retries(fn: Callable[[], T], what: str, cfg: Optional[StorageConfig] = None,
                 transient: Optional[tuple] = None) -> T:
    """Call fn with bounded retries and exponential backoff on connection errors.

    The one retry policy for storage: up to `storage.max_attempts` tries, each one HTTP try
    bounded by the connect/read timeouts, and no retry is started that could not end
    within `storage.deadline_s` of the first try, so even an endpoint that accepts
    connections and never answers ends in one StorageError within the deadline. Errors
    that are not transient (missing file, permission) are raised at once.
    transient: the exception types to retry (default: OSError and connection errors).
    """
    cfg = cfg or StorageConfig()
    attempts, backoff = cfg.max_attempts, cfg.retry_backoff_s
    transient = transient or _transient_errors()
    deadline = time.monotonic() + cfg.deadline_s
    connect_s, read_s = try_timeouts(cfg)
    for attempt in range(1, attempts + 1):
        try:
            return _one_try(fn)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError):
            raise
        except transient as exc:
            cause = f"{type(exc).__name__}: {first_line(exc)}"
            if attempt == attempts:
                raise StorageError(f"{what}: storage unreachable after {attempts} attempts ({cause})") from None
            delay = backoff * 2 ** (attempt - 1)
            if time.monotonic() + delay + connect_s + read_s > deadline:
                raise StorageError(f"{what}: storage unreachable after {attempt} attempt(s) within "
                                   f"storage.deadline_s={cfg.deadline_s:g}s ({cause})") from None
            log.warning("%s failed (%s), retry %d/%d in %.1fs", what, type(exc).__name__, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _one_try(fn: Callable[[], T]) -> T:
    token = _IN_RETRIES.set(True)
    try:
        return fn()
    finally:
        _IN_RETRIES.reset(token)


def try_timeouts(cfg: StorageConfig) -> tuple[float, float]:
    """(connect, read) seconds of one HTTP try: the configured ones, but never past the deadline."""
    return min(cfg.connect_timeout_s, cfg.deadline_s), min(cfg.read_timeout_s, cfg.deadline_s)


def _transient_errors() -> tuple:
    return (OSError,) + connection_errors()


def connection_errors() -> tuple:
    """Errors meaning the endpoint did not answer (never an answer such as 404 or 412)."""
    errs: list = [ConnectionError, TimeoutError]
    try:  # botocore's connection errors do not derive from OSError
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

        errs += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    return tuple(errs)


def first_line(exc: BaseException) -> str:
    """The first line of an error message, short enough for a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def exists(loc: Location) -> bool:
    info = with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {loc.uri}", loc.storage)
    return info.type != pafs.FileType.NotFound


def is_dir(loc: Location) -> bool:
    info = with_retries(lambda: loc.fs.get_file_info(loc.path), f"stat {loc.uri}", loc.storage)
    return info.type == pafs.FileType.Directory


def list_files(loc: Location, suffix: str = "") -> list[pafs.FileInfo]:
    """Files directly under a prefix, sorted by path; [] when the prefix does not exist."""
    def _ls():
        sel = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
        return loc.fs.get_file_info(sel)

    infos = with_causes(_ls, f"list {loc.uri}", loc.storage)
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                   and not i.base_name.startswith(".")), key=lambda i: i.path)


def list_dirs(loc: Location) -> list[str]:
    """Base names of the folders directly under a prefix, sorted; [] when it does not exist."""
    def _ls():
        return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))

    return sorted(i.base_name for i in with_causes(_ls, f"list {loc.uri}", loc.storage)
                  if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))


class NotFound(StorageError):
    """The object or file does not exist (an answer, never retried)."""


def read_bytes(loc: Location) -> bytes:
    def _read():
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()

    return with_causes(_read, f"read {loc.uri}", loc.storage)


def with_causes(fn: Callable[[], T], what: str, cfg: Optional[StorageConfig] = None) -> T:
    """with_retries(fn, what), where a missing or refused object is a StorageError saying so."""
    try:
        return with_retries(fn, what, cfg)
    except FileNotFoundError:
        raise NotFound(f"{what}: not found") from None
    except PermissionError as exc:
        raise StorageError(f"{what}: permission denied ({first_line(exc)})") from None


def write_bytes(loc: Location, data: bytes) -> None:
    """Plain write (the object appears whole on S3; locally use atomic_write_bytes)."""
    def _write():
        if not loc.is_s3:
            loc.fs.create_dir(os.path.dirname(loc.path), recursive=True)
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)

    with_retries(_write, f"write {loc.uri}", loc.storage)


def atomic_write_bytes(loc: Location, data: bytes) -> None:
    """Write to a temporary object next to the target, then replace the target.

    Readers see the old or the new content, never a partial one. Locally this is
    os.replace; on S3 a PUT is atomic per object, and the temporary-then-copy keeps a
    killed upload from leaving a truncated target.
    """
    parent = loc.path.rsplit("/", 1)[0]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{loc.path.rsplit('/', 1)[-1]}"
    tmp_loc = Location(loc.fs, tmp, loc.uri.rsplit("/", 1)[0] + "/" + tmp.rsplit("/", 1)[-1], loc.storage)
    write_bytes(tmp_loc, data)
    try:
        with_retries(lambda: loc.fs.move(tmp, loc.path), f"replace {loc.uri}", loc.storage)
    except BaseException:
        try:  # one best-effort try (no retries during an outage): readers ignore .tmp- objects
            loc.fs.delete_file(tmp)
        except Exception:
            pass
        raise


def delete(loc: Location) -> None:
    if not exists(loc):
        return
    if is_dir(loc):
        with_retries(lambda: loc.fs.delete_dir(loc.path), f"delete {loc.uri}", loc.storage)
    else:
        with_retries(lambda: loc.fs.delete_file(loc.path), f"delete {loc.uri}", loc.storage)

