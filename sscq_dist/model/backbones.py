"""Randomly initialised CNN encoders (never pretrained weights; SPEC section 4).

`build_backbone(name, channels, width)` returns `(module, feature_dim)`; the module maps
(N, C, H, W) float32 images to (N, feature_dim) features.

- `small_cnn`: a few conv-BN-ReLU blocks for 28 px grey images; adaptive pooling, so any
  size >= 8 px works. Cheap enough to train the digits demo on two CPU cores. `width`
  (model.width) multiplies every block's channels: the encoder capacity knob for small
  images (compute grows with width squared).
- `vgg8`: conv-BN-ReLU blocks with max-pooling at full 28 px resolution (channels
  32 | 64-64 | 128-128, pool 28 -> 14 -> 7, then global average pooling): more capacity per
  image than small_cnn's strided blocks (issue 25 measured it better per second). `width`
  scales its channels too.
- `resnet18_cifar`: torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (32 px).
- `resnet50`: torchvision ResNet-50 (224 px), first conv adapted to the input channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sscq_dist.errors import ConfigError

# small_cnn: output channels of each block and its stride (28 px -> 28, 14, 7 -> pooled).
SMALL_CNN_BLOCKS = ((32, 1), (64, 2), (128, 2), (128, 1))

# vgg8: stages of conv3x3-BN-ReLU channels, a 2x2 max-pool between stages.
VGG8_STAGES = ((32,), (64, 64), (128, 128))

BACKBONE_NAMES = ("small_cnn", "vgg8", "resnet18_cifar", "resnet50")


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class _PooledCNN(nn.Module):
    """`features` (a conv stack) followed by global average pooling: (N, C, H, W) -> (N, out_dim)."""

    def __init__(self, layers: list[nn.Module], out_dim: int):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class SmallCNN(_PooledCNN):
    """Conv3x3-BN-ReLU blocks followed by global average pooling.

    Input (N, C, H, W), output (N, SMALL_CNN_BLOCKS[-1][0]).
    """

    def __init__(self, channels: int, blocks: tuple[tuple[int, int], ...] = SMALL_CNN_BLOCKS, width: float = 1.0):
        layers: list[nn.Module] = []
        c_in = channels
        for c, stride in blocks:
            c_out = max(8, int(round(c * width)))
            layers += _conv_bn_relu(c_in, c_out, stride)
            c_in = c_out
        super().__init__(layers, c_in)


class VGG8(_PooledCNN):
    """Conv3x3-BN-ReLU stages with 2x2 max-pooling between them, then global average pooling.

    Input (N, C, H, W) with H, W >= 4; output (N, last stage's channels).
    """

    def __init__(self, channels: int, stages: tuple[tuple[int, ...], ...] = VGG8_STAGES, width: float = 1.0):
        layers: list[nn.Module] = []
        c_in = channels
        for i, stage in enumerate(stages):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for c in stage:
                c_out = max(8, int(round(c * width)))
                layers += _conv_bn_relu(c_in, c_out)
                c_in = c_out
        super().__init__(layers, c_in)


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

    width: channel multiplier of small_cnn and vgg8 (the ResNets have their published widths).
    """
    if channels < 1:
        raise ConfigError(f"backbone input channels must be >= 1, got {channels}")
    if width <= 0:
        raise ConfigError(f"backbone width must be > 0, got {width}")
    if name == "small_cnn":
        net = SmallCNN(channels, width=width)
        return net, net.out_dim
    if name == "vgg8":
        net = VGG8(channels, width=width)
        return net, net.out_dim
    if name == "resnet18_cifar":
        return _resnet18_cifar(channels)
    if name == "resnet50":
        return _resnet50(channels)
    raise ConfigError(f"unknown backbone {name!r} (known: {', '.join(BACKBONE_NAMES)})")
