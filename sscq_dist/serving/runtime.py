"""Serve settings shared by the ingress and the partition deployments: the run-time keys
(`user_config`, changed by `reconfigure`) and the deployments' names."""

import dataclasses
from typing import Optional

from sscq_dist.config import ServeConfig, validate_serve
from sscq_dist.errors import SSCQError

APP_NAME = "sscq-search"
INGRESS_NAME = "SearchIngress"
# ServeConfig fields that are the deployments' user_config (changed at run time by reconfigure).
RUNTIME_FIELDS = ("watch_interval_s", "retain_previous_s", "default_k", "max_k", "nprobe", "partition_timeout_s",
                  "partition_retries", "max_upload_bytes", "thumb_size", "rate_limit_per_s", "rate_limit_burst",
                  "max_in_flight", "request_timeout_s")


def partition_name(number: int) -> str:
    return f"Partition{number}"


def runtime_settings(sv: ServeConfig) -> dict:
    return {f: getattr(sv, f) for f in RUNTIME_FIELDS}


def apply_runtime(sv: ServeConfig, user_config: Optional[dict]) -> ServeConfig:
    """The serve settings with a user_config applied; unknown keys or bad values are one error line."""
    unknown = set(user_config or {}) - set(RUNTIME_FIELDS)
    if unknown:
        raise SSCQError(f"serve user_config: unknown key(s) {sorted(unknown)} (run-time keys: {', '.join(RUNTIME_FIELDS)})")
    return validate_serve(dataclasses.replace(sv, **(user_config or {})))


def reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


