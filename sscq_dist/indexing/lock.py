"""One writer per index root: a lease object `<root>/lock` with an owner, a token, a fencing
counter and a TTL.

The lock object is JSON {"owner", "token", "fence", "expires_at", "released"}; `token` is a
random uuid, so ownership does not depend on host names or clocks agreeing on anything but
expiry. `fence` is a counter that only grows: every acquisition writes the previous value + 1
by compare-and-swap on the object it read (indexing/conditional.py: a conditional PUT on S3,
a guarded rename locally), and release leaves the object in place marked released, so the
counter survives. Snapshots record their writer's fence; publish refuses a writer whose
fence is no longer the lock's or is below the served snapshot's (a forced takeover).

Fencing: the writer calls `ensure_held()` right before it writes a snapshot and right before
it flips CURRENT; a lease that was taken over, expired, or could not be renewed (the
heartbeat failed) stops the writer with `lost the index lock to <owner>`. CURRENT itself is
then swapped by compare-and-swap, so a takeover in the remaining window still leaves
exactly one writer's flip standing.

A holder that dies leaves its lease behind: a heartbeat thread keeps live leases short
(refresh every ttl/3), so a dead holder's lease lapses within ttl_s; and a holder on this
same host whose process no longer exists is taken over at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

from sscq_dist.errors import IndexError_
from sscq_dist.indexing.conditional import Conflict, put_if, read_versioned
from sscq_dist.storage import Location

log = logging.getLogger(__name__)

LOCK_NAME = "lock"


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")




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
    """Context manager holding `<root>/lock` for `owner` during a reindex.

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
        # The heartbeat and the writer's own refresh must not race: both would compare
        # against the same version and the loser would think the lock was taken.
        self._refreshing = threading.Lock()

    # ------------------------------------------------------------------ public

    def acquire(self, force: bool = False) -> "IndexLock":
        """Take the lock, or raise IndexError_ naming the current holder.

        force: take over even a live lease (an operator's forced takeover); the old holder
        is then refused at its next fencing check, because the fence it holds is stale.
        """
        for _ in range(5):  # a compare-and-swap that loses a race re-reads the winner
            current = self._read()
            if current is not None and not current["released"]:
                live = current["expires_at"] > time.time() and not _holder_dead(current)
                if live and not force:
                    raise IndexError_(f"index root {self.root.uri} is locked by {current['owner']} "
                                      f"until {_fmt(current['expires_at'])}; another reindex is running")
                log.warning("taking over the lock of %s (expires %s, holder alive: %s%s) on %s", current["owner"],
                            _fmt(current["expires_at"]), not _holder_dead(current), ", forced" if force else "",
                            self.root.uri)
            self.fence = (current["fence"] if current else 0) + 1
            try:
                self._tag = put_if(self.loc, self._payload(), current["_tag"] if current else None)
            except Conflict:
                continue
            self.held = True
            return self
        raise IndexError_(f"index root {self.root.uri}: could not take the lock (contended)")

    def refresh(self) -> None:
        """Extend the lease by ttl_s from now; refuses if the lock is no longer ours."""
        with self._refreshing:
            current = self._read()
            if current is None or current["token"] != self.token or current["released"]:
                holder = current["owner"] if current and not current["released"] else "nobody"
                raise IndexError_(f"index root {self.root.uri}: lock of {self.owner} was lost "
                                  f"(now held by {holder}); stop writing")
            try:
                self._tag = put_if(self.loc, self._payload(), current["_tag"])
            except Conflict:
                raise IndexError_(f"index root {self.root.uri}: lock changed under {self.owner} during refresh") from None

    def advance_fence(self, floor: int) -> None:
        """Raise our fence above `floor` (a root whose counter restarted: its lock object was
        recreated, or its snapshots carry the earlier clock-valued fences)."""
        with self._refreshing:
            current = self._read()
            if current is None or current["token"] != self.token or current["fence"] != self.fence:
                self._mark_lost(current["owner"] if current else "nobody (the lease was removed)")
                self.raise_if_lost()
            fence = self.fence
            self.fence = max(self.fence, floor + 1)
            try:
                self._tag = put_if(self.loc, self._payload(), current["_tag"])
            except Conflict:
                self.fence = fence
                self._mark_lost("another writer (the lock changed while its fence was advanced)")
                self.raise_if_lost()

    def raise_if_lost(self) -> None:
        """Cheap check for the build loop: did the heartbeat find the lease gone?"""
        if self._lost.is_set():
            raise IndexError_(f"lost the index lock to {self._lost_to}; stopped without publishing")

    def ensure_held(self) -> None:
        """Fencing check right before a publish write: the lease is ours, unexpired, and our fence is the lock's."""
        self.raise_if_lost()
        current = self._read()
        if current is None or current["released"]:
            self._mark_lost("nobody (the lease was released or removed)")
        elif current["token"] != self.token or current["fence"] != self.fence:
            stale = f" (fence {current['fence']} > ours {self.fence})" if current["fence"] > self.fence else ""
            self._mark_lost(f"{current['owner']}{stale}")
        elif current["expires_at"] <= time.time():
            self._mark_lost("nobody (the lease expired before it was renewed)")
        self.raise_if_lost()

    def _mark_lost(self, holder: str) -> None:
        self._lost_to = holder
        self._lost.set()

    def release(self) -> None:
        """Mark the lease released (the object and its fence stay) if its token is ours; otherwise refuse."""
        current = self._read()
        self.held = False
        if current is None or current["released"]:
            return
        if current["token"] != self.token:
            raise IndexError_(f"index root {self.root.uri}: lock is held by {current['owner']}, "
                              f"not {self.owner}; not released")
        try:
            put_if(self.loc, self._payload(released=True), current["_tag"])
        except Conflict:
            pass  # taken over meanwhile: not ours any more

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

    def _payload(self, released: bool = False) -> bytes:
        self.expires_at = 0.0 if released else time.time() + self.ttl_s
        return json.dumps({"owner": self.owner, "token": self.token, "fence": self.fence,
                           "expires_at": self.expires_at, "released": released, "host": socket.gethostname(),
                           "pid": os.getpid()}).encode()

    def _read(self) -> Optional[dict]:
        """The lock JSON plus its version "_tag", or None when there is no lock object."""
        got = read_versioned(self.loc)
        if got is None:
            return None
        data = _parse(got.data, self.loc.uri)
        data["_tag"] = got.tag
        return data


def _parse(body: bytes, uri: str) -> dict:
    try:
        data = json.loads(body)
        out = {"owner": str(data["owner"]), "token": str(data["token"]), "expires_at": float(data["expires_at"]),
               "fence": int(data.get("fence", 0)), "released": bool(data.get("released", False))}
        if isinstance(data.get("host"), str) and isinstance(data.get("pid"), int):
            out["host"], out["pid"] = data["host"], data["pid"]
        return out
    except (ValueError, KeyError, TypeError):
        # An unreadable lock blocks nobody forever: treat it as expired.
        log.warning("lock object %s is not valid lock JSON; treating it as expired", uri)
        return {"owner": "<unreadable lock>", "token": "", "expires_at": 0.0, "fence": 0, "released": False}
