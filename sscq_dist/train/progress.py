"""Training progress on the operator's terminal.

The workers' own output (every `[train]` line, DeepSpeed, Ray Train) reaches the driver
through Ray's log forwarding, which a quiet job sends to its log file. The few lines the
operator should see travel separately: rank 0 puts them on a Ray queue (`WorkerConsole`,
throttled to one per `every_s` plus the ones that must show: resume, last epoch) and a
driver thread prints them (`ProgressRelay`). A lost line never fails training.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from sscq_dist.console import CONSOLE

log = logging.getLogger(__name__)
# At most one progress line per this many seconds on the terminal (the log file has every one).
EVERY_S = 30.0


class ProgressRelay:
    """Driver side: a queue the workers write to and a thread that prints what arrives."""

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="train-progress", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                CONSOLE.line(self.queue.get(timeout=1.0))
            except Empty:
                continue
            except Exception as exc:  # noqa: BLE001 - the queue actor is gone; progress is best effort
                log.debug("progress relay stopped: %s", exc)
                return

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            while not self.queue.empty():
                CONSOLE.line(self.queue.get_nowait())
        except Exception:  # noqa: BLE001
            pass
        ray.kill(self.queue.actor)


class WorkerConsole:
    """Worker side (rank 0 only): throttled lines for the driver's terminal."""

    def __init__(self, q: Optional[Any], every_s: float = EVERY_S):
        self.q, self.every_s = q, every_s
        self._last = float("-inf")

    def line(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.q is None or not (force or now - self._last >= self.every_s):
            return
        self._last = now
        try:
            self.q.put_nowait(text)
        except Exception:  # noqa: BLE001 - never fail a training step over a progress line (full queue too)
            pass
