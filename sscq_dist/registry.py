"""MLflow model registry: package, log, register, load and alias SSCQ models.

A logged model is an MLflow pyfunc whose artifacts are plain files: `state_dict.pt`
(tensors only, loaded with `weights_only=True`), `config.yaml` and `codebooks.npy`.
Loading rebuilds the network from the config, so no training-code globals are unpickled.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import yaml

from sscq_dist.config import Config, from_dict
from sscq_dist.errors import RegistryError

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
STATE_FILE = "state_dict.pt"
CONFIG_FILE = "config.yaml"
CODEBOOKS_FILE = "codebooks.npy"
CHAMPION = "champion"
CHALLENGER = "challenger"
_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # SSCQModel in eval mode
    cfg: Config
    name: Optional[str]
    version: Optional[str]
    uri: str

    @property
    def codebooks(self) -> np.ndarray:
        return self.model.quantizer.codebooks.detach().cpu().numpy().astype(np.float32)


def parse_model_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """`models:/name/3` or `models:/name@alias` -> (name, version, alias)."""
    m = _URI_RE.match(uri or "")
    if not m:
        raise RegistryError(f"model URI {uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    return m["name"], m["version"], m["alias"]


def write_model_dir(directory: str, state_dict: dict, cfg: Config) -> None:
    """The model's plain-file artifacts."""
    os.makedirs(directory, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(cfg.to_yaml())
    cb = state_dict["quantizer.codebooks"].detach().cpu().float().numpy()
    np.save(os.path.join(directory, CODEBOOKS_FILE), cb)


def read_model_dir(directory: str) -> tuple[torch.nn.Module, Config]:
    """Rebuild the model from plain files; tensors only (weights_only=True)."""
    from sscq_dist.model import build_model

    cfg_path = os.path.join(directory, CONFIG_FILE)
    state_path = os.path.join(directory, STATE_FILE)
    if not (os.path.isfile(cfg_path) and os.path.isfile(state_path)):
        raise RegistryError(f"model directory {directory} lacks {CONFIG_FILE} or {STATE_FILE}")
    with open(cfg_path) as f:
        cfg = from_dict(yaml.safe_load(f))
    model = build_model(cfg.model, cfg.data.channels)
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, cfg


# The pyfunc's source, logged as code (models from code): MLflow pickles nothing.
PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow_model.py")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def log_and_register(state_dict: dict, cfg: Config, run_id: str, name: str, data_uri: str,
                     alias: str = CHALLENGER) -> str:
    """Log the model to `run_id`, register a new version of `name`, set `alias`; returns the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import sscq_dist

    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        pkg_dir = os.path.join(tmp, "sscq_dist")
        shutil.copytree(os.path.dirname(os.path.abspath(sscq_dist.__file__)), pkg_dir,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        model_dir = os.path.join(tmp, "sscq_model")
        write_model_dir(model_dir, state_dict, cfg)
        example = np.zeros((1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), dtype=np.float32)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=PYFUNC_CODE,
                artifacts={"model_dir": model_dir},
                code_paths=[pkg_dir],
                input_example=example,
                # Explicit requirements: inference would import and profile the model.
                pip_requirements=["torch", "numpy", "pyyaml", "mlflow"],
            )
    client = MlflowClient()
    tags = {"git_commit": _git_commit(), "data_uri": data_uri, "bits": str(cfg.model.bits),
            "config_hash": cfg.hash(), "backbone": cfg.model.backbone}
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def alias_version(name: str, alias: str) -> Optional[str]:
    """The version an alias points to, None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def load_model(uri: str, tracking_cfg=None) -> LoadedModel:
    """Load `models:/name/<version>` or `models:/name@alias` (or a local model dir) for inference."""
    if os.path.isdir(uri):  # no MLflow import: encoder actors start faster
        model, cfg = read_model_dir(uri)
        return LoadedModel(model, cfg, None, None, uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import mlflow

    from sscq_dist.tracking import configure

    name, version, alias = parse_model_uri(uri)
    configure(tracking_cfg)
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp)
            model_dir = _find_model_dir(path)
            model, cfg = read_model_dir(model_dir)
    except MlflowException as exc:
        raise RegistryError(f"model {uri} not found or unreadable: {str(exc).splitlines()[0][:200]}") from None
    return LoadedModel(model, cfg, name, str(mv.version), f"models:/{name}/{mv.version}")


def _find_model_dir(root: str) -> str:
    for dirpath, _, files in os.walk(root):
        if STATE_FILE in files and CONFIG_FILE in files:
            return dirpath
    raise RegistryError(f"no {STATE_FILE} in the downloaded model at {root}")
