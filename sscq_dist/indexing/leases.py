"""Reader leases: a serving replica names the snapshots it holds, and garbage collection keeps them.

    <root>/leases/<replica>.json   {"replica", "snapshots": ["<version>/<gen>", ...], "expires_at", "renewed_at"}

A replica renews its lease whenever it (re)reads CURRENT (`ReaderLease.renew`), so a live
replica's lease never lapses; a dead replica's lapses after `ttl_s` and GC then forgets it
(and deletes the lease object once it is older than GC's grace period). Expiry compares the
replica's clock with GC's: keep ttl_s well above any clock skew between machines.
A lease write that fails is logged and retried at the next renewal: serving never waits on it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from sscq_dist import storage
from sscq_dist.errors import IndexError_
from sscq_dist.records import parse_json_record, record_json
from sscq_dist.storage import Location

log = logging.getLogger(__name__)

LEASES_DIR = "leases"
DEFAULT_TTL_S = 900.0
_ID_RE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class LeaseRecord:
    replica: str
    snapshots: list[str] = field(default_factory=list)
    expires_at: float = 0.0
    renewed_at: float = 0.0


def lease_loc(root: Location, replica: str) -> Location:
    return root.join(LEASES_DIR, f"{replica}.json")


def default_replica_id(role: str) -> str:
    """'<role>-<host>-<pid>-<6 hex>': unique per process, readable in a listing."""
    raw = f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return _ID_RE.sub("_", raw)[:120]


class ReaderLease:
    """The lease of one serving replica on the snapshots it holds.

    root: index root; replica: a unique id (default_replica_id); ttl_s: how long a renewal
    keeps the snapshots from GC.
    """

    def __init__(self, root: Location, replica: str, ttl_s: float = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise ValueError(f"reader lease ttl_s must be > 0, got {ttl_s}")
        self.root, self.replica, self.ttl_s = root, _ID_RE.sub("_", replica), float(ttl_s)
        self.loc = lease_loc(root, self.replica)
        self.snapshots: list[str] = []

    def renew(self, snapshots: list[str]) -> bool:
        """Write the lease naming `snapshots` until now + ttl_s; False (logged) when storage refused."""
        names = sorted({s for s in snapshots if s})
        rec = LeaseRecord(self.replica, names, time.time() + self.ttl_s, time.time())
        try:
            storage.atomic_write_bytes(self.loc, record_json(rec))
        except Exception as exc:  # noqa: BLE001 - serving goes on; the next renewal tries again
            log.warning("reader lease %s not renewed: %s", self.loc.uri, str(exc).splitlines()[0][:200])
            return False
        self.snapshots = names
        return True

    def release(self) -> None:
        try:
            storage.delete(self.loc)
        except Exception as exc:  # noqa: BLE001 - it lapses after ttl_s anyway
            log.warning("reader lease %s not released: %s", self.loc.uri, str(exc).splitlines()[0][:200])


def read_leases(root: Location) -> list[tuple[Location, LeaseRecord]]:
    """Every lease object under <root>/leases (one LIST, one small read each); unreadable ones are skipped."""
    out = []
    for info in storage.list_files(root.join(LEASES_DIR), ".json"):
        loc = root.join(LEASES_DIR, info.base_name)
        try:
            rec = parse_json_record(LeaseRecord, storage.read_bytes(loc), loc.uri, IndexError_)
        except (IndexError_, storage.NotFound) as exc:
            log.warning("ignoring reader lease %s: %s", loc.uri, exc)
            continue
        out.append((loc, rec))
    return out


def leased_snapshots(leases: list[tuple[Location, LeaseRecord]], now: Optional[float] = None) -> dict[str, str]:
    """snapshot name -> a replica holding an unexpired lease on it."""
    now = time.time() if now is None else now
    return {s: rec.replica for _, rec in leases if rec.expires_at > now for s in rec.snapshots}

