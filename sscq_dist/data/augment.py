"""Batched SimCLR-style augmentation on tensors (SPEC section 4).

Each op draws its parameters per sample and runs on the whole batch at once (one
`grid_sample` for crop + resize + flip, one grouped convolution for the blur), which is
what keeps two-view augmentation fast on a couple of CPU cores.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from sscq_dist.config import AugmentConfig

# Pixels are scaled to [0, 1] and then normalised with this mean/std for every channel.
NORM_MEAN = 0.5
NORM_STD = 0.5


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return images_u8.to(torch.float32).div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - NORM_MEAN) / NORM_STD


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def random_resized_crop_flip(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Crop a random area/aspect window per sample, resize it back, flip with hflip_p."""
    n = x.shape[0]
    area = _uniform(n, cfg.crop_scale_min, cfg.crop_scale_max, g)
    log_ratio = _uniform(n, math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max), g)
    ratio = torch.exp(log_ratio)
    # Half-extents in normalised coordinates ([-1, 1] spans the image).
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g) < cfg.hflip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and (colour only) saturation, applied per sample with jitter_p."""
    n = x.shape[0]
    on = (torch.rand(n, generator=g) < cfg.jitter_p).view(n, 1, 1, 1)
    b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g).view(n, 1, 1, 1)
    c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g).view(n, 1, 1, 1)
    s = _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, g).view(n, 1, 1, 1)
    y = (x * b).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * c + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(y)
        y = ((y - gray) * s + gray).clamp(0, 1)
    return torch.where(on, y, x)


def random_grayscale(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    n = x.shape[0]
    on = (torch.rand(n, generator=g) < cfg.grayscale_p).view(n, 1, 1, 1)
    return torch.where(on, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma; samples not drawn get a delta kernel."""
    n, ch, hgt, wid = x.shape
    # Kernel about 10% of the image side, odd, at least 3 (SimCLR's choice).
    k = max(3, int(0.1 * min(hgt, wid)) | 1)
    sigma = _uniform(n, cfg.blur_sigma_min, cfg.blur_sigma_max, g)
    on = torch.rand(n, generator=g) < cfg.blur_p
    r = torch.arange(k, dtype=x.dtype) - (k - 1) / 2
    ker = torch.exp(-(r.view(1, k) ** 2) / (2 * sigma.view(n, 1) ** 2))
    ker = ker / ker.sum(1, keepdim=True)
    delta = torch.zeros(k, dtype=x.dtype)
    delta[(k - 1) // 2] = 1.0
    ker = torch.where(on.view(n, 1), ker, delta.view(1, k))
    ker = ker.repeat_interleave(ch, dim=0)  # one kernel per (sample, channel) group
    y = x.reshape(1, n * ch, hgt, wid)
    pad = k // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), ker.view(n * ch, 1, 1, k), groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), ker.view(n * ch, 1, k, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def augment(images_u8: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One augmented, normalised view: uint8 (N, C, H, W) -> float32 (N, C, H, W)."""
    g = generator if generator is not None else torch.Generator().manual_seed(torch.seed())
    x = to_float(images_u8)
    x = random_resized_crop_flip(x, cfg, g)
    x = color_jitter(x, cfg, g)
    x = random_grayscale(x, cfg, g)
    x = gaussian_blur(x, cfg, g)
    return normalize(x)


def eval_view(images_u8: torch.Tensor) -> torch.Tensor:
    """Deterministic view for evaluation and encoding: resize already done, normalise only."""
    return normalize(to_float(images_u8))
