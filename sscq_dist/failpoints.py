"""Named fault-injection points for the reliability tests (in the style of etcd/TiKV failpoints).

A point does nothing unless the environment variable SSCQ_FAILPOINTS names it, e.g.
`SSCQ_FAILPOINTS="reindex.after_snapshot=kill"`. Actions:
- `kill`: SIGKILL this process right here (a real crash at an exact step);
- `sleep(S)`: pause S seconds (lets a test act, e.g. take the lock over, at that step);
- `wait(PATH)`: the first caller in any process creates PATH.reached and waits (at most 120 s)
  until PATH exists; later callers pass through. Orders a race by files, not by sleeps;
- `oserror_once(PATH)`: the first caller that creates PATH raises OSError (a transient storage
  error); later callers pass through.
Production runs never set the variable; the cost of an unset point is one dict lookup.
"""

from __future__ import annotations

import os
import re
import signal
import time

ENV = "SSCQ_FAILPOINTS"
_SLEEP = re.compile(r"^sleep\((\d+(?:\.\d+)?)\)$")
_WAIT = re.compile(r"^wait\((.+)\)$")
_OSERROR_ONCE = re.compile(r"^oserror_once\((.+)\)$")
WAIT_LIMIT_S = 120.0


def _actions() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


def failpoint(name: str) -> None:
    """Run the action configured for `name`, if any."""
    action = _actions().get(name) if ENV in os.environ else None
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    m = _SLEEP.match(action)
    if m:
        time.sleep(float(m.group(1)))
        return
    m = _WAIT.match(action)
    if m:
        _wait_for_file(m.group(1))
        return
    m = _OSERROR_ONCE.match(action)
    if m:
        try:
            os.close(os.open(m.group(1), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        raise OSError(f"failpoint {name}: injected transient error")
    raise ValueError(f"{ENV}: unknown action {action!r} for failpoint {name!r} (kill, sleep(S), wait(PATH) or oserror_once(PATH))")


def _wait_for_file(path: str) -> None:
    try:
        os.close(os.open(path + ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # another caller holds this point
    with open(path + ".reached", "w"):
        pass
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
