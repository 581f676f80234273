"""Typed config: YAML + overrides, one clear error naming the key."""

import pytest

from sscq_dist.config import Config, load_config
from sscq_dist.errors import ConfigError


def test_repo_configs_load_and_resolve():
    for path in ("configs/digits.yaml", "configs/fashion_mnist.yaml"):
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        assert cfg.model.num_codebooks * 4 == cfg.model.bits


def test_overrides_are_typed():
    cfg = load_config("configs/digits.yaml", ["model.bits=64", "train.lr=0.002", "bank.enabled=true",
                                              "tracking.tracking_uri=sqlite:///x.db"])
    assert cfg.model.bits == 64 and cfg.model.num_codebooks == 16 and cfg.model.embedding_dim == 256
    assert cfg.train.lr == 0.002 and cfg.bank.enabled is True
    assert cfg.tracking.tracking_uri == "sqlite:///x.db"


@pytest.mark.parametrize("override,key", [
    ("model.bitz=32", "model.bitz"),
    ("nosection.x=1", "nosection"),
    ("model.bits=12", "model.bits"),
    ("model.bits=abc", "model.bits"),
    ("train.lr=-1", "train.lr"),
    ("loss.tau_cd=0", "loss.tau_cd"),
    ("loss.debias_tau_plus=1", "loss.debias_tau_plus"),
    ("loss.fn_cancel_k=-2", "loss.fn_cancel_k"),
    ("train.global_batch_size=127", "train.global_batch_size"),
    ("data.augment.hflip_p=1.5", "data.augment.hflip_p"),
    ("data.augment.erase_p=2", "data.augment.erase_p"),
    ("data.augment.rotate_deg=-10", "data.augment.rotate_deg"),
    ("data.augment.erase_scale_max=1.0", "data.augment.erase_scale_min"),
    ("bank.enabled=maybe", "bank.enabled"),
    ("index.index_type=hnsw", "index.index_type"),
    ("index.encode_bytes_per_actor=-1", "index.encode_bytes_per_actor"),
    ("data.max_drop_fraction=1.5", "data.max_drop_fraction"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps"),
    ("train.bf16=maybe", "train.bf16"),
    ("train.channels_last=2", "train.channels_last"),
    ("train.compile=fast", "train.compile"),
    ("train.time_budget_minutes=-5", "train.time_budget_minutes"),
    ("train.time_budget_minutes=inf", "train.time_budget_minutes"),
    ("model.head_layers=3", "model.head_layers"),
    ("model.backbone=vgg11", "model.backbone"),
    ("train.optimizer=lamb", "train.optimizer"),
    ("train.momentum=1.0", "train.momentum"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/digits.yaml", [override])
    msg = str(exc.value)
    assert key in msg and "\n" not in msg


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_params_and_hash_are_stable():
    a, b = load_config("configs/digits.yaml"), load_config("configs/digits.yaml")
    assert a.hash() == b.hash()
    assert a.hash() != load_config("configs/digits.yaml", ["model.bits=16"]).hash()
    flat = a.flat()
    assert flat["model.bits"] == 32 and "data.augment.blur_p" in flat
