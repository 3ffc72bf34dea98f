"""The e4e encoder (``Encoder4Editing``) with its progressive stages, and its scaled-down variants.
Design notes: docs/INTERNALS.md, "cycle_encoding.networks.encoder"."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigRecord, check_at_least, check_one_of
from ..ops import resize
from .irse import UNITS_PER_BLOCK, IRSEBody, irse_unit_specs, make_input_layer
from .stylegan2 import EqualLinear

FeatureMaps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
COARSE_END = 3  # heads 0..2 read c3
MIDDLE_END = 7  # heads 3..6 read p2, 7.. read p1


@dataclass(frozen=True)
class EncoderConfig(ConfigRecord):
    num_ws: int = 18
    w_dim: int = 512
    input_size: int = 256
    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256, 512)
    units: tuple[int, ...] = UNITS_PER_BLOCK[50]
    mode: Literal["ir", "ir_se"] = "ir_se"
    max_stage: int | None = None  # None: num_ws - 1 (all offsets); 0: W-only encoder
    style_mode: Literal["delta", "independent"] = "delta"

    def __post_init__(self) -> None:
        check_at_least(self, num_ws=1)
        check_one_of(self, style_mode=("delta", "independent"))
        if len(self.widths) != 4 or len(self.units) != 4:
            raise ValueError("the encoder body has 4 blocks: give 4 widths and 4 unit counts")
        if self.input_size < 16 or self.input_size & (self.input_size - 1):
            raise ValueError(f"input_size must be a power of two >= 16, got {self.input_size}")
        ms = self.num_ws - 1 if self.max_stage is None else self.max_stage
        if not 0 <= ms <= self.num_ws - 1:
            raise ValueError(f"max_stage must be in 0..{self.num_ws - 1}, got {self.max_stage}")
        object.__setattr__(self, "max_stage", ms)
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))

    @property
    def num_heads(self) -> int:
        return int(self.max_stage) + 1 if self.style_mode == "delta" else self.num_ws

    def head_spatial(self, i: int) -> int:
        """Spatial size of the feature map head ``i`` reads (c3: input/16, p2: /8, p1: /4)."""
        s = self.input_size
        return s // 16 if i < COARSE_END else (s // 8 if i < MIDDLE_END else s // 4)


class GradualStyleBlock(nn.Module):
    """map2style: log2(spatial) stride-2 3x3 convs with LeakyReLU(0.01) to 1x1, then an equalized linear."""

    def __init__(self, in_c: int, out_c: int, spatial: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(max(1, int(math.log2(spatial)))):
            mods += [nn.Conv2d(out_c if i else in_c, out_c, 3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*mods)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.convs:
            if isinstance(m, nn.Conv2d) and x.shape[-2:] == (1, 1) and x.dtype != torch.float32:
                # A 3x3 stride-2 convolution of a 1x1 map sees its centre tap only: computed as that 1x1
                # convolution. In bfloat16 (autocast), torch 2.13's CPU backward of the 3x3 form reads
                # uninitialized memory for the weight gradient here (NaN in about 1 call of 4); float32 keeps it.
                x = F.conv2d(
                    x, m.weight[:, :, 1:2, 1:2].to(x.dtype), m.bias.to(x.dtype) if m.bias is not None else None
                )
            else:
                x = m(x)
        if x.shape[-1] != 1 or x.shape[-2] != 1:  # inputs larger than the head was built for
            x = F.adaptive_avg_pool2d(x, 1)
        return self.linear(x.flatten(1))


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class Encoder4Editing(nn.Module):
    """e4e's encoder. ``forward(images) -> ws [B, num_ws, w_dim]`` (absolute codes, ``latent_avg`` added).

    ``stage``: offsets 1..stage are active (0 = W; ``max_stage`` = all). ``trained_stage``: the stage the
    training run ended in, when known (a checkpoint's record); None otherwise.
    """

    def __init__(self, config: EncoderConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = config or EncoderConfig(**kwargs)
        self.input_layer = make_input_layer(c.in_channels, c.widths[0])
        specs = irse_unit_specs(widths=c.widths, units=c.units)
        self.body = IRSEBody(specs, c.mode)
        self.taps = self.body.block_last_units[1:]  # after blocks 2, 3, 4 (IR-SE-50: units 6, 20, 23)
        ch1, ch2, ch3 = (self.body.specs[i][1] for i in self.taps)  # (in_channels, depth, stride)
        self.styles = nn.ModuleList([GradualStyleBlock(ch3, c.w_dim, c.head_spatial(i)) for i in range(c.num_heads)])
        if c.num_heads > COARSE_END:
            self.latlayer1 = nn.Conv2d(ch2, ch3, kernel_size=1)
        if c.num_heads > MIDDLE_END:
            self.latlayer2 = nn.Conv2d(ch1, ch3, kernel_size=1)
        self.register_buffer("latent_avg", torch.zeros(c.num_ws, c.w_dim))
        self._stage = int(c.max_stage)
        self.trained_stage: int | None = None
        self.input_size: int = c.input_size  # the configuration's, fixed for the network's life
        self.num_ws: int = c.num_ws
        self.max_stage: int = int(c.max_stage)

    @property
    def stage(self) -> int:
        return self._stage

    @stage.setter
    def stage(self, value: int | str) -> None:
        if value in ("all", "inference"):
            value = self.max_stage
        elif value == "trained":
            if self.trained_stage is None:
                raise ValueError("this encoder does not know the stage its training ended in")
            value = self.trained_stage
        value = int(value)
        if not 0 <= value <= self.max_stage:
            raise ValueError(f"stage must be in 0..{self.max_stage} (or 'all'), got {value}")
        self._stage = value

    def set_w_avg(self, w_avg: torch.Tensor) -> None:
        """Offset the codes by the generator's average latent ([w_dim] or [num_ws, w_dim])."""
        w = w_avg.detach().to(self.latent_avg)
        self.latent_avg.copy_(w.expand_as(self.latent_avg))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images to ``input_size`` (antialiased bilinear) when they differ; check channels."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"the encoder takes images [B, {self.config.in_channels}, H, W], got {list(images.shape)}")
        return resize(images, self.input_size)

    def features(self, images: torch.Tensor) -> FeatureMaps:
        c1, c2, c3 = self.body.forward_taps(self.input_layer(self.prepare(images)), self.taps)
        return c1, c2, c3

    def offsets(
        self, images: torch.Tensor, features: Callable[[torch.Tensor], FeatureMaps] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w0 [B, w_dim], deltas [B, num_ws, w_dim]) relative to ``latent_avg``; inactive deltas are 0.
        ``features``: what computes the three feature maps (default :meth:`features`; a compiled copy of it, say)."""
        c1, c2, c3 = (features or self.features)(images)
        c = self.config
        w0 = self.styles[0](c3)
        deltas = [torch.zeros_like(w0)]
        feats = c3
        p2 = None
        n_active = min(self._stage, self.max_stage) if c.style_mode == "delta" else c.num_ws - 1
        for i in range(1, c.num_ws):
            if i > n_active:
                deltas.append(torch.zeros_like(w0))
                continue
            if i == COARSE_END:
                p2 = _upsample_add(c3, self.latlayer1(c2))
                feats = p2
            elif i == MIDDLE_END:
                assert p2 is not None
                feats = _upsample_add(p2, self.latlayer2(c1))
            deltas.append(self.styles[i](feats))
        return w0, torch.stack(deltas, dim=1)

    def forward(
        self, images: torch.Tensor, features: Callable[[torch.Tensor], FeatureMaps] | None = None
    ) -> torch.Tensor:
        w0, deltas = self.offsets(images, features)
        if self.config.style_mode == "independent":
            codes = deltas.clone()
            codes[:, 0] = w0
        else:
            codes = w0[:, None, :] + deltas
        return codes + self.latent_avg[None].to(codes.dtype)
