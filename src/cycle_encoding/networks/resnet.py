"""ResNet-50 with torchvision's module names (``conv1``, ``bn1``, ``layer{1..4}.{j}.conv{1,2,3}``, ``bn{1,2,3}``,
``downsample.{0,1}``, ``fc``), so torchvision-layout state dicts (and MoCo's ``encoder_q``) load as they are.

torchvision's "v1.5" variant: the stride of a downsampling bottleneck sits on its 3x3 convolution.
"""

from __future__ import annotations

import torch
from torch import nn

RESNET50_BLOCKS: tuple[int, int, int, int] = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv1x1(x4) -> BN, + identity or downsample, ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class ResNet50(nn.Module):
    """torchvision's ResNet-50. ``num_classes=None`` leaves out ``fc`` (as MoCo's feature extractor does)."""

    def __init__(self, num_classes: int | None = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_c = 64
        for i, (n, planes) in enumerate(zip(RESNET50_BLOCKS, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            units = [Bottleneck(in_c, planes, stride)]
            in_c = planes * Bottleneck.expansion
            units += [Bottleneck(in_c, planes, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes) if num_classes else None

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after the stem's ReLU and after each of layer1..layer4."""
        x = self.relu(self.bn1(self.conv1(x)))
        out = [x]
        x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out.append(x)
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the 2048-d globally averaged features of layer4 (before ``fc``)."""
        return torch.flatten(self.avgpool(self.features(x)[-1]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pooled(x)
        return self.fc(f) if self.fc is not None else f
