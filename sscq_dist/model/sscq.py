"""SSCQ model: backbone -> projection head -> product quantizer (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sscq_dist.config import ModelConfig
from sscq_dist.errors import ConfigError
from sscq_dist.model.backbones import build_backbone
from sscq_dist.model.quantizer import ProductQuantizer

# Std of the first head layer's normal init (the authors' projection head).
HEAD_FIRST_LAYER_STD = 0.01


@dataclass
class SSCQOutput:
    """One view's forward pass.

    f: (N, M*d) embedding; z: (N, M*d) soft-quantized embedding;
    soft: (N, M, K) soft assignment probabilities; codes: (N, M) int64 hard argmin codes.
    """

    f: Tensor
    z: Tensor
    soft: Tensor
    codes: Tensor


class SSCQModel(nn.Module):
    """Encoder plus learned product quantizer.

    Args:
        cfg: model config (backbone, bits -> M, K, d, head width, tau_q).
        channels: input image channels (1 grey, 3 colour).

    forward(x (N, C, H, W) float32) -> SSCQOutput; embed(x) -> f (N, M*d).
    """

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        self.cfg = cfg
        self.channels = channels
        self.backbone, backbone_dim = build_backbone(cfg.backbone, channels, cfg.width)
        m, d = cfg.num_codebooks, cfg.codeword_dim
        if m < 1:
            raise ConfigError(f"model.bits={cfg.bits} gives no codebook for K={cfg.num_codewords}")
        if cfg.head_layers == 1:
            self.head = nn.Sequential(nn.Linear(backbone_dim, m * d))
        else:
            self.head = nn.Sequential(
                nn.Linear(backbone_dim, cfg.head_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(cfg.head_hidden, m * d),
            )
            nn.init.normal_(self.head[0].weight, 0.0, HEAD_FIRST_LAYER_STD)
        nn.init.xavier_uniform_(self.head[-1].weight)
        # sqrt(M): each of the M unit-norm-on-average sub-vectors keeps the scale tau_q expects.
        self.embed_scale = math.sqrt(m) if cfg.normalize_embedding else None
        self.quantizer = ProductQuantizer(m, cfg.num_codewords, d, cfg.tau_q)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"SSCQModel expects images of shape (N, {self.channels}, H, W), got {tuple(x.shape)}"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(backbone features (N, backbone_dim), embedding f (N, M*d))."""
        self._check_input(x)
        h = self.backbone(x)
        f = self.head(h)
        if self.embed_scale is not None:
            f = F.normalize(f.float(), dim=-1) * self.embed_scale
        return h, f

    def embed(self, x: Tensor) -> Tensor:
        """Embedding f (N, M*d) only: the cheap path for encoding."""
        return self.encode(x)[1]

    def quantize(self, f: Tensor) -> SSCQOutput:
        """Soft and hard quantization of f, in fp32 even under autocast: sub-vector
        distances to codewords are differences of near-equal numbers, which bf16 blurs."""
        if f.dtype in (torch.float16, torch.bfloat16):  # fp64 (the equivalence tests) stays fp64
            f = f.float()
        with torch.autocast(device_type=f.device.type, enabled=False):
            z, soft, codes = self.quantizer(f)
        return SSCQOutput(f=f, z=z, soft=soft, codes=codes)

    def forward(self, x: Tensor) -> SSCQOutput:
        return self.quantize(self.embed(x))


def build_model(cfg: ModelConfig, channels: int) -> SSCQModel:
    """A randomly initialised SSCQModel for `channels` input planes."""
    return SSCQModel(cfg, channels)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace BatchNorm layers by SyncBatchNorm (GPU workers only; torch refuses CPU tensors)."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
