"""The whole pipeline on embedded defaults: `sscq demo` (what `make demo` runs).

ingest -> train -> evaluate -> promote -> reindex -> search -> serve, all local (a data
folder, a SQLite MLflow store, a local Ray); prints one summary.
"""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.demo import run_demo

    run_demo(cfg)
    return 0
