"""Named fault-injection points for the reliability tests (in the style of etcd/TiKV failpoints).

A point does nothing unless the environment variable SSCQ_FAILPOINTS names it, e.g.
`SSCQ_FAILPOINTS="reindex.after_snapshot=kill"`. Actions:
- `kill`: SIGKILL this process right here (a real crash at an exact step);
- `sleep(S)`: pause S seconds (lets a test act, e.g. take the lock over, at that step);
- `oserror_once(PATH)`: the first caller that creates PATH raises OSError (a transient storage
  error); later callers pass through.
- `pause(DIR)`: create `DIR/<name>.reached`, then wait until the test creates
  `DIR/<name>.release` (the test acts at that exact step, e.g. takes the lock over, with no
  wall-clock race; files work across processes). A point never released raises after
  PAUSE_LIMIT_S instead of hanging its job.
- `pause_once(DIR)`: the same for the first caller in any process only; later callers pass
  through (a race: one writer stops at the step while another goes past it).
Production runs never set the variable; the cost of an unset point is one dict lookup.
"""

from __future__ import annotations

import os
import re
import signal
import time

ENV = "SSCQ_FAILPOINTS"
_SLEEP = re.compile(r"^sleep\((\d+(?:\.\d+)?)\)$")
_OSERROR_ONCE = re.compile(r"^oserror_once\((.+)\)$")
_PAUSE = re.compile(r"^pause(_once)?\((.+)\)$")
PAUSE_LIMIT_S = 900.0
_PAUSE_POLL_S = 0.02


def forwarded_env() -> dict[str, str]:
    """{ENV: spec} when this process has failpoints set, else {}: what a deployer hands to the
    processes it starts (Serve replicas), which do not inherit its environment."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}


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
    m = _OSERROR_ONCE.match(action)
    if m:
        try:
            os.close(os.open(m.group(1), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        raise OSError(f"failpoint {name}: injected transient error")
    m = _PAUSE.match(action)
    if m:
        _pause(name, m.group(2), once=bool(m.group(1)))
        return
    raise ValueError(f"{ENV}: unknown action {action!r} for failpoint {name!r} "
                     "(kill, sleep(S), pause(DIR), pause_once(DIR) or oserror_once(PATH))")


def _pause(name: str, folder: str, once: bool) -> None:
    os.makedirs(folder, exist_ok=True)
    if once:
        try:  # O_EXCL: exactly one caller, in any process, claims the point
            os.close(os.open(os.path.join(folder, f"{name}.claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    with open(os.path.join(folder, f"{name}.reached"), "w") as f:
        f.write(str(os.getpid()))
    release = os.path.join(folder, f"{name}.release")
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise RuntimeError(f"failpoint {name!r} was not released within {PAUSE_LIMIT_S:.0f}s ({release})")
        time.sleep(_PAUSE_POLL_S)
