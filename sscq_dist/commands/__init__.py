"""One module per job, in pipeline order; `sscq <job>` and `jobs/<job>.py` share their parsers.

Each module: a docstring (its help), `add_arguments(parser)`, `run(args, cfg) -> exit code`,
and optionally `config_overrides(args)` (flags that are shorthands for config keys). Modules
import the heavy libraries inside `run`, so `sscq --help` stays fast.
"""

PIPELINE = ("ingest", "train", "evaluate", "promote", "reindex", "gc", "search", "serve", "demo")
