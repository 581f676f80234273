"""Promotion behind a metric gate: move the `champion` alias only to a better model.

Both models are scored on the same gate set (held-out queries against the database, mAP
with the distance FAISS serves). The alias is the very last write, after the decision is
recorded, so any error before it leaves `champion` where it was.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

from sscq_dist.config import Config, DataConfig
from sscq_dist.errors import RegistryError, SSCQError
from sscq_dist.registry import CHAMPION, alias_version, load_model
from sscq_dist.storage import redact_uri

log = logging.getLogger(__name__)

PROMOTION_EXPERIMENT = "sscq-promotion"
EXIT_PROMOTED = 0
EXIT_ERROR = 2
EXIT_REJECTED = 3
DIGITS_DEFAULT = DataConfig()


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate: str
    champion: Optional[str]
    candidate_map: float
    champion_map: Optional[float]
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_PROMOTED if self.promote else EXIT_REJECTED

    def line(self) -> str:
        verb = ("would promote" if self.dry_run else "promoted") if self.promote else "rejected"
        champ = "none" if self.champion is None else f"v{self.champion} mAP {self.champion_map:.4f}"
        return f"promote: {verb} v{self.candidate} (mAP {self.candidate_map:.4f}; champion {champ}): {self.reason}"


def decide(candidate_map: float, champion_map: Optional[float], min_improvement: float) -> tuple[bool, str]:
    """The gate: promote iff there is no champion or candidate >= champion + min_improvement,
    strictly greater at the default margin 0 (a tie keeps the champion)."""
    if champion_map is None:
        return True, "no champion yet"
    delta = candidate_map - champion_map
    ok = delta > 0 if min_improvement == 0 else delta >= min_improvement
    rel = ">" if min_improvement == 0 else ">="
    return ok, (f"improvement {delta:+.4f} {'meets' if ok else 'misses'} the gate ({rel} {min_improvement:g})")


def ensure_gate_set(cfg: Config) -> None:
    """For the embedded digits defaults, build the gate set from the bundled digits if absent."""
    from sscq_dist.storage import resolve, list_files
    from sscq_dist.ingest import ingest

    if cfg.data.queries_uri != DIGITS_DEFAULT.queries_uri:
        return
    if list_files(resolve(cfg.data.queries_uri, cfg.storage), ".parquet"):
        return
    root = cfg.data.queries_uri.rsplit("/", 1)[0]
    log.info("gate set %s absent: building it from the bundled digits", cfg.data.queries_uri)
    ingest("digits", root, overwrite=True, storage=cfg.storage, progress=False)


def gate_score(model_uri: str, cfg: Config, cache: dict) -> tuple[float, str]:
    """mAP@gate_topk (squared-L2 ADC) of a registered model on the gate set; (score, version)."""
    from sscq_dist.model_eval import evaluate_model, load_eval_sets

    loaded = load_model(model_uri, cfg.tracking)
    data = dataclasses.replace(cfg.data, image_size=loaded.cfg.data.image_size, channels=loaded.cfg.data.channels)
    key = (data.image_size, data.channels)
    if key not in cache:
        cache[key] = load_eval_sets(dataclasses.replace(cfg, data=data))
    res = evaluate_model(loaded.model, cache[key], cfg.eval.gate_topk, cfg.eval.batch_size)
    return float(res["map_sql2"]), str(loaded.version)


def promote(name: str, candidate: str, cfg: Config, min_improvement: float = 0.0, dry_run: bool = False) -> Decision:
    """Score candidate and champion on the gate set, record the decision, move the alias if earned."""
    from mlflow.tracking import MlflowClient

    from sscq_dist.tracking import configure

    uri = configure(cfg.tracking)
    client = MlflowClient()
    try:
        client.get_model_version(name, candidate)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise RegistryError(f"candidate models:/{name}/{candidate} not found ({first})") from None
        raise RegistryError(f"cannot read candidate models:/{name}/{candidate} from the tracking store "
                            f"{redact_uri(uri)} ({first}); alias '{CHAMPION}' unchanged") from None
    champion = alias_version(name, CHAMPION)
    if champion == str(candidate):
        raise SSCQError(f"version {candidate} of {name} is already the champion")
    ensure_gate_set(cfg)
    cache: dict = {}
    cand_map, _ = gate_score(f"models:/{name}/{candidate}", cfg, cache)
    champ_map = gate_score(f"models:/{name}/{champion}", cfg, cache)[0] if champion else None
    ok, reason = decide(cand_map, champ_map, min_improvement)
    d = Decision(ok, reason, str(candidate), champion, cand_map, champ_map, dry_run)

    try:
        _record(d, name, candidate, champion, cand_map, champ_map, ok, reason, min_improvement, dry_run, cfg, uri)
    except Exception as exc:
        raise RegistryError(f"MLflow failed while recording the promotion of {name} v{candidate} "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}); "
                            f"alias '{CHAMPION}' unchanged") from None
    return d


def _record(d: Decision, name: str, candidate: str, champion: Optional[str], cand_map: float,
            champ_map: Optional[float], ok: bool, reason: str, min_improvement: float, dry_run: bool,
            cfg: Config, uri: str) -> None:
    """Log the decision run and version tags, then (last) move the alias."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from sscq_dist.tracking import ensure_experiment

    client = MlflowClient()
    exp_id = ensure_experiment(PROMOTION_EXPERIMENT, uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"promote-{name}-v{candidate}"):
        mlflow.log_params({"model_name": name, "candidate": candidate, "champion": champion or "none",
                           "min_improvement": min_improvement, "gate_topk": cfg.eval.gate_topk,
                           "gate_queries": cfg.data.queries_uri, "dry_run": dry_run})
        mlflow.log_metrics({"candidate_map": cand_map, **({"champion_map": champ_map} if champ_map is not None else {})})
        mlflow.set_tags({"decision": "promote" if ok else "reject", "reason": reason})
    if not dry_run:
        tags = {"promotion.decision": "promoted" if ok else "rejected", "promotion.reason": reason,
                "promotion.candidate_map": f"{cand_map:.6f}",
                "promotion.champion_map": "none" if champ_map is None else f"{champ_map:.6f}",
                "promotion.champion_version": champion or "none",
                "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for k, v in tags.items():
            client.set_model_version_tag(name, candidate, k, v)
        if ok:
            # Last write: everything above may fail and leave the alias untouched.
            client.set_registered_model_alias(name, CHAMPION, candidate)
