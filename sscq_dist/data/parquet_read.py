"""`ray.data.read_parquet` with Ray Data's footer-reader pool sized by the file count.

Ray Data 2.60 reads each file's footer again before the read, on a pool of `FooterReader`
actors: 32 by default, whatever the file count. Each actor is a worker process (~1.2 CPU-s to
start), so a 3-shard read started up to 32 processes for three footers (91 of them in one test
suite run, BENCHMARKS.md "Test suite time"). One actor per FILES_PER_FOOTER_ACTOR files, up to
Ray's own 32, keeps large reads as parallel as before and small ones to one process. The pool
size is read from the environment when `read_parquet` builds its plan, in this process.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
MAX_FOOTER_ACTORS = 32  # Ray Data's default pool size
FILES_PER_FOOTER_ACTOR = 256


def footer_actors(n_files: int) -> int:
    return max(1, min(MAX_FOOTER_ACTORS, math.ceil(n_files / FILES_PER_FOOTER_ACTOR)))


def read_parquet_files(paths: Sequence[str], filesystem, **kwargs) -> "ray.data.Dataset":  # noqa: F821
    """ray.data.read_parquet(paths, filesystem=..., **kwargs); a pool size the user set in the
    environment is kept."""
    import ray.data

    ours = FOOTER_ACTORS_ENV not in os.environ
    if ours:
        os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(len(paths)))
    try:
        return ray.data.read_parquet(list(paths), filesystem=filesystem, **kwargs)
    finally:
        if ours:
            os.environ.pop(FOOTER_ACTORS_ENV, None)
