"""SSCQ model: randomly initialised CNN encoder, projection head, learned product quantizer."""

from sscq_dist.model.backbones import build_backbone
from sscq_dist.model.quantizer import ProductQuantizer, hard_codes, squared_distances
from sscq_dist.model.sscq import SSCQModel, SSCQOutput, build_model, convert_sync_batchnorm

__all__ = [
    "ProductQuantizer",
    "SSCQModel",
    "SSCQOutput",
    "build_backbone",
    "build_model",
    "convert_sync_batchnorm",
    "hard_codes",
    "squared_distances",
]
