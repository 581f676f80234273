"""Which snapshots a partition replica holds, and the hot swap between them (SPEC section 7).

A replica loads the snapshot CURRENT names at start. A watcher re-reads CURRENT every
`watch_interval_s`; a new name is loaded BESIDE the one serving (its own Partition object),
then becomes current in one assignment. Requests name the snapshot they were pinned to by
the ingress, so an answer never mixes two snapshots; a replaced snapshot stays loaded until
`retain_previous_s` after its last request (requests in flight keep their Partition object
alive anyway: Python frees it only when the last reference goes). A name a request asks for
that is not held (a restarted replica, a slower watcher) is loaded on demand, and the
request gets a 'not ready' answer meanwhile, never a partial one.

Like Ray Serve's model multiplexing: snapshots load by name, single-flight (a second caller
of a name being loaded waits for the same load, it never starts another), with a bound on
how many are held. A new snapshot is loaded incrementally: the parts it shares with a held
one (the one serving, by preference) are taken from memory, only the others are read. The
cache folder is pruned to `cache_max_bytes` after every load and release, keeping the files
of the parts held snapshots use.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

from sscq_dist.errors import SSCQError
from sscq_dist.failpoints import failpoint
from sscq_dist.indexing.formats import read_current, read_snapshot
from sscq_dist.indexing.leases import ReaderLease, default_replica_id
from sscq_dist.serving.cache import prune_cache
from sscq_dist.serving.partition import Partition, load_partition
from sscq_dist.serving.planner import plan_partitions
from sscq_dist.storage import Location

log = logging.getLogger(__name__)

# A replica holds at most this many snapshots (current, previous, one loading): bounded memory.
MAX_HELD = 3
# A snapshot whose load failed is tried again on demand after this long.
RETRY_FAILED_S = 10.0


class NotReady(Exception):
    """This replica does not hold the requested snapshot (yet); the message says why."""


@dataclass
class HolderStatus:
    current: Optional[str]
    held: list[str]
    loading: list[str]
    last_error: Optional[str]
    rows: dict = field(default_factory=dict)
    waiting: dict = field(default_factory=dict)  # name -> callers waiting for its load in flight


class SnapshotHolder:
    """Loads partition `number` of `of` for the snapshots a replica must serve.

    loader(root, snapshot, parts, number, of, cache_dir, nprobe, previous) -> Partition;
    cache_max_bytes: the cache folder's bound (None: not pruned).
    """

    def __init__(self, root: Location, number: int, of: int, cache_dir: Optional[str], nprobe: Optional[int],
                 retain_previous_s: float, loader: Optional[Callable[..., Partition]] = None,
                 cache_max_bytes: Optional[int] = None):
        self.root = root
        self.number, self.of = number, of
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes
        self.nprobe = nprobe
        self.retain_previous_s = retain_previous_s
        self._load = loader or (lambda root, snap, parts, i, n, cache, nprobe, previous:
                                load_partition(root, snap, parts, i, n, cache, nprobe, previous=previous))
        self._lock = threading.Lock()
        self._held: dict[str, Partition] = {}
        self._last_used: dict[str, float] = {}
        self._loading: dict[str, Future] = {}  # name -> its one load in flight
        self._waiting: dict[str, int] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # name -> (reason, when) of its last failed load
        self.current: Optional[str] = None
        self.last_error: Optional[str] = None
        # Garbage collection keeps what this replica holds while the lease is renewed (each watch).
        self.lease = ReaderLease(root, default_replica_id(f"partition{number}of{of}"))

    # ------------------------------------------------------------------ loading

    def load(self, name: str) -> Partition:
        """Load `name` (if not held) in this thread, or wait for the load of it in flight;
        returns the held Partition (or raises what that load raised)."""
        with self._lock:
            if name in self._held:
                return self._held[name]
            flight = self._loading.get(name)
            if flight is None:
                if len(self._held) + len(self._loading) >= MAX_HELD:
                    raise NotReady(f"partition {self.number + 1}/{self.of} already holds {len(self._held)} snapshots "
                                   f"and loads {len(self._loading)}; not loading {name}")
                flight = self._loading[name] = Future()
                owner = True
            else:
                self._waiting[name] = self._waiting.get(name, 0) + 1
                owner = False
        if not owner:
            try:
                return flight.result()
            finally:
                with self._lock:
                    self._waiting[name] -= 1
                    if not self._waiting[name]:
                        del self._waiting[name]
        try:
            part = self._load_snapshot(name)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
            with self._lock:
                del self._loading[name]
                self._failed[name] = (reason, time.monotonic())
                self.last_error = f"loading {name}: {reason}"
            log.error("partition %d/%d: cannot load snapshot %s: %s", self.number + 1, self.of, name, reason)
            flight.set_exception(exc)
            raise
        with self._lock:
            del self._loading[name]
            self._failed.pop(name, None)
            self._held[name] = part
            self._last_used[name] = time.monotonic()
        flight.set_result(part)
        self.prune_cache()
        return part

    def _load_snapshot(self, name: str) -> Partition:
        failpoint("serving.load_snapshot")  # tests: hold a replica on what it serves (GC under leases)
        snap = read_snapshot(self.root, name)
        parts = plan_partitions(snap.parts, self.of)[self.number]
        return self._load(self.root, snap, parts, self.number, self.of, self.cache_dir, self.nprobe,
                          self._share_from(parts))

    def _share_from(self, parts: list) -> Optional[Partition]:
        """The held partition sharing the most of `parts` (the current one on a tie), or None."""
        names = {e.part for e in parts}
        with self._lock:
            held = sorted(self._held.items(), key=lambda kv: kv[0] != self.current)
        best, best_n = None, 0
        for _, part in held:
            n = sum(1 for e in part.parts if e.part in names)
            if n > best_n:
                best, best_n = part, n
        return best

    def prune_cache(self):
        """Bound the cache folder, keeping what held snapshots use; None without a cache or
        bound, or while a load is in flight (its files are not known yet: it prunes when done)."""
        if not self.cache_dir or self.cache_max_bytes is None:
            return None
        with self._lock:
            if self._loading:
                return None
            in_use = set().union(*(p.cache_files() for p in self._held.values())) if self._held else set()
        return prune_cache(self.cache_dir, self.cache_max_bytes, in_use)

    def load_current(self) -> Optional[str]:
        """Read CURRENT; load what it names beside what serves, then make it current."""
        name = read_current(self.root)
        if name is None:
            raise SSCQError(f"index root {self.root.uri} has no CURRENT; run a reindex first")
        if name != self.current:
            self.load(name)
            with self._lock:
                previous, self.current = self.current, name
                self._last_used[name] = time.monotonic()
                if previous is not None:
                    self._last_used[previous] = time.monotonic()  # its grace period starts now
                self.last_error = None
            log.info("partition %d/%d: now serving %s (previous %s)", self.number + 1, self.of, name, previous)
        self.evict()
        self.lease.renew([name, *self.status().held])
        return name

    def evict(self) -> list[str]:
        """Drop snapshots other than the current one unused for retain_previous_s."""
        now = time.monotonic()
        dropped = []
        with self._lock:
            for name in list(self._held):
                if name != self.current and now - self._last_used.get(name, 0.0) > self.retain_previous_s:
                    del self._held[name]  # freed when the last in-flight request lets go of it
                    self._last_used.pop(name, None)
                    dropped.append(name)
        for name in dropped:
            log.info("partition %d/%d: released snapshot %s", self.number + 1, self.of, name)
        if dropped:
            self.prune_cache()
        return dropped

    # ------------------------------------------------------------------ serving

    def get(self, name: str, load_async: Callable[[str], None]) -> Partition:
        """The held Partition of `name`, or NotReady (and a background load is started)."""
        with self._lock:
            part = self._held.get(name)
            if part is not None:
                self._last_used[name] = time.monotonic()
                return part
            loading = name in self._loading
            failed = self._failed.get(name)
        where = f"partition {self.number + 1}/{self.of}"
        if loading:
            raise NotReady(f"{where} is still loading snapshot {name}")
        if failed and time.monotonic() - failed[1] < RETRY_FAILED_S:
            raise NotReady(f"{where} cannot load snapshot {name}: {failed[0]}")
        load_async(name)
        raise NotReady(f"{where} does not hold snapshot {name} yet; loading it")

    def status(self) -> HolderStatus:
        with self._lock:
            return HolderStatus(self.current, sorted(self._held), sorted(self._loading), self.last_error,
                                {n: p.ntotal for n, p in self._held.items()}, dict(self._waiting))
