"""What every benchmark does before it measures: image shards on disk and a local Ray.

Data sets (SPEC section 5, all offline):
- `fashion_mnist`: the Debian package's IDX files ingested once to <data_dir>/{train,test}
  (60,000 / 10,000 rows);
- `digits`: scikit-learn's bundled digits ingested to <data_dir>/{train,test} (1,500 / 297);
- `replicate_digits`: the digits repeated to any row count (ids offset per copy), for
  throughput runs that need more rows than the 1,797 real images.

Derived splits (validation hold-out, subsets) are written once beside the source shards
and reused when a marker file with the same parameters is present.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from sscq_dist.errors import SSCQError  # noqa: E402

SOURCES = ("fashion_mnist", "digits")
# Rows per Parquet shard of the derived splits (Fashion-MNIST train -> 6 shards).
ROWS_PER_SHARD = 10_000
MARKER = ".bench_split.json"
# Default config per data set (the digits are trained at their native 8 px).
DEFAULT_CONFIGS = {"fashion_mnist": "configs/fashion_mnist.yaml", "digits": "configs/digits.yaml"}


def default_config(source: str) -> str:
    return os.path.join(REPO, DEFAULT_CONFIGS[source])


def ensure_source(source: str, data_dir: Optional[str] = None) -> tuple[str, str]:
    """Ingest `source` under data_dir (default data/<source>) if its shards are missing;
    returns (train_uri, test_uri)."""
    from sscq_dist.data.schema import shard_files
    from sscq_dist.ingest import ingest
    from sscq_dist.storage import resolve

    if source not in SOURCES:
        raise SSCQError(f"unknown data source {source!r} (choose from {', '.join(SOURCES)})")
    data_dir = data_dir or os.path.join(REPO, "data", source)
    train, test = os.path.join(data_dir, "train"), os.path.join(data_dir, "test")
    if not all(os.path.isdir(d) and shard_files(resolve(d)) for d in (train, test)):
        os.makedirs(data_dir, exist_ok=True)
        rows = ROWS_PER_SHARD if source == "fashion_mnist" else 500
        for s in ingest(source, data_dir, rows_per_shard=rows, overwrite=True, progress=False):
            print(s.line(), flush=True)
    return train, test


def _read_records(uri: str) -> list:
    from sscq_dist.ingest import parquet_records

    return list(parquet_records(uri, None))


def _write(records: list, dest: str) -> None:
    from sscq_dist.ingest import write_shards
    from sscq_dist.storage import resolve

    os.makedirs(dest, exist_ok=True)
    write_shards(iter(sorted(records, key=lambda r: r.id)), resolve(dest), ROWS_PER_SHARD, overwrite=True,
                 progress=False)


def _marker_matches(path: str, params: dict) -> bool:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def prepare_split(source: str, split: str, data_dir: str, val_queries: int = 5000, db_limit: int = 0,
                  query_limit: int = 0, seed: int = 0) -> tuple[str, str]:
    """(database_uri, queries_uri) of the evaluation protocol; the database is also the training set.

    split "test": database = the train split, queries = the test split.
    split "val": `val_queries` images held out of the train split by a seeded permutation are
    the queries, the rest of train is the database (tune hyper-parameters here, never on test).
    db_limit / query_limit > 0 keep a seeded random subset of that many rows (smoke runs).
    """
    if split not in ("val", "test"):
        raise SSCQError(f"--split must be 'val' or 'test', got {split!r}")
    train, test = ensure_source(source, data_dir)
    if split == "test" and not db_limit and not query_limit:
        return train, test
    params = {"source": source, "split": split, "val_queries": val_queries if split == "val" else 0,
              "db_limit": db_limit, "query_limit": query_limit, "seed": seed}
    name = f"{split}-seed{seed}" + (f"-q{val_queries}" if split == "val" else "") + \
        (f"-db{db_limit}" if db_limit else "") + (f"-ql{query_limit}" if query_limit else "")
    root = os.path.join(data_dir, "splits", name)
    db_uri, q_uri = os.path.join(root, "database"), os.path.join(root, "queries")
    if _marker_matches(root, params):
        return db_uri, q_uri
    rng = np.random.default_rng(seed)
    train_recs = _read_records(train)
    if split == "val":
        if not 0 < val_queries < len(train_recs):
            raise SSCQError(f"--val-queries must be in 1..{len(train_recs) - 1} for {source}, got {val_queries}")
        order = rng.permutation(len(train_recs))
        queries = [train_recs[i] for i in order[:val_queries]]
        database = [train_recs[i] for i in order[val_queries:]]
    else:
        database, queries = train_recs, _read_records(test)
    if db_limit and db_limit < len(database):
        database = [database[i] for i in np.sort(rng.choice(len(database), db_limit, replace=False))]
    if query_limit and query_limit < len(queries):
        queries = [queries[i] for i in np.sort(rng.choice(len(queries), query_limit, replace=False))]
    _write(database, db_uri)
    _write(queries, q_uri)
    with open(os.path.join(root, MARKER), "w") as f:
        json.dump(params, f)
    print(f"split {name}: {len(database)} database / {len(queries)} query images -> {root}", flush=True)
    return db_uri, q_uri


def replicate_digits(dest: str, rows: int, rows_per_shard: int = 2000) -> str:
    """The bundled digits repeated to `rows` images (unique ids) under dest; reused if present."""
    from sscq_dist.ingest import Record, digits_records, write_shards
    from sscq_dist.storage import resolve

    params = {"source": "replicated_digits", "rows": rows, "rows_per_shard": rows_per_shard}
    if _marker_matches(dest, params):
        return dest
    base = digits_records("all")

    def gen():
        for i in range(rows):
            r = base[i % len(base)]
            yield Record(i, r.image, r.uri, r.label)
    os.makedirs(dest, exist_ok=True)
    write_shards(gen(), resolve(dest), rows_per_shard, overwrite=True, total=rows, progress=False)
    with open(os.path.join(dest, MARKER), "w") as f:
        json.dump(params, f)
    return dest


def start_ray(num_cpus: int, quiet: bool) -> None:
    """A local Ray with `num_cpus` logical CPUs (or the cluster RAY_ADDRESS names); quiet keeps
    worker logs off the driver's stdout.

    A local Ray gets the repository on its workers' path, as `init_ray` does; a running cluster
    already has it (its own PYTHONPATH, or the job's working dir), as `init_ray` assumes too.
    """
    import ray

    from sscq_dist.train.driver import quiet_ray_data, workers_path

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a running cluster (the test suite's session Ray): join it, sized as it is
        ray.init(address="auto" if address.startswith("http") else address, log_to_driver=not quiet)
        return
    with workers_path(REPO):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)


def tracking_store(out_dir: str, experiment: str) -> str:
    """A SQLite MLflow store under out_dir with the experiment's artifacts beside it; returns its URI."""
    import mlflow

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    uri = f"sqlite:///{os.path.join(out_dir, 'mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # Created here (not by the driver) so artifacts land under out_dir, not the working dir.
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location="file://" + os.path.join(out_dir, "mlartifacts"))
    return uri


def metric_history(run_id: str, key: str) -> list[float]:
    """Values of an MLflow metric ordered by step (epoch metrics: one per epoch)."""
    from mlflow.tracking import MlflowClient

    hist = MlflowClient().get_metric_history(run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def cpu_cores() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fmt(x: Optional[float], digits: int = 4) -> str:
    """A number for a markdown cell ('-' for missing)."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"
