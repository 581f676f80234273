"""What a job shows the operator, and where everything else goes.

Quiet by default (`quiet_session`): the terminal gets stage headers, periodic progress lines,
warnings that need the operator's action, the summary and the single `error: ...` line. Every
other byte any library writes - Ray and Ray Data (Python loggers, C++ core-worker lines,
forwarded worker output), DeepSpeed, MLflow, Python warnings - goes to a log file under the
run's output directory, whose path is printed once. The redirection is at the file-descriptor
level (fds 1 and 2 point at the log file; the console keeps duplicates of the terminal's),
so even output written by native code or by child processes lands in the file.
`--verbose` (or SSCQ_VERBOSE=1) shows everything on the terminal, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import IO, Iterator, Optional

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that are chatty at INFO even in the log file.
NOISY_LOGGERS = ("botocore", "s3fs", "urllib3", "aiobotocore", "alembic", "filelock")


class Console:
    """The operator's terminal: the terminal's duplicated fds in a quiet session, else sys.stdout/stderr."""

    def __init__(self):
        self.term_out: Optional[IO[str]] = None
        self.term_err: Optional[IO[str]] = None
        self.log_path: Optional[str] = None

    @property
    def quiet(self) -> bool:
        """In a quiet session: library output goes to the log file, not to the terminal."""
        return self.term_out is not None

    @property
    def out(self) -> IO[str]:
        return self.term_out or sys.stdout

    @property
    def err(self) -> IO[str]:
        return self.term_err or sys.stderr

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def stage(self, name: str) -> None:
        self.line(f"\n=== {name} ===")

    def warn(self, text: str) -> None:
        print(f"warning: {text}", file=self.err, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.err, flush=True)


CONSOLE = Console()


class Progress:
    """Periodic progress lines for long work: at most one every `every_s` seconds, plus the last.

    Lines, not a redrawn bar, so job logs and CI output stay readable.
    """

    def __init__(self, what: str, total: Optional[int] = None, unit: str = "", every_s: float = 10.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.t0 = self._last = time.perf_counter()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(extra)

    def close(self, extra: str = "") -> None:
        self._emit(extra)

    def _emit(self, extra: str) -> None:
        rate = self.done / max(1e-9, time.perf_counter() - self.t0)
        of = f"/{self.total}" if self.total is not None else ""
        CONSOLE.line(f"[{self.what}] {self.done}{of} {self.unit} ({rate:.0f}/s){'; ' + extra if extra else ''}")


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("SSCQ_VERBOSE", "") not in ("", "0")


def _configure_logging(stream: IO[str], level: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs store errors with a traceback before raising them; jobs report them in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.captureWarnings(True)


class _OperatorWarnings(logging.Handler):
    """Our own package's WARNING+ records also reach the terminal (they ask for the operator's action)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING and record.name.startswith("sscq_dist"):
            CONSOLE.warn(record.getMessage())


@contextlib.contextmanager
def quiet_session(job: str, log_dir: str, verbose: bool = False) -> Iterator[Optional[str]]:
    """Route library output to `<log_dir>/<job>-<time>.log` (returns its path), or nowhere when verbose."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    level = os.environ.get("SSCQ_LOG_LEVEL", "INFO")
    if verbose_requested(verbose):
        _configure_logging(sys.stderr, level)
        yield None
        return
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(log_dir, f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"))
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    term_out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    term_err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    old_streams = (CONSOLE.term_out, CONSOLE.term_err)
    CONSOLE.term_out, CONSOLE.term_err, CONSOLE.log_path = term_out, term_err, path
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    _configure_logging(sys.stderr, level)
    logging.getLogger().addHandler(_OperatorWarnings())
    CONSOLE.line(f"log: {path}")
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        CONSOLE.term_out, CONSOLE.term_err = old_streams
        term_out.close()
        term_err.close()
