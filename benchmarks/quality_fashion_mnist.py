"""Retrieval quality on Fashion-MNIST: SSCQ vs the baselines of SPEC section 5, at 16/32/64 bits.

Every trained method goes through the real training path (`run_training`: local Ray,
Ray Train + DeepSpeed, MLflow tracking and registration in a SQLite store under --out),
then the registered model is scored with `sscq_dist.model_eval` (mAP@K with the squared-L2
ADC distance FAISS serves and the authors' l2sum distance, plus the unquantised embedding).

    # choose hyper-parameters on the validation split (5,000 train images held out)
    python benchmarks/quality_fashion_mnist.py --split val --minutes 10
    # the reported numbers: database = 60,000 train images, queries = 10,000 test images
    python benchmarks/quality_fashion_mnist.py --split test --epochs 20
    # seconds: 2,000 database / 200 queries, 1 epoch, 32 bits, pixel_pq + sscq
    python benchmarks/quality_fashion_mnist.py --smoke [--source digits]

Methods: pixel_float (exact L2 on raw pixels), pixel_pq (raw-pixel FAISS IndexPQ, M = bits/4,
4-bit codes), ablation (L_icf + L_icz only: loss.w_cc=0 loss.w_pn=0 loss.w_cd=0), sscq
(full objective), sscq_bank (bank.enabled=true), sscq_taucd1 (loss.tau_cd=1, the authors'
setting; not run unless asked). Results already in <out>/results.json with the same
settings are reused (pass --force to redo them), so an interrupted benchmark resumes.

Writes <out>/results.json, <out>/results.md (the tables) and <out>/map_vs_time.png (mAP of
the --curve-methods at --curve-bits against wall time since the run started, one point per
kept checkpoint plus the untrained initialisation at t = 0).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_setup as bs  # noqa: E402  (puts the repository on sys.path)

from sscq_dist.config import Config, load_config  # noqa: E402

# Config overrides that define each trained method; None = a raw-pixel baseline (no training).
METHODS: dict[str, Optional[list[str]]] = {
    "pixel_float": None,
    "pixel_pq": None,
    "ablation": ["loss.w_cc=0", "loss.w_pn=0", "loss.w_cd=0"],
    "sscq": [],
    "sscq_bank": ["bank.enabled=true"],
    "sscq_taucd1": ["loss.tau_cd=1.0"],
}
DEFAULT_METHODS = ("pixel_float", "pixel_pq", "ablation", "sscq", "sscq_bank")
# Steps per epoch of the short run that measures steps/s for a --minutes budget. An epoch's
# fixed cost (a new execution, the prefetch refill) is ~2 s here: 20 steps read 25 % under
# the steady rate (553 vs 737 images/s, 16 px), so a "6-minute" budget trained ~4 minutes.
CALIBRATION_STEPS = 60
EXPERIMENT = "sscq-bench-quality"
# Smoke mode: subset sizes and the two methods it runs (seconds on two cores).
SMOKE_DB, SMOKE_QUERIES = 2000, 200
SMOKE_METHODS = ("pixel_pq", "sscq")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=bs.SOURCES, default="fashion_mnist")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--bits", type=int, nargs="+", default=None, help="default: 16 32 64")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help=f"default: {' '.join(DEFAULT_METHODS)}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs per run (default: train.epochs)")
    budget.add_argument("--minutes", type=float, default=None,
                        help="training-loop minutes per run, turned into epochs from a measured steps/s")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (train.num_workers)")
    p.add_argument("--zero-stage", type=int, default=None, help="default: the config's train.zero_stage")
    p.add_argument("--topk", type=int, default=None, help="mAP cut-off (default: eval.topk)")
    p.add_argument("--curve-methods", nargs="*", default=None,
                   help="methods evaluated at intermediate checkpoints for the mAP-vs-time plot "
                        "(default: sscq ablation)")
    p.add_argument("--curve-bits", type=int, default=32)
    p.add_argument("--curve-points", type=int, default=5, help="checkpoints evaluated per curve run (0 = end only)")
    p.add_argument("--val-queries", type=int, default=None,
                   help="queries held out of train for --split val (default 5000; digits 300)")
    p.add_argument("--db-limit", type=int, default=0, help="random subset of the database (0 = all)")
    p.add_argument("--query-limit", type=int, default=0, help="random subset of the queries (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="split and subset seed")
    p.add_argument("--data-dir", default=None, help="shards (default data/<source>)")
    p.add_argument("--out", default=None, help="output dir (default outputs/bench-quality-<source>-<split>)")
    p.add_argument("--config", default=None, help="default: configs/<source>.yaml")
    p.add_argument("--force", action="store_true", help="recompute results already in results.json")
    p.add_argument("--quiet", action="store_true", help="keep Ray worker logs off stdout")
    p.add_argument("--smoke", action="store_true",
                   help=f"{SMOKE_DB} db / {SMOKE_QUERIES} queries, 1 epoch, 32 bits, {' + '.join(SMOKE_METHODS)}")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, key.sub=value")
    a = p.parse_args(argv)
    if a.smoke:  # smoke defaults; anything given explicitly still wins
        a.bits, a.methods = a.bits or [32], a.methods or list(SMOKE_METHODS)
        if a.minutes is None:
            a.epochs = a.epochs or 1
        a.db_limit, a.query_limit, a.quiet = a.db_limit or SMOKE_DB, a.query_limit or SMOKE_QUERIES, True
        a.curve_methods = ["sscq"] if a.curve_methods is None else a.curve_methods
    a.bits = a.bits or [16, 32, 64]
    a.methods = a.methods or list(DEFAULT_METHODS)
    a.curve_methods = ["sscq", "ablation"] if a.curve_methods is None else a.curve_methods
    a.data_dir = a.data_dir or os.path.join(bs.REPO, "data", a.source)
    a.out = os.path.abspath(a.out or os.path.join("outputs", f"bench-quality-{a.source}-{a.split}"
                                                              + ("-smoke" if a.smoke else "")))
    a.config = a.config or bs.default_config(a.source)
    if a.val_queries is None:
        a.val_queries = 300 if a.source == "digits" else 5000
    return a


# --------------------------------------------------------------------------- configs


def run_config(a: argparse.Namespace, db_uri: str, q_uri: str, method: str, bits: int, epochs: int,
               tracking_uri: str, extra: tuple[str, ...] = ()) -> Config:
    """The config of one training run: data, bits, method overrides, budget, storage under --out."""
    return load_config(a.config, [
        f"data.train_uri={db_uri}", f"data.database_uri={db_uri}", f"data.queries_uri={q_uri}",
        f"model.bits={bits}", f"train.epochs={epochs}", f"train.num_workers={a.workers}",
        *([f"train.zero_stage={a.zero_stage}"] if a.zero_stage is not None else []),
        f"train.storage_path={os.path.join(a.out, 'runs')}",
        f"train.run_name={method}-{bits}b", f"tracking.tracking_uri={tracking_uri}",
        f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model=bench-{method}-{bits}b",
        f"tracking.output_dir={os.path.join(a.out, 'outputs')}",
        *a.overrides, *METHODS[method], *extra])


def calibrate_epochs(a: argparse.Namespace, db_uri: str, q_uri: str, tracking_uri: str) -> dict:
    """Epochs that fit --minutes of training loop, from a short run of the costliest method asked.

    Two capped epochs; the second (no pipeline start-up in it) gives the steady images/s.
    """
    from sscq_dist.train.driver import count_rows, run_training, steps_per_epoch

    trained = [m for m in a.methods if METHODS[m] is not None]
    costliest = next((m for m in ("sscq_bank", "sscq", "sscq_taucd1", "ablation") if m in trained), "sscq")
    bits = max(a.bits)
    cfg = run_config(a, db_uri, q_uri, costliest, bits, 2, tracking_uri,
                     (f"train.max_steps_per_epoch={CALIBRATION_STEPS}", "train.run_name=calibration",
                      "tracking.registered_model=bench-calibration", "bank.warmup_epochs=1"))
    r = run_training(cfg)
    ips = bs.metric_history(r.run_id, "epoch/images_per_s")[-1]
    full = run_config(a, db_uri, q_uri, costliest, bits, 1, tracking_uri)
    epoch_s = steps_per_epoch(count_rows(db_uri, full), full) * full.train.global_batch_size / ips
    epochs = max(1, int(a.minutes * 60 // epoch_s))
    print(f"calibration ({costliest}, {bits} bits): {ips:.0f} images/s -> {epoch_s:.0f} s/epoch -> "
          f"{epochs} epochs in {a.minutes:g} min", flush=True)
    return {"method": costliest, "bits": bits, "images_per_s": ips, "epoch_s": epoch_s, "epochs": epochs,
            "minutes": a.minutes}


# --------------------------------------------------------------------------- evaluation


def pixel_result(sets, method: str, bits: int, topk: int, batch: int) -> dict:
    """Raw-pixel baselines: FAISS IndexPQ at `bits` (sqL2 ADC) or exact float L2."""
    from sscq_dist import evaluation as ev

    qx = sets.queries.images.reshape(len(sets.queries.ids), -1).astype(np.float32) / 255.0
    dx = sets.database.images.reshape(len(sets.database.ids), -1).astype(np.float32) / 255.0
    if method == "pixel_pq":
        res = ev.pixel_pq_baseline(dx, qx, sets.database.labels, sets.queries.labels, bits, topk)
        return {"map_sql2": res["map"]}
    res = ev.evaluate_float(qx, sets.queries.labels, dx, sets.database.labels, topk, chunk=batch)
    return {"map_float": res["map"]}


def model_scores(model, sets, topk: int, batch: int) -> dict:
    from sscq_dist.model_eval import evaluate_model

    res = evaluate_model(model, sets, topk, batch)
    return {"map_sql2": res["map_sql2"], "map_l2sum": res["map_l2sum"], "map_float": res["map_float_embedding"],
            "codeword_entropy": res["codeword_usage_entropy"]}


def untrained_scores(cfg: Config, sets, topk: int) -> dict:
    """The initialisation every run starts from (the training loop seeds the same way)."""
    import torch

    from sscq_dist.model import build_model

    torch.manual_seed(cfg.train.seed)
    return model_scores(build_model(cfg.model, cfg.data.channels), sets, topk, cfg.eval.batch_size)


def checkpoint_client_state(ckpt_dir: str) -> dict:
    """epoch / global_step saved with a DeepSpeed checkpoint (our own file, hence full unpickling)."""
    import torch

    path = os.path.join(ckpt_dir, "sscq", "mp_rank_00_model_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {"epoch": int(state["epoch"]), "global_step": int(state["global_step"])}


def epoch_times(run_id: str, global_batch: int) -> dict[int, dict]:
    """global_step -> {"wall_s": since the MLflow run started, "train_s": summed epoch seconds}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    start_ms = client.get_run(run_id).info.start_time
    steps = sorted(client.get_metric_history(run_id, "epoch/global_step"), key=lambda m: m.step)
    n_steps = {m.step: m.value for m in client.get_metric_history(run_id, "epoch/steps")}
    ips = {m.step: m.value for m in client.get_metric_history(run_id, "epoch/images_per_s")}
    out, train_s = {}, 0.0
    for m in steps:
        train_s += n_steps.get(m.step, 0.0) * global_batch / max(1e-9, ips.get(m.step, float("inf")))
        out[int(m.value)] = {"wall_s": (m.timestamp - start_ms) / 1000.0, "train_s": train_s}
    return out


