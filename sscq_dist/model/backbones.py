"""Randomly initialised CNN encoders (never pretrained weights; SPEC section 4).

`build_backbone(name, channels, width)` returns `(module, feature_dim)`; the module maps
(N, C, H, W) float32 images to (N, feature_dim) features.

- `small_cnn`: a few conv-BN-ReLU blocks for 28 px grey images; adaptive pooling, so any
  size >= 8 px works. Cheap enough to train the digits demo on two CPU cores. `width`
  (model.width) multiplies every block's channels: the encoder capacity knob for small
  images (compute grows with width squared).
- `resnet18_cifar`: torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (32 px).
- `resnet50`: torchvision ResNet-50 (224 px), first conv adapted to the input channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sscq_dist.errors import ConfigError

# small_cnn: output channels of each block and its stride (28 px -> 28, 14, 7 -> pooled).
SMALL_CNN_BLOCKS = ((32, 1), (64, 2), (128, 2), (128, 1))

BACKBONE_NAMES = ("small_cnn", "resnet18_cifar", "resnet50")


class SmallCNN(nn.Module):
    """Conv3x3-BN-ReLU blocks followed by global average pooling.

    Input (N, C, H, W), output (N, SMALL_CNN_BLOCKS[-1][0]).
    """

    def __init__(self, channels: int, blocks: tuple[tuple[int, int], ...] = SMALL_CNN_BLOCKS, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for c, stride in blocks:
            c_out = max(8, int(round(c * width)))
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _resnet18_cifar(channels: int) -> tuple[nn.Module, int]:
    import torchvision  # only the ResNets need it; keeps small_cnn workers light to start

    net = torchvision.models.resnet18(weights=None)
    # CIFAR stem: 3x3 stride-1 conv, no max-pool, so 32 px images keep their resolution.
    net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _resnet50(channels: int) -> tuple[nn.Module, int]:
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    if channels != net.conv1.in_channels:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def build_backbone(name: str, channels: int, width: float = 1.0) -> tuple[nn.Module, int]:
    """Backbone module and its feature dimension for `name` and `channels` input planes.

    width: channel multiplier of small_cnn (the ResNets have their published widths).
    """
    if channels < 1:
        raise ConfigError(f"backbone input channels must be >= 1, got {channels}")
    if width <= 0:
        raise ConfigError(f"backbone width must be > 0, got {width}")
    if name == "small_cnn":
        net = SmallCNN(channels, width=width)
        return net, net.out_dim
    if name == "resnet18_cifar":
        return _resnet18_cifar(channels)
    if name == "resnet50":
        return _resnet50(channels)
    raise ConfigError(f"unknown backbone {name!r} (known: {', '.join(BACKBONE_NAMES)})")
