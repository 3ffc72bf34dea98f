"""StyleGAN2's residual discriminator in plain PyTorch, in rosinality's module layout (the names of its ``d`` state
dict), widths by NVIDIA's rule as for the generator (``stylegan2.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import Blur, FusedLeakyReLU
from .stylegan2 import EqualLinear, WidthsConfig


class EqualConv2d(nn.Module):
    """Convolution with equalized learning rate and no bias (the bias is in the activation after it, or absent: the
    residual skip has none)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, stride=self.stride, padding=self.padding)


@dataclass(frozen=True)
class DiscriminatorConfig(WidthsConfig):
    resolution: int = 1024
    channel_base: int = 32768
    channel_max: int = 512
    img_channels: int = 3
    blur_kernel: tuple[float, ...] = (1, 3, 3, 1)
    stddev_group: int = 4
    stddev_feat: int = 1

    def __post_init__(self) -> None:
        self._check("resolution", "channel_base", "channel_max", "img_channels", "stddev_group", "stddev_feat")


class ConvLayer(nn.Sequential):
    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        downsample: bool = False,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        activate: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, stride, padding))
        if activate:
            layers.append(FusedLeakyReLU(out_channel))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, blur_kernel: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, blur_kernel=blur_kernel, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator with minibatch standard deviation (rosinality's layout)."""

    def __init__(self, config: DiscriminatorConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config = config or DiscriminatorConfig(**kwargs)
        ch = config.channels()
        size = config.resolution
        convs: list[nn.Module] = [ConvLayer(config.img_channels, ch[size], 1)]
        in_channel = ch[size]
        for i in range(config.log_size, 2, -1):
            out_channel = ch[2 ** (i - 1)]
            convs.append(ResBlock(in_channel, out_channel, config.blur_kernel))
            in_channel = out_channel
        self.convs = nn.Sequential(*convs)
        self.final_conv = ConvLayer(in_channel + 1, ch[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(ch[4] * 4 * 4, ch[4], activation="fused_lrelu"),
            EqualLinear(ch[4], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        batch, channel, height, width = out.shape
        group = min(batch, self.config.stddev_group)
        while batch % group:  # the group must divide the batch
            group -= 1
        feat = self.config.stddev_feat
        stddev = out.view(group, -1, feat, channel // feat, height, width)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8)
        stddev = stddev.mean([2, 3, 4], keepdim=True).squeeze(2)
        stddev = stddev.repeat(group, 1, height, width)
        out = torch.cat([out, stddev], 1)
        out = self.final_conv(out)
        return self.final_linear(out.view(batch, -1))