def curve_points(r, cfg: Config, sets, topk: int, final: dict) -> list[dict]:
    """mAP at every kept checkpoint before the last, plus the final (registered) model."""
    from sscq_dist.model import build_model
    from sscq_dist.train.driver import fp32_state_dict

    times = epoch_times(r.run_id, cfg.train.global_batch_size)
    run_dir = os.path.dirname(r.checkpoint_path)
    points = []
    for ckpt in sorted(glob.glob(os.path.join(run_dir, "checkpoint_*"))):
        if not os.path.isdir(ckpt) or os.path.abspath(ckpt) == os.path.abspath(r.checkpoint_path):
            continue
        cs = checkpoint_client_state(ckpt)
        model = build_model(cfg.model, cfg.data.channels)
        model.load_state_dict(fp32_state_dict(ckpt))
        scores = model_scores(model, sets, topk, cfg.eval.batch_size)
        points.append({"epoch": cs["epoch"] + 1, **times.get(cs["global_step"], {}), **scores})
        print(f"  checkpoint epoch {cs['epoch'] + 1}: mAP sqL2 {scores['map_sql2']:.4f}", flush=True)
    last = max(times) if times else None
    # The final model's epoch count from its checkpoint (a time-budget run stops before train.epochs).
    final_epoch = checkpoint_client_state(r.checkpoint_path)["epoch"] + 1 if r.checkpoint_path else cfg.train.epochs
    points.append({"epoch": final_epoch, **(times.get(last, {}) if last is not None else {}),
                   **{k: final[k] for k in ("map_sql2", "map_l2sum", "map_float", "codeword_entropy")}})
    return sorted(points, key=lambda p: p["epoch"])


