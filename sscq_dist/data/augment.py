"""Batched SimCLR-style augmentation on the training worker's device (SPEC section 4).

The stream carries decoded uint8 images, NHWC (N, H, W, C): the layout decoders produce
and, viewed as NCHW with `permute(0, 3, 1, 2)`, already a channels-last tensor. The two
views are made here, inside the training worker, on its device (GPU when present), so no
float tensor and no second view ever crosses the object store.

Random parameters are drawn per sample, all at once, from a CPU `torch.Generator` seeded
by (seed, rank, step) (`view_seed`), then moved to the images' device: the same seed gives
the same views on CPU and GPU, and a resumed run redraws exactly the views it would have
made. Each op runs on the whole batch (one `grid_sample` for crop + resize + flip, one
grouped convolution pair for the blur). This hand-written version stays because it
measured 3.5-7x faster than the same pipeline built from `kornia.augmentation` on CPU
(batch 256, 1 channel, 16 and 28 px; `benchmarks/augment_speed.py`, BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
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


def nhwc_to_nchw(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W) view, no copy (strides are channels-last)."""
    if images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got shape {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2)


def view_seed(seed: int, rank: int, step: int, view: int = 0) -> int:
    """A 63-bit generator seed for (run seed, worker rank, global step, view index)."""
    return int(np.random.SeedSequence([seed, rank, step, view]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class ViewParams:
    """Per-sample random parameters of one view; every field has shape (N,).

    area, log_ratio: crop area (fraction of the image) and log aspect ratio;
    cx, cy: crop centre in [-1, 1] units of the free margin; flip: 1 = mirrored;
    jitter: 1 = colour jitter applied, with factors brightness, contrast, saturation;
    gray: 1 = converted to grey (colour images only); blur: 1 = blurred with sigma;
    angle: rotation in radians; erase: 1 = a rectangle of erase_area (fraction of the image),
    aspect exp(erase_log_ratio), corner at (erase_cx, erase_cy) of the free margin, is erased.
    """

    area: torch.Tensor
    log_ratio: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    # None while the config's rotation and erasing are off.
    angle: Optional[torch.Tensor] = None
    erase: Optional[torch.Tensor] = None
    erase_area: Optional[torch.Tensor] = None
    erase_log_ratio: Optional[torch.Tensor] = None
    erase_cx: Optional[torch.Tensor] = None
    erase_cy: Optional[torch.Tensor] = None


def _span(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return u * (hi - lo) + lo


def sample_params(n: int, cfg: AugmentConfig, generator: torch.Generator,
                  device: Optional[torch.device] = None) -> ViewParams:
    """Draw one view's parameters for n samples (one `torch.rand` call on the CPU generator)."""
    u = torch.rand(n, 12, generator=generator)
    cols = u.to(device) if device is not None else u
    c = [cols[:, i] for i in range(12)]
    return ViewParams(
        area=_span(c[0], cfg.crop_scale_min, cfg.crop_scale_max),
        log_ratio=_span(c[1], math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)),
        cx=c[2] * 2 - 1,
        cy=c[3] * 2 - 1,
        flip=(c[4] < cfg.hflip_p).float(),
        jitter=(c[5] < cfg.jitter_p).float(),
        brightness=_span(c[6], max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
        contrast=_span(c[7], max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
        saturation=_span(c[8], max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
        gray=(c[9] < cfg.grayscale_p).float(),
        blur=(c[10] < cfg.blur_p).float(),
        sigma=_span(c[11], cfg.blur_sigma_min, cfg.blur_sigma_max),
        **_geometry_params(n, cfg, generator, device),
    )


def _geometry_params(n: int, cfg: AugmentConfig, generator: torch.Generator,
                     device: Optional[torch.device]) -> dict:
    """Rotation and erasing draws: a second `torch.rand` call, made only when either is on, so
    configs without them keep their exact views (and resumed runs their exact draws)."""
    if cfg.rotate_deg <= 0 and cfg.erase_p <= 0:
        return {}
    u = torch.rand(n, 6, generator=generator)
    c = [col for col in (u.to(device) if device is not None else u).T]
    return {
        "angle": _span(c[0], -cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180.0),
        "erase": (c[1] < cfg.erase_p).float(),
        "erase_area": _span(c[2], cfg.erase_scale_min, cfg.erase_scale_max),
        "erase_log_ratio": _span(c[3], -math.log(3.0), math.log(3.0)),
        "erase_cx": c[4],
        "erase_cy": c[5],
    }


def random_resized_crop_flip(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Crop each sample's window, resize it back to (H, W), mirror where p.flip = 1."""
    n = x.shape[0]
    ratio = torch.exp(p.log_ratio)
    # Half-extents in normalised coordinates ([-1, 1] spans the image).
    w = torch.sqrt(p.area * ratio).clamp(max=1.0)
    h = torch.sqrt(p.area / ratio).clamp(max=1.0)
    sign = 1.0 - 2.0 * p.flip
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 2] = p.cx * (1 - w)
    theta[:, 1, 2] = p.cy * (1 - h)
    if p.angle is None:
        theta[:, 0, 0] = w * sign
        theta[:, 1, 1] = h
    else:  # the crop window turned by angle about its centre: R(angle) @ diag(w * sign, h)
        cos, sin = torch.cos(p.angle), torch.sin(p.angle)
        theta[:, 0, 0] = cos * w * sign
        theta[:, 0, 1] = -sin * h
        theta[:, 1, 0] = sin * w * sign
        theta[:, 1, 1] = cos * h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Brightness, contrast and (colour only) saturation, applied where p.jitter = 1."""
    n = x.shape[0]
    b, c, s = (t.view(n, 1, 1, 1) for t in (p.brightness, p.contrast, p.saturation))
    y = (x * b).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * c + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(y)
        y = ((y - gray) * s + gray).clamp(0, 1)
    return torch.where(p.jitter.view(n, 1, 1, 1) > 0, y, x)


def random_grayscale(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return torch.where(p.gray.view(-1, 1, 1, 1) > 0, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma; samples with p.blur = 0 get a delta kernel."""
    n, ch, hgt, wid = x.shape
    # Kernel about 10% of the image side, odd, at least 3 (SimCLR's choice).
    k = max(3, int(0.1 * min(hgt, wid)) | 1)
    r = torch.arange(k, dtype=x.dtype, device=x.device) - (k - 1) / 2
    ker = torch.exp(-(r.view(1, k) ** 2) / (2 * p.sigma.view(n, 1) ** 2))
    ker = ker / ker.sum(1, keepdim=True)
    delta = torch.zeros(k, dtype=x.dtype, device=x.device)
    delta[(k - 1) // 2] = 1.0
    ker = torch.where(p.blur.view(n, 1) > 0, ker, delta.view(1, k))
    ker = ker.repeat_interleave(ch, dim=0)  # one kernel per (sample, channel) group
    y = x.reshape(1, n * ch, hgt, wid)
    pad = k // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), ker.view(n * ch, 1, 1, k), groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), ker.view(n * ch, 1, k, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def random_erase(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Fill one rectangle per sample (where p.erase = 1) with NORM_MEAN (0 once normalised)."""
    if p.erase is None:
        return x
    n, _, hgt, wid = x.shape
    ratio = torch.exp(p.erase_log_ratio)
    eh = (torch.sqrt(p.erase_area / ratio) * hgt).clamp(1, hgt)
    ew = (torch.sqrt(p.erase_area * ratio) * wid).clamp(1, wid)
    top = p.erase_cy * (hgt - eh)
    left = p.erase_cx * (wid - ew)
    rows = torch.arange(hgt, device=x.device, dtype=x.dtype).view(1, hgt, 1)
    cols = torch.arange(wid, device=x.device, dtype=x.dtype).view(1, 1, wid)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
    mask = (inside & (p.erase.view(n, 1, 1) > 0)).unsqueeze(1)
    return torch.where(mask, torch.full_like(x, NORM_MEAN), x)


def apply_view(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1] -> one augmented, normalised view (N, C, H, W)."""
    x = random_resized_crop_flip(x, p)
    x = color_jitter(x, p)
    x = random_grayscale(x, p)
    x = gaussian_blur(x, p)
    x = random_erase(x, p)
    return normalize(x)


def augment(images_u8: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One augmented, normalised view: uint8 (N, C, H, W) -> float32 (N, C, H, W), on the images' device."""
    g = generator if generator is not None else torch.Generator().manual_seed(torch.seed())
    p = sample_params(images_u8.shape[0], cfg, g, images_u8.device)
    return apply_view(to_float(images_u8), p)


def two_views(images_nhwc: torch.Tensor, cfg: AugmentConfig, seed: int, rank: int = 0, step: int = 0,
              channels_last: bool = False) -> torch.Tensor:
    """The training input of one step: uint8 (N, H, W, C) -> float32 (2N, C, H, W) = [view a; view b].

    Both views come from one generator seeded by (seed, rank, step), so they differ from
    each other and are reproducible for a seed. channels_last returns the batch in that
    memory format (what cuDNN's fast convolutions want).
    """
    g = torch.Generator().manual_seed(view_seed(seed, rank, step))
    x = to_float(nhwc_to_nchw(images_nhwc))
    n = x.shape[0]
    pa = sample_params(n, cfg, g, x.device)
    pb = sample_params(n, cfg, g, x.device)
    views = torch.cat([apply_view(x, pa), apply_view(x, pb)])
    return views.contiguous(memory_format=torch.channels_last) if channels_last else views.contiguous()


def eval_view(images_u8: torch.Tensor) -> torch.Tensor:
    """Deterministic view for evaluation and encoding: resize already done, normalise only."""
    return normalize(to_float(images_u8))
