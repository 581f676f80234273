"""Promotion behind a metric gate: move the `champion` alias only to a better model.

Both models are scored on the same gate set (held-out queries against the database, mAP
with the distance FAISS serves). Two steps: `score_gate` only reads; `commit` records the
decision and moves the alias. The alias is the very last write, after the decision is
recorded and after a compare-and-set check that `champion` still names the version that
was scored, so any error, and any promotion that raced this one, leaves `champion` where it
was. `--dry-run` stops after `score_gate`: it writes nothing anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

from sscq_dist.config import Config
from sscq_dist.errors import RegistryError, SSCQError
from sscq_dist.failpoints import failpoint
from sscq_dist.registry import CHAMPION, alias_version, load_model
from sscq_dist.storage import redact_uri

log = logging.getLogger(__name__)

PROMOTION_EXPERIMENT = "sscq-promotion"
EXIT_PROMOTED = 0
EXIT_ERROR = 2
EXIT_REJECTED = 3


class PromotionConflict(RegistryError):
    """`champion` moved between scoring and the alias move (another promotion won the race)."""


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


def ensure_gate_set(cfg: Config, dry_run: bool = False) -> None:
    """Refuse a missing gate set, naming data.queries_uri.

    Only a config with eval.gate_from_bundled_digits (the demo's) builds what is missing
    from scikit-learn's bundled digits: the held-out split at data.queries_uri, the
    training split at the database URI. Never with --dry-run, which writes nothing.
    """
    from sscq_dist.data.schema import shard_files
    from sscq_dist.ingest import digits_records, write_shards
    from sscq_dist.storage import resolve

    database_uri = cfg.data.database_uri or cfg.data.train_uri
    wanted = [("data.queries_uri", cfg.data.queries_uri, "test"),
              ("data.database_uri" if cfg.data.database_uri else "data.train_uri", database_uri, "train")]
    for key, uri, split in wanted:
        loc = resolve(uri, cfg.storage)
        if shard_files(loc):
            continue
        if not cfg.eval.gate_from_bundled_digits:
            raise SSCQError(f"gate set missing: no image shards under {key}={uri}; ingest the held-out "
                            f"evaluation images there (jobs/ingest.py) or point {key} at them")
        if dry_run:
            raise SSCQError(f"gate set missing: no image shards under {key}={uri}, and --dry-run writes nothing, "
                            f"so it is not built from the bundled digits; run once without --dry-run")
        log.info("gate set %s=%s absent: building it from the bundled digits (%s split)", key, uri, split)
        recs = digits_records(split)
        write_shards(iter(recs), loc, 10_000, overwrite=False, total=len(recs), progress=False,
                     source=f"digits (scikit-learn), split {split}")


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
    """Score candidate and champion on the gate set; unless dry_run, record the decision and
    move the alias if earned (compare-and-set)."""
    d = score_gate(name, candidate, cfg, min_improvement, dry_run)
    if not dry_run:
        commit(d, name, cfg, min_improvement)
    return d


def score_gate(name: str, candidate: str, cfg: Config, min_improvement: float = 0.0,
               dry_run: bool = False) -> Decision:
    """Read-only: the gate decision for `candidate` against the current champion."""
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
    ensure_gate_set(cfg, dry_run)
    log.info("scoring %s v%s against champion %s on the gate set %s", name, candidate,
             f"v{champion}" if champion else "none", cfg.data.queries_uri)
    cache: dict = {}
    cand_map, _ = gate_score(f"models:/{name}/{candidate}", cfg, cache)
    champ_map = gate_score(f"models:/{name}/{champion}", cfg, cache)[0] if champion else None
    ok, reason = decide(cand_map, champ_map, min_improvement)
    return Decision(ok, reason, str(candidate), champion, cand_map, champ_map, dry_run)


def commit(d: Decision, name: str, cfg: Config, min_improvement: float = 0.0) -> None:
    """Record the decision (an MLflow run and version tags), then move the alias if earned.

    Compare-and-set: `champion` is re-read before the first write and again right before
    the move; if it no longer names the version the candidate was scored against, nothing
    more is written and PromotionConflict names both versions. (MLflow has no conditional
    alias update, so a move in the few milliseconds between the last read and our write
    can still race; the scoring window, minutes long, cannot.)
    """
    from sscq_dist.tracking import configure

    uri = configure(cfg.tracking)
    try:
        _check_unmoved(d, name)
        _record(d, name, min_improvement, cfg, uri)
        failpoint("promote.recorded")  # tests: a concurrent alias move lands here
        if d.promote:
            _check_unmoved(d, name, recorded=True)
            # Last write: everything above may fail and leave the alias untouched.
            _client().set_registered_model_alias(name, CHAMPION, d.candidate)
    except (PromotionConflict, RegistryError):
        raise
    except Exception as exc:
        raise RegistryError(f"MLflow failed while recording the promotion of {name} v{d.candidate} "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}); "
                            f"alias '{CHAMPION}' unchanged") from None


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _check_unmoved(d: Decision, name: str, recorded: bool = False) -> None:
    now = alias_version(name, CHAMPION)
    if now == d.champion:
        return
    was = f"v{d.champion}" if d.champion else "no champion"
    is_now = f"v{now}" if now else "no champion"
    if recorded:  # best effort: the tags written a moment ago must not claim a promotion
        try:
            _client().set_model_version_tag(name, d.candidate, "promotion.decision", "aborted")
        except Exception:  # noqa: BLE001 - the conflict below is the error to report
            pass
    raise PromotionConflict(f"'{CHAMPION}' of {name} moved from {was} to {is_now} while v{d.candidate} was "
                            f"scored against {was}; alias left at {is_now}, rerun the promotion to score "
                            f"v{d.candidate} against {is_now}")


def _record(d: Decision, name: str, min_improvement: float, cfg: Config, uri: str) -> None:
    """Log the decision run and the version tags (not the alias)."""
    import mlflow

    from sscq_dist.tracking import ensure_experiment

    exp_id = ensure_experiment(PROMOTION_EXPERIMENT, uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"promote-{name}-v{d.candidate}"):
        mlflow.log_params({"model_name": name, "candidate": d.candidate, "champion": d.champion or "none",
                           "min_improvement": min_improvement, "gate_topk": cfg.eval.gate_topk,
                           "gate_queries": cfg.data.queries_uri})
        mlflow.log_metrics({"candidate_map": d.candidate_map,
                            **({"champion_map": d.champion_map} if d.champion_map is not None else {})})
        mlflow.set_tags({"decision": "promote" if d.promote else "reject", "reason": d.reason})
    tags = {"promotion.decision": "promoted" if d.promote else "rejected", "promotion.reason": d.reason,
            "promotion.candidate_map": f"{d.candidate_map:.6f}",
            "promotion.champion_map": "none" if d.champion_map is None else f"{d.champion_map:.6f}",
            "promotion.champion_version": d.champion or "none",
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    client = _client()
    for k, v in tags.items():
        client.set_model_version_tag(name, d.candidate, k, v)
