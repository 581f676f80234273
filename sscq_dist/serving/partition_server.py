"""The partition deployment: one share of the parts of the snapshots a replica holds
(holder.py), searched for the ingress (SPEC section 7)."""

import asyncio
import logging
import os
import threading

import numpy as np
from ray import serve

from sscq_dist import storage
from sscq_dist.config import Config
from sscq_dist.serving.holder import NotReady, SnapshotHolder
from sscq_dist.serving.runtime import apply_runtime, reason as _reason

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- partitions


@serve.deployment
class PartitionServer:
    """One partition of whatever snapshot a request names (see holder.py)."""

    async def __init__(self, number: int, of: int, index_root: str, cfg: Config):
        import faiss

        self.sv = cfg.serve
        faiss.omp_set_num_threads(self.sv.search_threads)
        self.holder = SnapshotHolder(storage.resolve(index_root, cfg.storage), number, of, self.sv.cache_dir,
                                     self.sv.nprobe, self.sv.retain_previous_s,
                                     cache_max_bytes=self.sv.cache_max_bytes)
        await asyncio.to_thread(self.holder.load_current)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def reconfigure(self, user_config: dict) -> None:
        self.sv = apply_runtime(self.sv, user_config)
        self.holder.retain_previous_s = self.sv.retain_previous_s
        if self.sv.nprobe is not None and self.sv.nprobe != self.holder.nprobe:
            from sscq_dist.indexing.faiss_index import set_nprobe

            self.holder.nprobe = self.sv.nprobe
            for part in list(self.holder._held.values()):
                if part.index is not None:
                    set_nprobe(part.index, self.sv.nprobe)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.sv.watch_interval_s)
            try:
                await asyncio.to_thread(self.holder.load_current)
            except Exception as exc:  # keep serving what is held; the error shows in status()
                self.holder.last_error = _reason(exc)
                log.error("partition %d/%d: watcher: %s", self.holder.number + 1, self.holder.of, self.holder.last_error)

    def _load_in_background(self, name: str) -> None:
        threading.Thread(target=self._load_quietly, args=(name,), daemon=True).start()

    def _load_quietly(self, name: str) -> None:
        try:
            self.holder.load(name)
        except Exception:
            pass  # recorded by the holder; the next request for it reports the reason

    # Sync methods run in Serve's thread pool; FAISS releases the GIL while it scans.
    def search(self, name: str, queries: np.ndarray, k: int) -> dict:
        try:
            part = self.holder.get(name, self._load_in_background)
        except NotReady as exc:
            return {"ok": False, "reason": str(exc)}
        hits = part.search(queries, k)
        infos = part.row_info(hits.positions)
        return {"ok": True, "distances": hits.distances, "ids": hits.ids, "info": [i.as_tuple() for i in infos]}

    def locate(self, name: str, ids: list[int]) -> dict:
        try:
            part = self.holder.get(name, self._load_in_background)
        except NotReady as exc:
            return {"ok": False, "reason": str(exc)}
        pos = part.positions_of(np.asarray(ids, np.int64))
        return {"ok": True, "info": [i.as_tuple() if p >= 0 else None for p, i in zip(pos.tolist(), part.row_info(pos))]}

    def sample(self, name: str, n: int) -> dict:
        try:
            part = self.holder.get(name, self._load_in_background)
        except NotReady as exc:
            return {"ok": False, "reason": str(exc)}
        if part.ntotal == 0:
            return {"ok": True, "ids": []}
        pos = np.unique(np.linspace(0, part.ntotal - 1, num=min(n, part.ntotal)).astype(np.int64))
        return {"ok": True, "ids": part.ids[pos].tolist()}

    def prepare(self, name: str) -> dict:
        """Load `name` beside what serves (the ingress calls this before it moves its pin)."""
        try:
            part = self.holder.load(name)
        except Exception as exc:
            return {"ok": False, "reason": _reason(exc)}
        return {"ok": True, "rows": part.ntotal}

    def status(self) -> dict:
        s = self.holder.status()
        return {"partition": self.holder.number, "current": s.current, "held": s.held, "loading": s.loading,
                "rows": s.rows, "last_error": s.last_error}

    def memory(self, name: str) -> dict:
        """Bytes held for `name` by structure, and this process's resident set (benchmarks)."""
        import psutil

        part = self.holder.get(name, self._load_in_background)
        return {**part.resident_bytes(), "rss": psutil.Process().memory_info().rss, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()
