"""Residual blocks that expose their parts.

Each block has torchvision's parameter names (``conv1``, ``bn1``, ..., ``downsample``) so torchvision
weights load unchanged, and splits its computation into:

* :meth:`residual` -- the residual branch F'(x) (convs and BNs, no final activation),
* :meth:`shortcut` -- S(x): the identity or the projection (1x1 conv + BN),
* :meth:`merge` -- the activation applied to ``residual + shortcut``.

``forward(x) == merge(residual(x), shortcut(x))``. Executors combine these parts to run a block on part of
a batch; a skipped block produces ``shortcut(x)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """The projection shortcut: 1x1 conv (with stride) + BN, named like torchvision's ``downsample``."""
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class ResidualBlock(nn.Module):
    """Shared behaviour of the block types. Subclasses define ``residual`` and set ``expansion``."""

    expansion: int = 1
    downsample: nn.Module | None

    def residual(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    @staticmethod
    def merge(residual: Tensor, shortcut: Tensor) -> Tensor:
        return torch.relu(residual + shortcut)

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.residual(x), self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR 6n+2 ResNets)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (stride) -> 1x1 with expansion 4 (ResNet-50/101/152, torchvision v1.5 layout)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))