def max_deviation(rates: list[float]) -> Optional[float]:
    """Largest |rate / mean - 1| over the given epochs (None for fewer than two)."""
    if len(rates) < 2:
        return None
    mean = float(np.mean(rates))
    return float(max(abs(r / mean - 1.0) for r in rates))


def train_and_evaluate(a, method: str, bits: int, epochs: int, db_uri: str, q_uri: str, tracking_uri: str,
                       sets, topk: int, curve: bool) -> dict:
    from sscq_dist.registry import load_model
    from sscq_dist.train.driver import count_rows, run_training, steps_per_epoch

    extra: tuple[str, ...] = ()
    if curve and a.curve_points > 0 and epochs > 1:
        every = max(1, round(epochs / a.curve_points))
        extra = (f"train.checkpoint_every_epochs={every}", "train.keep_checkpoints=0")
    cfg = run_config(a, db_uri, q_uri, method, bits, epochs, tracking_uri, extra)
    t0 = time.perf_counter()
    r = run_training(cfg)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    loaded = load_model(f"models:/{r.model_name}/{r.version}", cfg.tracking)
    scores = model_scores(loaded.model, sets, topk, cfg.eval.batch_size)
    eval_s = time.perf_counter() - t1
    ips = bs.metric_history(r.run_id, "epoch/images_per_s")
    wait = bs.metric_history(r.run_id, "epoch/data_wait_fraction")
    steps = bs.metric_history(r.run_id, "epoch/global_step")
    # Epochs trained: a time-budget run stops before train.epochs (its last epoch may be partial).
    done = round(steps[-1] / steps_per_epoch(count_rows(cfg.data.train_uri, cfg), cfg), 2) if steps else epochs
    row = {**scores, "epochs": done, "epochs_planned": epochs, "workers": cfg.train.num_workers, "zero_stage": cfg.train.zero_stage,
           "train_wall_s": train_s, "eval_s": eval_s, "run_id": r.run_id, "model_version": r.version,
           # Steady state: epochs after the first, which carries the input pipeline's start-up.
           "images_per_s": float(np.mean(ips[1:] or ips)) if ips else None,
           "data_wait_fraction": float(np.mean(wait[1:] or wait)) if wait else None,
           # Every epoch's rate, so a slow phase in a long run shows (issue 14: each epoch after
           # the first within 10 % of their mean).
           "epoch_images_per_s": [float(x) for x in ips],
           "max_epoch_deviation": max_deviation(ips[1:])}
    if curve:
        row["curve"] = curve_points(r, cfg, sets, topk, scores)
    return row


