"""One writer per index root: a lease object `<root>/lock` with an owner, a token, a fencing
token and a TTL.

The lock object is JSON {"owner", "token", "fence", "expires_at"}; `token` is a random uuid,
so ownership does not depend on host names or clocks agreeing on anything but expiry.
`fence` grows with every acquisition (max of the taken-over lease's fence + 1 and the clock
in milliseconds); snapshots record their writer's fence, and the publish step refuses to
replace a snapshot written under a larger fence.

Fencing: the writer calls `ensure_held()` right before it writes a snapshot and right before
it flips CURRENT; a lease that was taken over, expired, or could not be renewed (the
heartbeat failed) stops the writer with `lost the index lock to <owner>`. The residual
window is the time between that check and the write (milliseconds against a TTL of minutes).

How creation is made exclusive:
- local roots: `os.open(O_CREAT | O_EXCL)`; taking over an expired lock renames it to a
  unique name first (only one contender's rename succeeds) and checks it renamed the lock
  it judged expired.
- s3:// roots: a conditional PUT (`If-None-Match: *`, sent through s3fs's `put_object`),
  which S3 and most S3-compatible stores honour; takeover and release send a conditional
  DELETE (`If-Match: <etag>`) and refresh a conditional PUT (`If-Match`). A store that
  rejects conditional requests as unsupported gets the best-effort fallback: plain write,
  then read back and compare the token (two writers within one round trip can both
  believe they won; the TTL bounds the damage).
Release deletes the object only when its token is still ours.

A holder that dies leaves its lease behind: a heartbeat thread keeps live leases short
(refresh every ttl/3), so a dead holder's lease lapses within ttl_s; and a holder on this
same host whose process no longer exists is taken over at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.storage import Location

log = logging.getLogger(__name__)

LOCK_NAME = "lock"


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


class _Held(Exception):
    """The lock object exists (exclusive create lost)."""


class _Unsupported(Exception):
    """The store rejected a conditional request as not implemented."""


def _holder_dead(current: dict) -> bool:
    """True only when the holder ran on this host and its process is gone."""
    if current.get("host") != socket.gethostname() or not isinstance(current.get("pid"), int):
        return False
    if current["pid"] == os.getpid():
        return False
    try:
        os.kill(current["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class IndexLock:
    """Context manager holding `<root>/LOCK` for `owner` during a reindex.

    root: index root Location; owner: a human-readable name (job id, user@host);
    ttl_s: lease length; a holder must `refresh()` before it runs out.
    """

    def __init__(self, root: Location, owner: str, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError(f"lock ttl_s must be > 0, got {ttl_s}")
        self.root = root
        self.loc = root.join(LOCK_NAME)
        self.owner = owner
        self.ttl_s = float(ttl_s)
        self.token = uuid.uuid4().hex
        self.fence = 0
        self.expires_at = 0.0
        self.held = False
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lost_to = ""  # who holds the lease now, or why it could not be renewed
        self._beat: Optional[threading.Thread] = None
        # The heartbeat and the writer's own refresh must not race: both would send
        # If-Match with the same etag and the loser would think the lock was taken.
        self._refreshing = threading.Lock()

    # ------------------------------------------------------------------ public

    def acquire(self) -> "IndexLock":
        """Take the lock, or raise IndexError_ naming the current holder."""
        previous_fence = 0
        for _ in range(3):  # a takeover that loses a race retries against the winner
            self.fence = max(previous_fence + 1, int(time.time() * 1000))
            try:
                self._create(self._payload())
            except _Held:
                current = self._read()
                if current is None:
                    continue  # released between our create and our read
                if current["expires_at"] > time.time() and not _holder_dead(current):
                    raise IndexError_(f"index root {self.root.uri} is locked by {current['owner']} "
                                      f"until {_fmt(current['expires_at'])}; another reindex is running")
                log.warning("taking over the lock of %s (expires %s, holder alive: %s) on %s",
                            current["owner"], _fmt(current["expires_at"]), not _holder_dead(current),
                            self.root.uri)
                previous_fence = max(previous_fence, current.get("fence", 0))
                self._remove_if(current)
                continue
            mine = self._read()
            if mine is None or mine["token"] != self.token:
                holder = mine["owner"] if mine else "nobody"
                raise IndexError_(f"index root {self.root.uri}: lost the race for the lock to {holder}")
            self.held = True
            return self
        raise IndexError_(f"index root {self.root.uri}: could not take the lock (contended)")

    def refresh(self) -> None:
        """Extend the lease by ttl_s from now; refuses if the lock is no longer ours."""
        with self._refreshing:
            current = self._read()
            if current is None or current["token"] != self.token:
                holder = current["owner"] if current else "nobody"
                raise IndexError_(f"index root {self.root.uri}: lock of {self.owner} was lost "
                                  f"(now held by {holder}); stop writing")
            self._replace(self._payload(), current)

    def raise_if_lost(self) -> None:
        """Cheap check for the build loop: did the heartbeat find the lease gone?"""
        if self._lost.is_set():
            raise IndexError_(f"lost the index lock to {self._lost_to}; stopped without publishing")

    def ensure_held(self) -> None:
        """Fencing check right before a publish write: the lease is still ours and unexpired."""
        self.raise_if_lost()
        current = self._read()
        if current is None or current["token"] != self.token:
            self._mark_lost(current["owner"] if current else "nobody (the lease was removed)")
        elif current["expires_at"] <= time.time():
            self._mark_lost("nobody (the lease expired before it was renewed)")
        self.raise_if_lost()

    def _mark_lost(self, holder: str) -> None:
        self._lost_to = holder
        self._lost.set()

    def release(self) -> None:
        """Delete the lock if its token is ours; otherwise refuse (someone took it over)."""
        current = self._read()
        self.held = False
        if current is None:
            return
        if current["token"] != self.token:
            raise IndexError_(f"index root {self.root.uri}: lock is held by {current['owner']}, "
                              f"not {self.owner}; not released")
        self._remove_if(current)

    def start_heartbeat(self) -> None:
        """Refresh the lease every ttl/3 in a daemon thread until release."""
        def beat():
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - any failure to renew ends this writer
                    current = None
                    try:
                        current = self._read()
                    except Exception:  # noqa: BLE001 - storage unreachable: say why instead
                        pass
                    if current is not None and current["token"] != self.token:
                        self._mark_lost(current["owner"])
                    else:
                        self._mark_lost(f"nobody (the lease could not be renewed: {str(exc)[:200]})")
                    log.warning("index lock heartbeat failed; this writer stops: %s", exc)
                    return
        self._beat = threading.Thread(target=beat, name="index-lock-heartbeat", daemon=True)
        self._beat.start()

    def __enter__(self) -> "IndexLock":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._lost.is_set():  # the lease is someone else's now (or lapsed): nothing of ours to release
            self.held = False
            return
        try:
            self.release()
        except Exception as rel_exc:  # noqa: BLE001 - e.g. storage unreachable: the lease expires
            if exc_type is None:
                raise
            log.warning("lock release failed while handling another error: %s", rel_exc)

    # ------------------------------------------------------------------ helpers

    def _payload(self) -> bytes:
        self.expires_at = time.time() + self.ttl_s
        return json.dumps({"owner": self.owner, "token": self.token, "fence": self.fence,
                           "expires_at": self.expires_at, "host": socket.gethostname(),
                           "pid": os.getpid()}).encode()

    def _s3_call(self, op: str, **kwargs):
        """One S3 call on the lock object, retried (bounded) only while the endpoint does not answer;
        a refused precondition is an answer and comes back at once."""
        s3, (bucket, k) = _s3(self.loc)
        return storage.with_retries(lambda: s3.call_s3(op, Bucket=bucket, Key=k, **kwargs), f"{op} {self.loc.uri}",
                                    self.loc.storage, storage.connection_errors())

    def _read(self) -> Optional[dict]:
        """The lock JSON plus its "_etag" (S3) or None when there is no lock."""
        if self.loc.is_s3:
            s3, (bucket, k) = _s3(self.loc)

            def get():
                resp = s3.call_s3("get_object", Bucket=bucket, Key=k)
                return resp, _read_body(s3, resp)
            try:
                resp, body = storage.with_retries(get, f"read {self.loc.uri}", self.loc.storage,
                                                  storage.connection_errors())
            except FileNotFoundError:
                return None
            data = _parse(body, self.loc.uri)
            data["_etag"] = resp.get("ETag")
            return data
        try:
            with open(self.loc.path, "rb") as f:
                return _parse(f.read(), self.loc.uri)
        except FileNotFoundError:
            return None

    def _create(self, payload: bytes) -> None:
        if self.loc.is_s3:
            try:
                self._s3_call("put_object", Body=payload, IfNoneMatch="*")
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = _classify(exc)
                if kind == "held":
                    raise _Held() from None
                if kind != "unsupported":
                    raise
            # Best effort where conditional PUT is not implemented.
            if storage.exists(self.loc):
                raise _Held()
            storage.write_bytes(self.loc, payload)
            return
        os.makedirs(os.path.dirname(self.loc.path), exist_ok=True)
        try:
            fd = os.open(self.loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise _Held() from None
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    def _replace(self, payload: bytes, current: dict) -> None:
        """Overwrite our own lock (refresh)."""
        if self.loc.is_s3:
            try:
                self._s3_call("put_object", Body=payload, IfMatch=current["_etag"])
                return
            except Exception as exc:  # noqa: BLE001
                kind = _classify(exc)
                if kind == "held":
                    raise IndexError_(f"index root {self.root.uri}: lock changed under {self.owner} during refresh") from None
                if kind != "unsupported":
                    raise
            storage.write_bytes(self.loc, payload)
            return
        storage.atomic_write_bytes(self.loc, payload)

    def _remove_if(self, current: dict) -> None:
        """Delete the lock object only if it is still the one described by `current`."""
        if self.loc.is_s3:
            try:
                self._s3_call("delete_object", IfMatch=current["_etag"])
                return
            except FileNotFoundError:
                return
            except Exception as exc:  # noqa: BLE001
                kind = _classify(exc)
                if kind == "held":
                    return  # replaced meanwhile: not ours to delete; acquire re-reads
                if kind != "unsupported":
                    raise
            again = self._read()
            if again is not None and again["token"] == current["token"]:
                storage.delete(self.loc)
            return
        # Rename first: of several contenders only one moves the file away.
        aside = f"{self.loc.path}.{uuid.uuid4().hex}.del"
        try:
            os.rename(self.loc.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                moved = _parse(f.read(), self.loc.uri)
            if moved["token"] != current["token"]:
                # We moved a newer lock: put it back unless yet another one appeared.
                try:
                    os.link(aside, self.loc.path)
                except FileExistsError:
                    pass
        finally:
            os.unlink(aside)


def _parse(body: bytes, uri: str) -> dict:
    try:
        data = json.loads(body)
        out = {"owner": str(data["owner"]), "token": str(data["token"]), "expires_at": float(data["expires_at"]),
               "fence": int(data.get("fence", 0))}
        if isinstance(data.get("host"), str) and isinstance(data.get("pid"), int):
            out["host"], out["pid"] = data["host"], data["pid"]
        return out
    except (ValueError, KeyError, TypeError):
        # An unreadable lock blocks nobody forever: treat it as expired.
        log.warning("lock object %s is not valid lock JSON; treating it as expired", uri)
        return {"owner": "<unreadable lock>", "token": "", "expires_at": 0.0, "fence": 0}


def _s3(loc: Location):
    """The s3fs filesystem behind a Location and (bucket, key)."""
    fs = loc.fs.handler.fs
    bucket, _, key = loc.path.partition("/")
    return fs, (bucket, key)


def _read_body(s3, resp) -> bytes:
    async def _r():
        async with resp["Body"] as body:
            return await body.read()

    from fsspec.asyn import sync

    return sync(s3.loop, _r)


def _classify(exc: BaseException) -> str:
    """'held' for a failed precondition, 'unsupported' for a store without conditionals.

    s3fs turns the botocore ClientError into an OSError and keeps it as __cause__.
    """
    cause = exc if getattr(exc, "response", None) else getattr(exc, "__cause__", None)
    resp = getattr(cause, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return "held"
        if status == 501 or code == "NotImplemented":
            return "unsupported"
    if isinstance(exc, FileExistsError):
        return "held"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSYS:
        return "unsupported"
    return "other"
