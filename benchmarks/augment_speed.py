"""Two-view augmentation on the worker: our batched ops vs the same pipeline in kornia.augmentation.

Both make two views per image from a uint8 batch with per-sample random parameters:
random resized crop, horizontal flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian
blur, normalise. Timed on one device (CPU by default), median of --repeats runs per case.

    python benchmarks/augment_speed.py                          # batch 128 and 256, 16 and 28 px, 1 channel
    python benchmarks/augment_speed.py --device cuda --channels 3 --sizes 32 224
    python benchmarks/augment_speed.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 28])
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="batch 32, 16 px, 3 repeats")
    a = p.parse_args(argv)
    if a.smoke:
        a.batches, a.sizes, a.repeats = [32], [16], 3
    return a


def kornia_pipeline(cfg, size: int):
    """The same augmentation as sscq_dist.data.augment, built from kornia.augmentation."""
    import kornia.augmentation as K

    k = max(3, int(0.1 * size) | 1)
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                            ratio=(cfg.crop_ratio_min, cfg.crop_ratio_max)),
        K.RandomHorizontalFlip(p=cfg.hflip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, 0.0, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.grayscale_p),
        K.RandomGaussianBlur((k, k), (cfg.blur_sigma_min, cfg.blur_sigma_max), p=cfg.blur_p),
        K.Normalize(mean=0.5, std=0.5),
    )


def median_seconds(fn, repeats: int, device) -> float:
    import torch

    fn()  # warm-up (first-call allocation, kernel selection)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    import torch

    from sscq_dist.config import AugmentConfig
    from sscq_dist.data.augment import two_views

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = AugmentConfig()
    print(f"device {device}, torch threads {torch.get_num_threads()}, {a.channels} channel(s); "
          "images/s for two views per image (median of {} runs)".format(a.repeats))
    print("| batch | px | ours images/s | kornia images/s | ours / kornia |")
    print("|---:|---:|---:|---:|---:|")
    for size in a.sizes:
        aug = kornia_pipeline(cfg, size).to(device)
        for b in a.batches:
            u8 = torch.randint(0, 256, (b, size, size, a.channels), dtype=torch.uint8, device=device)

            def ours():
                return two_views(u8, cfg, seed=0, step=1)

            def kornia():
                x = u8.permute(0, 3, 1, 2).float().div(255.0)
                return torch.cat([aug(x), aug(x)])

            t_ours, t_k = median_seconds(ours, a.repeats, device), median_seconds(kornia, a.repeats, device)
            print(f"| {b} | {size} | {b / t_ours:,.0f} | {b / t_k:,.0f} | {t_k / t_ours:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