# --------------------------------------------------------------------------- reporting


def markdown(results: dict, methods: list[str], bits_list: list[int], topk: int, meta: dict) -> str:
    """Long table (one row per run) and a method x bits pivot of the sqL2 ADC mAP."""
    lines = [f"Retrieval protocol of SPEC section 5 ({meta['source']}, split {meta['split']}: "
             f"{meta['database']} database / {meta['queries']} query images, mAP@{topk}); "
             f"{meta['cores']} CPU cores, {meta['device']}.", "",
             f"| method | bits | mAP@{topk} sqL2 ADC | mAP@{topk} l2sum | float mAP | epochs | workers | "
             "train wall s | eval s | train img/s | data wait |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        for bits in ([0] if method == "pixel_float" else bits_list):
            r = results.get(f"{method}/{bits}")
            if r is None:
                continue
            lines.append(
                f"| {method} | {bits or 'float'} | {bs.fmt(r.get('map_sql2'))} | {bs.fmt(r.get('map_l2sum'))} | "
                f"{bs.fmt(r.get('map_float'))} | {r.get('epochs', '-')} | {r.get('workers', '-')} | "
                f"{bs.fmt(r.get('train_wall_s'), 0)} | {bs.fmt(r.get('eval_s'), 0)} | "
                f"{bs.fmt(r.get('images_per_s'), 0)} | {bs.fmt(_pct(r.get('data_wait_fraction')), 1)} |")
    lines += ["", f"mAP@{topk}, squared-L2 ADC (the distance the index serves); pixel_float is unquantised:", "",
              "| method | " + " | ".join(f"{b} bits" for b in bits_list) + " |",
              "|---|" + "---:|" * len(bits_list)]
    for method in methods:
        cells = []
        for bits in bits_list:
            r = results.get(f"{method}/{0 if method == 'pixel_float' else bits}")
            val = None if r is None else (r.get("map_float") if method == "pixel_float" else r.get("map_sql2"))
            cells.append(bs.fmt(val))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(cfg: Config) -> str:
    """Where training ran: the GPU's name when train.use_gpu found one, else CPU."""
    import torch

    if cfg.train.use_gpu and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return "CPU"


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else 100.0 * x


def attach_plot(results: dict, methods: list[str], bits: int, plot: str, tracking_uri: str) -> None:
    """The mAP-vs-time PNG as an artifact of every plotted run (beside its registered model)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for m in methods:
        run_id = results.get(f"{m}/{bits}", {}).get("run_id")
        if run_id and "curve" in results[f"{m}/{bits}"]:
            client.log_artifact(run_id, plot, artifact_path="quality")


def plot_curves(results: dict, methods: list[str], bits: int, untrained: Optional[dict], path: str,
                topk: int) -> Optional[str]:
    """mAP (sqL2 solid, l2sum dashed) against wall seconds since each run started."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = {m: results[f"{m}/{bits}"]["curve"] for m in methods if "curve" in results.get(f"{m}/{bits}", {})}
    if not runs:
        return None
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (method, pts) in enumerate(runs.items()):
        color = f"C{i}"
        start = [untrained] if untrained else []
        xs = [0.0] * len(start) + [p.get("wall_s", np.nan) for p in pts]
        ax.plot(xs, [p["map_sql2"] for p in start + pts], marker="o", color=color, label=f"{method} (sqL2 ADC)")
        ax.plot(xs, [p["map_l2sum"] for p in start + pts], ls="--", color=color, label=f"{method} (l2sum)")
    for key, style in ((f"pixel_pq/{bits}", ":"), ("pixel_float/0", "-.")):
        r = results.get(key)
        if r:
            val = r.get("map_sql2") if key.startswith("pixel_pq") else r.get("map_float")
            ax.axhline(val, color="grey", ls=style, label=key.split("/")[0])
    ax.set_xlabel("wall seconds since the training run started")
    ax.set_ylabel(f"mAP@{topk}")
    ax.set_title(f"{bits}-bit codes: mAP vs training time")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------- main


def signature(a: argparse.Namespace, method: str, bits: int, epochs: Optional[int], topk: int) -> dict:
    """What a stored result depends on; a result with another signature is recomputed."""
    sig = {"source": a.source, "split": a.split, "db_limit": a.db_limit, "query_limit": a.query_limit,
           "seed": a.seed, "val_queries": a.val_queries if a.split == "val" else 0, "topk": topk,
           "method": method, "bits": bits}
    if METHODS[method] is not None:
        sig.update(epochs=epochs, workers=a.workers, zero_stage=a.zero_stage, overrides=list(a.overrides),
                   config=os.path.relpath(a.config, bs.REPO),
                   curve=method in a.curve_methods and bits == a.curve_bits and a.curve_points > 0)
    return sig


def main(argv=None) -> int:
    import json

    a = parse_args(argv)
    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    db_uri, q_uri = bs.prepare_split(a.source, a.split, a.data_dir, a.val_queries, a.db_limit, a.query_limit, a.seed)
    tracking_uri = bs.tracking_store(a.out, EXPERIMENT)
    defaults = load_config(a.config, a.overrides)
    base = run_config(a, db_uri, q_uri, "sscq", a.bits[0], defaults.train.epochs, tracking_uri)
    topk = a.topk or base.eval.topk
    from sscq_dist.model_eval import load_eval_sets

    sets = load_eval_sets(base, q_uri, db_uri)
    print(f"evaluation sets: {len(sets.database.ids)} database / {len(sets.queries.ids)} queries, mAP@{topk}",
          flush=True)
    results_path = os.path.join(a.out, "results.json")
    stored = {}
    if os.path.exists(results_path) and not a.force:
        with open(results_path) as f:
            stored = json.load(f)
    results: dict = stored.get("results", {})
    trained = [m for m in a.methods if METHODS[m] is not None]

    def ensure_ray() -> None:  # started only when something trains (a rerun may reuse every result)
        bs.start_ray(max(bs.cpu_cores(), int(a.workers * base.train.cpus_per_worker) + 2), a.quiet)

    epochs = a.epochs or base.train.epochs
    calibration = stored.get("calibration")
    if a.minutes is not None and trained:
        if not (calibration and calibration.get("minutes") == a.minutes and calibration.get("bits") == max(a.bits)):
            ensure_ray()
            calibration = calibrate_epochs(a, db_uri, q_uri, tracking_uri)
        epochs = calibration["epochs"]
    untrained = stored.get("untrained", {})
    for bits in a.bits:
        for method in a.methods:
            if method == "pixel_float" and bits != a.bits[0]:
                continue  # independent of the code length
            key_bits = 0 if method == "pixel_float" else bits
            key = f"{method}/{key_bits}"
            sig = signature(a, method, key_bits, epochs, topk)
            if key in results and results[key].get("signature") == sig:
                print(f"{key}: reusing the stored result", flush=True)
                continue
            print(f"=== {method}, {bits} bits", flush=True)
            t0 = time.perf_counter()
            if METHODS[method] is None:
                row = pixel_result(sets, method, bits, topk, base.eval.batch_size)
                row["eval_s"] = time.perf_counter() - t0
            else:
                curve = sig["curve"]
                if curve and str(bits) not in untrained:
                    cfg_b = run_config(a, db_uri, q_uri, method, bits, epochs, tracking_uri)
                    untrained[str(bits)] = untrained_scores(cfg_b, sets, topk)
                ensure_ray()
                row = train_and_evaluate(a, method, bits, epochs, db_uri, q_uri, tracking_uri, sets, topk, curve)
            row.update(method=method, bits=key_bits, wall_s=time.perf_counter() - t0, signature=sig)
            results[key] = row
            print(f"{key}: " + ", ".join(f"{k} {row[k]:.4f}" for k in ("map_sql2", "map_l2sum", "map_float")
                                          if row.get(k) is not None), flush=True)
            bs.write_json(results_path, {"results": results, "calibration": calibration, "untrained": untrained})
    meta = {"source": a.source, "split": a.split, "database": len(sets.database.ids),
            "queries": len(sets.queries.ids), "cores": bs.cpu_cores(), "device": device_name(base)}
    table = markdown(results, a.methods, a.bits, topk, meta)
    plot = plot_curves(results, a.curve_methods, a.curve_bits, untrained.get(str(a.curve_bits)),
                       os.path.join(a.out, "map_vs_time.png"), topk)
    if plot:
        attach_plot(results, a.curve_methods, a.curve_bits, plot, tracking_uri)
    command = "python benchmarks/quality_fashion_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(f"`{command.strip()}`\n\n{table}\n")
    bs.write_json(results_path, {"results": results, "calibration": calibration, "untrained": untrained,
                                 "meta": meta, "command": command.strip()})
    print(table)
    print(f"quality: results {results_path}, table {os.path.join(a.out, 'results.md')}"
          + (f", plot {plot}" if plot else "") + f"; {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    from sscq_dist.cli import run_main

    run_main(lambda: main())
