"""Shared command-line plumbing for the thin scripts in jobs/."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from sscq_dist.errors import SSCQError

# Exit codes the jobs share (promote adds its own: promoted / rejected).
EXIT_OK = 0
EXIT_ERROR = 2


def setup_logging() -> None:
    # Periodic progress lines come from our jobs; per-file download bars only flood job logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=os.environ.get("SSCQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Libraries that are chatty at INFO.
    for name in ("botocore", "s3fs", "urllib3", "aiobotocore", "alembic", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs store errors with a full traceback before raising them; jobs report
    # the error themselves in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="configs/digits.yaml", help="YAML config file (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    return p


def run_main(main: Callable[[], int]) -> None:
    """Run a job; a known error is one line on stderr and exit code 2, never a bare traceback."""
    setup_logging()
    try:
        code = main()
    except SSCQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # an unexpected failure still ends in one line (SSCQ_DEBUG=1: traceback)
        if os.environ.get("SSCQ_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(exc).__name__}: {first} (set SSCQ_DEBUG=1 for the traceback)", file=sys.stderr)
        code = EXIT_ERROR
    sys.exit(code or 0)
