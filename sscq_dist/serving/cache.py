"""The local cache folder of part files, bounded in bytes, least recently used first out.

Files live at `<cache_dir>/<version>/<size>-<name>`; a hit refreshes the file's mtime, so
mtime order is use order, and the folder is its own index: replicas of one machine that
share the folder see each other's use, and a restarted replica finds its files again.
`prune_cache` deletes the least recently used files until the folder fits its budget,
never a file a held generation uses (the caller names those) nor a download in progress.
Files another process still maps stay readable after their deletion (POSIX), so a replica
that prunes cannot break another one's held generation; that one re-fetches on its next load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Prefix of a download being written (renamed into place when whole); never pruned.
TEMP_PREFIX = ".part-"


def cache_path(cache_dir: str, version: str, name: str, size: int) -> str:
    """Local path of a cached file: a new version or a rewritten file of another size never hits an old entry."""
    return os.path.join(cache_dir, version, f"{size}-{name.replace('/', '_')}")


def touch(path: str) -> None:
    """Mark a cached file as just used (its mtime is its place in the LRU order)."""
    try:
        os.utime(path)
    except FileNotFoundError:  # pruned by another replica meanwhile: the caller reads or fetches anew
        pass


@dataclass
class PruneResult:
    """What a prune left and removed: bytes and file counts; over_budget when the files in
    use alone exceed the budget (they stay: a held generation needs them)."""

    kept_bytes: int
    kept_files: int
    removed_bytes: int
    removed_files: int
    over_budget: bool


def prune_cache(cache_dir: str, max_bytes: int, in_use: set[str]) -> PruneResult:
    """Delete least recently used files under cache_dir until it holds <= max_bytes.

    in_use: paths of files that held generations use (compared as absolute paths); never deleted.
    """
    keep = {os.path.abspath(p) for p in in_use}
    files = []  # (mtime, size, path) of every evictable file
    total = pinned = count = 0
    for folder, _, names in os.walk(cache_dir):
        for name in names:
            if name.startswith(TEMP_PREFIX):
                continue
            path = os.path.abspath(os.path.join(folder, name))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            total += st.st_size
            count += 1
            if path in keep:
                pinned += st.st_size
            else:
                files.append((st.st_mtime, st.st_size, path))
    files.sort()
    removed_bytes = removed = 0
    for _, size, path in files:
        if total - removed_bytes <= max_bytes:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        removed_bytes += size
        removed += 1
    kept = total - removed_bytes
    if kept > max_bytes:
        log.warning("cache %s: the files held generations use take %d bytes, over its %d-byte bound",
                    cache_dir, pinned, max_bytes)
    return PruneResult(kept, count - removed, removed_bytes, removed, kept > max_bytes)
