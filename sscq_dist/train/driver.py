"""Training driver: builds the Ray Train TorchTrainer over the Ray Data pipeline and
registers the result in MLflow.

Resume: Ray Train restores the latest checkpoint of a run with the same storage path and
name, both after a worker failure (FailureConfig) and when this driver is rerun after being
killed. A small state file beside the run remembers which run (and MLflow run) is still
in progress, so a rerun of the same command continues it, and a rerun after completion
starts a fresh one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow.parquet as pq

from sscq_dist.config import Config
from sscq_dist.console import CONSOLE
from sscq_dist.data.pipeline import TrainData, cached_train_data, check_drop_ceiling, streaming_train_data
from sscq_dist.data.schema import validate_shards
from sscq_dist.errors import SSCQError, TrainingError
from sscq_dist.storage import Location, atomic_write_bytes, read_bytes, resolve, exists
from sscq_dist.train.progress import ProgressRelay

log = logging.getLogger(__name__)

STATE_SUFFIX = ".state.json"


@dataclass
class TrainResult:
    run_id: str
    version: str
    model_name: str
    metrics: dict
    run_name: str
    seconds: float
    checkpoint_path: str


def init_ray(cfg: Config, address: Optional[str] = None) -> None:
    """Join RAY_ADDRESS / a given cluster, else start a local Ray sized for workers + data tasks."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # RAY_ADDRESS may name the job server (http://head:8265), which `ray job submit`
        # needs; a driver started by hand on a cluster node then joins that node's cluster.
        ray.init(address="auto" if address.startswith("http") else address, log_to_driver=True)
        return
    # Logical CPUs: the train workers' share plus room for Ray Data's decode/augment tasks.
    need = int(cfg.train.num_workers * cfg.train.cpus_per_worker) + 2
    with workers_path(_repo_root()):
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)


@contextlib.contextmanager
def workers_path(*dirs: str) -> Iterator[None]:
    """Prepend dirs to PYTHONPATH while a local Ray starts inside this block, then restore it.

    The raylet inherits this process's environment when it starts and passes it to every
    worker it forks, so the workers import from dirs without a runtime env. A job-level
    runtime_env would do the same, but then every worker process starts through Ray's
    runtime-env setup script, which imports Ray once more before the worker does: ~0.35 CPU-s
    per worker (BENCHMARKS.md, "Test suite time"), and a job starts hundreds of workers.
    """
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [*dirs, old] if p)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def quiet_ray_data() -> None:
    """Ray Data's per-operator bars flood job logs; our jobs print periodic progress lines."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def count_rows(uri: str, cfg: Config) -> int:
    """Row count from Parquet footers (no image bytes read)."""
    total = 0
    for f in validate_shards(resolve(uri, cfg.storage)):
        with f.fs.open_input_file(f.path) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def steps_per_epoch(rows: int, cfg: Config) -> int:
    per_worker = rows // cfg.train.num_workers
    steps = per_worker // (cfg.train.global_batch_size // cfg.train.num_workers)
    if steps < 1:
        raise SSCQError(f"{cfg.data.train_uri}: {rows} rows is less than one global batch "
                        f"(train.global_batch_size={cfg.train.global_batch_size})")
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return steps


def _storage_root(cfg: Config) -> Location:
    return resolve(cfg.train.storage_path, cfg.storage)


def _state_loc(cfg: Config) -> Location:
    root = _storage_root(cfg)
    return root.join(cfg.train.run_name + STATE_SUFFIX)


def _load_state(cfg: Config) -> Optional[dict]:
    loc = _state_loc(cfg)
    if not exists(loc):
        return None
    try:
        return json.loads(read_bytes(loc))
    except ValueError:
        raise SSCQError(f"run state file {loc.uri} is not valid JSON; remove it to start a new run") from None


def _save_state(cfg: Config, state: dict) -> None:
    loc = _state_loc(cfg)
    if not loc.is_s3:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    atomic_write_bytes(loc, json.dumps(state, indent=1).encode())


def _start_or_resume_run(cfg: Config, uri: str) -> tuple[str, str, bool]:
    """(ray run name, MLflow run id, resumed?) for this invocation."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from sscq_dist.tracking import ensure_experiment, safe_params

    state = _load_state(cfg)
    if state and state.get("status") == "running" and state.get("config_hash") == cfg.hash():
        log.info("resuming unfinished run %s (MLflow run %s)", state["ray_run_name"], state["mlflow_run_id"])
        return state["ray_run_name"], state["mlflow_run_id"], True
    exp_id = ensure_experiment(cfg.tracking.experiment, uri)
    ray_name = f"{cfg.train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    client = MlflowClient()
    run = client.create_run(exp_id, run_name=ray_name, tags={"sscq.data_uri": cfg.data.train_uri,
                                                             "sscq.ray_run_name": ray_name})
    params = safe_params(cfg)
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    client.log_text(run.info.run_id, cfg.to_yaml(), "config.yaml")
    _save_state(cfg, {"status": "running", "ray_run_name": ray_name, "mlflow_run_id": run.info.run_id,
                      "config_hash": cfg.hash()})
    return ray_name, run.info.run_id, False


def train_data(cfg: Config, rows: int) -> TrainData:
    """The training input: cached (decoded once, materialised) when the set has at most
    data.cache_max_rows rows, else streamed and decoded every epoch.

    The cached path counts undecodable rows here, before any worker starts, and stops
    above data.max_drop_fraction; the streaming path is checked by the workers.
    """
    if rows <= cfg.data.cache_max_rows:
        td = cached_train_data(cfg.data.train_uri, cfg, cfg.train.seed)
        log.info("training data cached: %d rows, %d undecodable, %.1f MB in the object store",
                 td.rows, td.dropped, td.dataset.size_bytes() / 1e6)
        check_drop_ceiling(td.rows, td.dropped, td.dropped_by_shard, td.shard_uris, cfg.data.max_drop_fraction)
        return td
    return streaming_train_data(cfg.data.train_uri, cfg, cfg.train.seed)


