"""Compare-and-swap of one small object: the lock lease and CURRENT (Iceberg's optimistic commit).

`read_versioned(loc)` returns the bytes and a version tag; `put_if(loc, data, expected)`
replaces the object only if its tag is still `expected` (None: only if it does not exist),
else raises `Conflict` naming what is there now.

- s3://: one conditional PUT, `If-Match: <etag>` or `If-None-Match: *` (AWS S3, MinIO and
  moto's server answer 412 when the precondition fails). A store that answers 501 to
  conditional requests gets a best-effort fallback, logged once: compare, plain write, read
  back (two writers within one round trip can both believe they won).
- local roots: the tag is the sha256 of the content; compare and replace happen under an
  exclusive `flock` on a guard file beside the object (`.<name>.guard`, never replaced), and
  the replace is a rename, so readers without the guard see the old or the new bytes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.storage import Location

log = logging.getLogger(__name__)
_warned_unsupported: set[str] = set()


class Conflict(IndexError_):
    """The object changed since it was read (HTTP 412 on S3)."""


@dataclass
class Versioned:
    data: bytes
    tag: str  # S3 ETag, or sha256 of the content locally


def _s3(loc: Location):
    fs = loc.fs.handler.fs
    bucket, _, key = loc.path.partition("/")
    return fs, bucket, key


def _read_body(s3, resp) -> bytes:
    async def _r():
        async with resp["Body"] as body:
            return await body.read()

    from fsspec.asyn import sync

    return sync(s3.loop, _r)


def classify(exc: BaseException) -> str:
    """'conflict' for a failed precondition, 'unsupported' for a store without conditionals, else 'other'.

    s3fs turns the botocore ClientError into an OSError and keeps it as __cause__.
    """
    cause = exc if getattr(exc, "response", None) else getattr(exc, "__cause__", None)
    resp = getattr(cause, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return "conflict"
        if status == 501 or code == "NotImplemented":
            return "unsupported"
    if isinstance(exc, FileExistsError):
        return "conflict"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSYS:
        return "unsupported"
    return "other"


def _s3_call(loc: Location, op: str, **kwargs):
    """One S3 call, retried only while the endpoint does not answer; a 412 is an answer."""
    s3, bucket, key = _s3(loc)
    return storage.with_retries(lambda: s3.call_s3(op, Bucket=bucket, Key=key, **kwargs), f"{op} {loc.uri}",
                                loc.storage, storage.connection_errors())


def _local_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_versioned(loc: Location) -> Optional[Versioned]:
    """The object's bytes and tag, or None when it does not exist."""
    if loc.is_s3:
        s3, bucket, key = _s3(loc)

        def get():
            resp = s3.call_s3("get_object", Bucket=bucket, Key=key)
            return resp, _read_body(s3, resp)
        try:
            resp, body = storage.with_retries(get, f"read {loc.uri}", loc.storage, storage.connection_errors())
        except FileNotFoundError:
            return None
        return Versioned(body, str(resp.get("ETag", "")))
    try:
        with open(loc.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return Versioned(data, _local_tag(data))


@contextmanager
def _guard(loc: Location):
    """Exclusive flock on the object's guard file (local roots): compare-and-replace is atomic."""
    d, name = os.path.split(loc.path)
    os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, f".{name}.guard"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _conflict(loc: Location, expected: Optional[str], what: str) -> Conflict:
    now = read_versioned(loc)
    there = "nothing" if now is None else repr(now.data.decode("utf-8", "replace").strip()[:200])
    want = "no object" if expected is None else f"version {expected}"
    return Conflict(f"conflict on {loc.uri}: expected {want} but {what} found {there}")


def put_if(loc: Location, data: bytes, expected: Optional[str]) -> str:
    """Write `data` only if the object's tag is `expected` (None: only if absent); returns the new tag."""
    if loc.is_s3:
        cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            resp = _s3_call(loc, "put_object", Body=data, **cond)
            return str(resp.get("ETag", ""))
        except Exception as exc:  # noqa: BLE001 - classified below
            kind = classify(exc)
            if kind == "conflict":
                raise _conflict(loc, expected, "the store refused the conditional write (412) and") from None
            if kind != "unsupported":
                raise
        return _best_effort_put(loc, data, expected)
    with _guard(loc):
        now = read_versioned(loc)
        if (now.tag if now else None) != expected:
            raise _conflict(loc, expected, "the compare under the guard")
        tmp = f"{loc.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
    return _local_tag(data)


def _best_effort_put(loc: Location, data: bytes, expected: Optional[str]) -> str:
    if loc.uri not in _warned_unsupported:
        _warned_unsupported.add(loc.uri)
        log.warning("%s: the store does not support conditional writes; falling back to compare, write and "
                    "read back (two writers within one round trip can both win)", loc.uri)
    now = read_versioned(loc)
    if (now.tag if now else None) != expected:
        raise _conflict(loc, expected, "the compare before a plain write")
    storage.write_bytes(loc, data)
    back = read_versioned(loc)
    if back is None or back.data != data:
        raise _conflict(loc, expected, "the read-back after a plain write")
    return back.tag
