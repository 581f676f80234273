"""The command line: `sscq <job> ...` and the thin `jobs/<job>.py` scripts share one parser per job.

Every job runs the same way (`execute`): parse, refuse bad URIs, load the typed config, then
run inside a quiet session (sscq_dist.console) so the terminal gets stage headers, progress,
warnings that need action and the summary, and the libraries' output goes to a log file.
A known error is one `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Callable, Optional, Sequence

from sscq_dist.commands import PIPELINE
from sscq_dist.errors import SSCQError

# Exit codes the jobs share (promote adds its own: promoted / rejected).
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_CONFIG = "configs/digits.yaml"
LOG_SUBDIR = "logs"

log = logging.getLogger(__name__)


def command(name: str) -> ModuleType:
    return importlib.import_module(f"sscq_dist.commands.{name}")


def _summary(mod: ModuleType) -> str:
    """The docstring's first sentence, without its usage example."""
    return (mod.__doc__ or "").strip().splitlines()[0].split(": `")[0].rstrip(".")


def add_job_arguments(p: argparse.ArgumentParser, mod: ModuleType) -> None:
    """The job's own flags, then the ones every job shares (config, overrides, --verbose)."""
    mod.add_arguments(p)
    default = getattr(mod, "CONFIG_DEFAULT", DEFAULT_CONFIG)
    p.add_argument("--config", default=default,
                   help="YAML config file (default: %(default)s)" if default else
                   "YAML config file (storage section: endpoint, timeouts, retries)")
    p.add_argument("--verbose", action="store_true",
                   help="show every library's output on the terminal (default: only in the job's log file)")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")


def job_parser(name: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    mod = command(name)
    p = argparse.ArgumentParser(prog=prog, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p, mod)
    return p


def main_parser() -> argparse.ArgumentParser:
    """`sscq`: the pipeline's jobs, in the order they run."""
    p = argparse.ArgumentParser(
        prog="sscq", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="sscq-dist: train SSCQ image-retrieval quantizers on Ray and serve them.\n\n"
                    "The pipeline, in order: " + " -> ".join(PIPELINE[:-1]) + " (`sscq demo` runs all of them).",
        epilog="`sscq <job> --help` shows a job's flags. The same jobs run on a cluster as\n"
               "`ray job submit --working-dir . -- python jobs/<job>.py ...`.")
    sub = p.add_subparsers(dest="job", required=True, metavar="<job>")
    for name in PIPELINE:
        mod = command(name)
        sp = sub.add_parser(name, help=_summary(mod), description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        add_job_arguments(sp, mod)
    return p


def execute(name: str, a: argparse.Namespace) -> int:
    """Run job `name` with parsed arguments; returns the exit code (errors become one line)."""
    from sscq_dist.config import load_config
    from sscq_dist.console import CONSOLE, quiet_session

    mod = command(name)
    try:
        if hasattr(mod, "check_args"):
            mod.check_args(a)
        extra = mod.config_overrides(a) if hasattr(mod, "config_overrides") else []
        cfg = load_config(a.config, [*a.overrides, *extra])
        with quiet_session(name, os.path.join(cfg.tracking.output_dir, LOG_SUBDIR), a.verbose):
            try:
                return mod.run(a, cfg) or EXIT_OK
            except BaseException:
                if CONSOLE.quiet:  # the traceback goes to the log file; the terminal gets one line
                    log.exception("%s failed", name)
                raise
            finally:
                _disconnect_ray()
    except SSCQError as exc:
        return _error(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return _error("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # an unexpected failure still ends in one line (SSCQ_DEBUG=1: traceback)
        if os.environ.get("SSCQ_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return _error(f"{type(exc).__name__}: {first} (set SSCQ_DEBUG=1 for the traceback)", EXIT_ERROR)


def _error(text: str, code: int) -> int:
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code


def _disconnect_ray() -> None:
    """Shut Ray down inside the session, so its exit chatter lands in the log file too."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def run_job(name: str) -> None:
    """Entry point of `jobs/<name>.py` (what `ray job submit` runs)."""
    sys.exit(execute(name, job_parser(name, prog=f"jobs/{name}.py").parse_args()))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the `sscq` console script."""
    a = main_parser().parse_args(argv)
    sys.exit(execute(a.job, a))


def run_main(main_fn: Callable[[], int]) -> None:
    """For the benchmarks' scripts: logging to stderr; a known error is one line and exit code 2."""
    logging.basicConfig(level=os.environ.get("SSCQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = main_fn()
    except SSCQError as exc:
        code = _error(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        code = _error("interrupted", EXIT_INTERRUPTED)
    sys.exit(code or 0)