def build_trainer(cfg: Config, ray_name: str, loop_config: dict, data: TrainData):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sscq_dist.train.loop import TRAIN_DATASET, train_func

    root = _storage_root(cfg)
    if not root.is_s3:
        os.makedirs(root.path, exist_ok=True)
    loop_config = {**loop_config, "shard_uris": data.shard_uris, "cached_blocks": data.blocks}
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=ray_name,
            storage_path=root.path if not root.is_s3 else root.path,
            storage_filesystem=root.fs if root.is_s3 else None,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
        ),
        # A cached set's blocks travel in the loop config and the workers deal them out
        # (data/cached_shard.py): no Ray Data split coordinator for a set already in memory.
        datasets={} if data.blocks is not None else {TRAIN_DATASET: data.dataset},
    )


def fp32_state_dict(checkpoint_dir: str) -> dict:
    """Full fp32 weights from a DeepSpeed checkpoint (any ZeRO stage, bf16 or fp32 run).

    ZeRO 0 keeps no partitioned optimizer state, and DeepSpeed's zero_to_fp32 cannot read
    such a checkpoint: there the model file's `module` already holds every weight (in the
    training layout, hence `.contiguous()`: channels-last runs save channels-last tensors).
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_file = os.path.join(checkpoint_dir, "sscq", "mp_rank_00_model_states.pt")
    if os.path.exists(model_file):
        states = torch.load(model_file, map_location="cpu", weights_only=True)
        if (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0) == 0:
            return {k: v.float().contiguous() for k, v in states["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="sscq")


def run_training(cfg: Config, address: Optional[str] = None) -> TrainResult:
    """Train (or resume) with Ray Train + DeepSpeed, then log and register the model."""
    import mlflow

    from sscq_dist.registry import log_and_register
    from sscq_dist.tracking import configure

    t0 = time.perf_counter()
    rows = count_rows(cfg.data.train_uri, cfg)
    spe = steps_per_epoch(rows, cfg)
    init_ray(cfg, address)
    # The input first: a cached set's drop ceiling stops here, before an MLflow run exists.
    data = train_data(cfg, rows)
    uri = configure(cfg.tracking)
    ray_name, run_id, resumed = _start_or_resume_run(cfg, uri)
    CONSOLE.line(f"train: {ray_name}: {rows} rows, {spe} steps/epoch x {cfg.train.epochs} epochs, "
                 f"{cfg.train.num_workers} workers, ZeRO {cfg.train.zero_stage}"
                 f"{' (resuming the unfinished run)' if resumed else ''}")
    # A quiet job relays rank 0's progress lines to the terminal (worker output goes to its log file).
    relay = ProgressRelay() if CONSOLE.quiet else None
    trainer = build_trainer(cfg, ray_name, {"cfg": cfg.to_dict(), "steps_per_epoch": spe, "run_id": run_id,
                                            "tracking_uri": uri, "progress_queue": relay and relay.queue}, data)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise TrainingError(f"training run {ray_name} failed: {_root_cause(exc)}") from None
    finally:
        if relay:
            relay.close()
    if getattr(result, "error", None):
        raise TrainingError(f"training run {ray_name} failed: {_root_cause(result.error)}")
    if result.checkpoint is None:
        raise TrainingError(f"training run {ray_name} produced no checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = fp32_state_dict(ckpt_dir)
    _log_curves(run_id, cfg)
    version = log_and_register(state, cfg, run_id, cfg.tracking.registered_model, cfg.data.train_uri)
    client = mlflow.tracking.MlflowClient()
    client.set_terminated(run_id, "FINISHED")
    _save_state(cfg, {"status": "completed", "ray_run_name": ray_name, "mlflow_run_id": run_id,
                      "config_hash": cfg.hash(), "model_version": version})
    return TrainResult(run_id, version, cfg.tracking.registered_model, dict(result.metrics or {}), ray_name,
                       time.perf_counter() - t0, result.checkpoint.path)


def _root_cause(exc: BaseException) -> str:
    """The innermost error's one-line message (Ray wraps worker errors several times)."""
    seen = exc
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    for line in reversed(text):  # the last line of a remote traceback names the error
        if line.strip():
            return line.strip()[:400]
    return type(seen).__name__


def _log_curves(run_id: str, cfg: Config) -> None:
    """Loss-curve PNG (from the run's metric history) as an MLflow artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    terms = ["total", "icf", "icz", "cc", "pn", "cd"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for t in terms:
        hist = client.get_metric_history(run_id, f"loss/{t}")
        if hist:
            hist = sorted(hist, key=lambda m: m.step)
            axes[0].plot([m.step for m in hist], [m.value for m in hist], label=t)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (rank-0 share)")
    axes[0].legend()
    ent = sorted(client.get_metric_history(run_id, "epoch/codeword_entropy"), key=lambda m: m.step)
    axes[1].plot([m.step for m in ent], [m.value for m in ent], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("codeword usage entropy (nats)")
    fig.suptitle(f"SSCQ training {cfg.train.run_name} ({cfg.model.bits} bits)")
    fig.tight_layout()
    out_dir = os.path.abspath(cfg.tracking.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{cfg.train.run_name}-loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    client.log_artifact(run_id, path)
