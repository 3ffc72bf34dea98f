"""StyleGAN2 generator in plain PyTorch, in rosinality's module layout, NVIDIA's calls accepted too (its
discriminator: ``discriminator.py``).
Design notes: docs/INTERNALS.md, "cycle_encoding.networks.stylegan2"."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigRecord, check_at_least, check_one_of
from ..ops import Blur, FusedLeakyReLU, Upsample, fused_leaky_relu

NoiseMode = Literal["const", "random", "none"]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)


class WidthsConfig(ConfigRecord):
    """What the generator's and the discriminator's configurations share: the checks, widths by NVIDIA's rule
    ``min(channel_base // res, channel_max)`` and the dict form."""

    resolution: int
    channel_base: int
    channel_max: int
    img_channels: int
    blur_kernel: tuple[float, ...]

    def _check(self, *integers: str) -> None:
        """``integers``: fields that must be integers (one clear line for another type, numpy ints kept)."""
        for name in integers:
            v = getattr(self, name)
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        r = self.resolution
        if not (8 <= r <= 1024) or r & (r - 1):
            raise ValueError(f"resolution must be a power of two from 8 to 1024, got {r}")
        check_one_of(self, img_channels=(1, 3))

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    def channels(self) -> dict[int, int]:
        return {2**i: min(self.channel_base // 2**i, self.channel_max) for i in range(2, self.log_size + 1)}


@dataclass(frozen=True)
class GeneratorConfig(WidthsConfig):
    """Architecture of a StyleGAN2 generator (everything needed to build it)."""

    resolution: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_base: int = 32768
    channel_max: int = 512
    img_channels: int = 3
    lr_mlp: float = 0.01
    blur_kernel: tuple[float, ...] = (1, 3, 3, 1)

    def __post_init__(self) -> None:
        self._check("resolution", "style_dim", "n_mlp", "channel_base", "channel_max", "img_channels")
        check_at_least(self, n_mlp=1)
        if min(self.channels().values()) < 1:
            raise ValueError("channel_base is too small: some resolution would get 0 channels")
        object.__setattr__(self, "blur_kernel", tuple(float(v) for v in self.blur_kernel))

    @classmethod
    def rosinality(cls, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2, **kw: Any):
        """The architecture of rosinality's ``Generator(size, style_dim, n_mlp, channel_multiplier)``."""
        return cls(
            resolution=size,
            style_dim=style_dim,
            n_mlp=n_mlp,
            channel_base=16384 * channel_multiplier,
            channel_max=512,
            **kw,
        )

    @property
    def num_ws(self) -> int:
        return 2 * self.log_size - 2

    @property
    def num_noises(self) -> int:
        return 2 * (self.log_size - 2) + 1

    @property
    def channel_multiplier(self) -> float | None:
        """rosinality's channel multiplier, when this width is one of its configurations."""
        return self.channel_base / 16384 if self.channel_max == 512 else None


def _config_property(name: str) -> Any:
    """A read-only property giving ``self.config.<name>``."""
    return property(lambda self: getattr(self.config, name))


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (weights stored as randn / lr_mul)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init))
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}"


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution with optional weight demodulation and x2 upsampling.

    ``fused=True``: one weight per sample and a grouped convolution (StyleGAN2's form); ``fused=False``: the input
    scaled by the style, one shared convolution, the output scaled by the demodulation (equal to float rounding;
    faster for batches, ``benchmarks/generator.py``); ``fused=None``: the grouped form for a batch of one only.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate
        self.fused: bool | None = None

    def extra_repr(self) -> str:
        return (
            f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, "
            f"upsample={self.upsample}, demodulate={self.demodulate}"
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        # the weight's scale goes on the style ([B, in]), not on the weight: one full-size product fewer
        s = self.modulation(style) * self.scale  # [B, in]
        weight = self.weight.squeeze(0)  # [out, in, k, k] (a view, whose gradient is no full-size copy)
        if self.fused or (self.fused is None and x.shape[0] == 1):
            return self._forward_fused(x, s, weight)
        x = x * s[:, :, None, None].to(x.dtype)
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum_{i,k} (w_oik * s_i)^2 = sum_i s_i^2 * sum_k w_oik^2
            demod = torch.rsqrt(s.pow(2) @ weight.pow(2).sum([2, 3]).t() + self.eps)  # [B, out]
            out = out * demod[:, :, None, None].to(out.dtype)
        if self.upsample:
            out = self.blur(out)
        return out

    def _forward_fused(self, x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        batch, in_channel, height, width = x.shape
        k = self.kernel_size
        weight = weight * s.view(batch, 1, in_channel, 1, 1)
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
        x = x.reshape(1, batch * in_channel, height, width)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            return self.blur(out.view(batch, self.out_channel, out.shape[-2], out.shape[-1]))
        weight = weight.view(batch * self.out_channel, in_channel, k, k)
        out = F.conv2d(x, weight, padding=self.padding, groups=batch)
        return out.view(batch, self.out_channel, height, width)


class NoiseInjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:
            return x
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    """A 3x3 modulated convolution (``conv``: ModulatedConv2d's keyword arguments), noise and the biased activation."""

    def __init__(self, in_channel: int, out_channel: int, style_dim: int, **conv: Any) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, 3, style_dim, **conv)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(
        self,
        in_channel: int,
        style_dim: int,
        upsample: bool = True,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        img_channels: int = 3,
    ) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, img_channels, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, img_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """StyleGAN2 generator (config-e/f "skip" architecture), rosinality's module layout."""

    def __init__(self, config: GeneratorConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = config or GeneratorConfig(**kwargs)
        ch = c.channels()
        bk = c.blur_kernel

        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(c.style_dim, c.style_dim, lr_mul=c.lr_mlp, activation="fused_lrelu") for _ in range(c.n_mlp)],
        )
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], c.style_dim, blur_kernel=bk)
        self.to_rgb1 = ToRGB(ch[4], c.style_dim, upsample=False, img_channels=c.img_channels)

        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # kept empty: rosinality has it too
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(c.num_noises):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2**res, 2**res))
        in_channel = ch[4]
        for i in range(3, c.log_size + 1):
            out_channel = ch[2**i]
            self.convs.append(StyledConv(in_channel, out_channel, c.style_dim, upsample=True, blur_kernel=bk))
            self.convs.append(StyledConv(out_channel, out_channel, c.style_dim, blur_kernel=bk))
            self.to_rgbs.append(ToRGB(out_channel, c.style_dim, blur_kernel=bk, img_channels=c.img_channels))
            in_channel = out_channel
        # Not part of the rosinality state dict (its checkpoints keep it as `latent_avg` beside g_ema).
        self.register_buffer("w_avg", torch.zeros(c.style_dim), persistent=False)

    # -- properties (``img_resolution`` is NVIDIA's name for ``resolution``) ----------------------------------
    resolution = img_resolution = _config_property("resolution")
    num_ws = _config_property("num_ws")
    w_dim = z_dim = _config_property("style_dim")
    img_channels = _config_property("img_channels")
    c_dim = 0  # class-label size in NVIDIA's API: these generators are unconditional

    @staticmethod
    def _check_label(c: Any) -> None:
        """NVIDIA's label argument: None or an empty ``[B, 0]`` tensor; anything else is refused with what to call."""
        if c is None or (isinstance(c, torch.Tensor) and c.numel() == 0):
            return
        if isinstance(c, torch.Tensor):
            raise ValueError(
                f"this generator is unconditional (c_dim = 0) but a class label of shape {list(c.shape)} was given: "
                "call G(z, None) or G(z)"
            )
        raise TypeError(
            f"the second argument of G(z, c, ...) is the class label (NVIDIA's order), got {type(c).__name__}: "
            "call G(z, None, truncation_psi=0.7) or G(z, truncation=0.7)"
        )

    def set_fused_modconv(self, fused: bool | None) -> None:
        """Choose the grouped-convolution (True) or activation-scaling (False) modulated convolution, or
        None: grouped for a batch of one, activation scaling for larger batches."""
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.fused = fused

    # -- mapping ----------------------------------------------------------------------------------
    def mapping(
        self,
        z: torch.Tensor,
        truncation: float | torch.Tensor | None = 1.0,
        truncation_cutoff: int | None = None,
        *,
        truncation_psi: float | None = None,
        c: torch.Tensor | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        """z [B, z_dim] -> ws [B, num_ws, w_dim], truncated toward ``w_avg`` on the first
        ``truncation_cutoff`` layers (all layers by default).

        NVIDIA's ``mapping(z, c, truncation_psi=..., truncation_cutoff=...)`` works as well: a second positional
        argument that is None or a tensor is taken as the (empty) class label."""
        if truncation is None or isinstance(truncation, torch.Tensor):  # NVIDIA's order: mapping(z, c, ...)
            c, truncation = truncation, 1.0
        self._check_label(c)
        truncation = _pick_truncation(truncation, truncation_psi)
        del update_emas  # NVIDIA's training flag: w_avg here is fixed (read from the file or computed once)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [B, {self.z_dim}], got {list(z.shape)}")
        ws = self.style(z)[:, None, :].repeat(1, self.num_ws, 1)
        if truncation == 1.0:
            return ws
        center = self.w_avg.to(ws.dtype)
        n = self.num_ws if truncation_cutoff is None else truncation_cutoff
        out = ws.clone()
        out[:, :n] = center + truncation * (ws[:, :n] - center)
        return out

    def style_mix(self, ws: torch.Tensor, ws2: torch.Tensor, crossover: int | torch.Tensor) -> torch.Tensor:
        """Layers >= ``crossover`` take their codes from ``ws2`` (an int, or one per sample)."""
        idx = torch.arange(self.num_ws, device=ws.device)
        cut = torch.as_tensor(crossover, device=ws.device).reshape(-1, 1)
        take2 = (idx[None, :] >= cut)[:, :, None]
        return torch.where(take2, ws2, ws)

    def sample_ws(
        self,
        batch: int,
        mixing_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Codes of ``z ~ N(0, I)`` with style mixing at probability ``mixing_prob`` (a random crossover layer per
        sample); every draw on the CPU (from ``generator``, a CPU one), so CPU and GPU runs draw the same values."""
        z = torch.randn(batch, self.z_dim, generator=generator)
        z2 = torch.randn(batch, self.z_dim, generator=generator)
        u = torch.rand(batch, generator=generator)
        cut = torch.randint(1, self.num_ws, (batch,), generator=generator)
        cut = torch.where(u < mixing_prob, cut, torch.full_like(cut, self.num_ws))
        dev = self.w_avg.device
        ws = self.mapping(z.to(dev))
        if mixing_prob > 0:
            ws = self.style_mix(ws, self.mapping(z2.to(dev)), cut.to(dev))
        return ws

    def style_batches(
        self, n: int, seed: int = 0, batch: int = 1000, truncation: float = 1.0
    ) -> Iterator[torch.Tensor]:
        """``n`` codes w = style(z) (truncated toward ``w_avg`` when ``truncation`` < 1), ``batch`` at a time
        (``[b, w_dim]`` on the generator's device), z drawn from a CPU generator seeded with ``seed``."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        for done in range(0, n, batch):
            w = self.style(torch.randn(min(batch, n - done), self.z_dim, generator=g).to(self.w_avg.device))
            yield w if truncation == 1.0 else self.w_avg + truncation * (w - self.w_avg)

    @torch.no_grad()
    def compute_w_avg(self, n: int = 10_000, seed: int = 0, batch: int = 1000) -> torch.Tensor:
        """Mean of mapping(z) over ``n`` samples (for checkpoints that do not store it); sets ``w_avg``."""
        total = sum(w.double().sum(0) for w in self.style_batches(n, seed, batch))
        self.w_avg.copy_((total / n).to(self.w_avg.dtype))
        return self.w_avg

    # -- synthesis --------------------------------------------------------------------------------
    def noise_buffers(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.config.num_noises)]

    def make_noise(
        self,
        batch: int = 1,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[torch.Tensor]:
        device = self.w_avg.device if device is None else device
        return [
            torch.randn(batch, 1, n.shape[-2], n.shape[-1], device=device, generator=generator)
            for n in self.noise_buffers()
        ]

    def synthesis(
        self,
        ws: torch.Tensor,
        noise_mode: NoiseMode = "const",
        noise: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """ws [B, num_ws, w_dim] (or [B, w_dim], broadcast) -> images [B, C, H, W].

        noise_mode: "const" uses the stored noise buffers (deterministic), "random" draws new noise,
        "none" injects none. An explicit ``noise`` list overrides the mode.

        The batched tuning (``inversion/tune_batch.py``) runs this method over stacked per-image weights through
        ``torch.func.functional_call`` and ``vmap``: keep it free of in-place writes to parameters and of branches
        on tensor values.
        """
        if ws.ndim == 2:
            ws = ws[:, None, :].expand(-1, self.num_ws, -1)
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must have shape [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        batch = ws.shape[0]
        if noise is None:
            if noise_mode == "const":
                noise = self.noise_buffers()
            elif noise_mode == "random":
                noise = self.make_noise(batch, device=ws.device)
            elif noise_mode == "none":
                noise = [None] * self.config.num_noises
            else:
                raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        out = self.input(batch)
        out = self.conv1(out, ws[:, 0], noise[0])
        skip = self.to_rgb1(out, ws[:, 1])
        i = 1
        for conv_up, conv, n1, n2, to_rgb in zip(
            self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs
        ):
            out = conv_up(out, ws[:, i], n1)
            out = conv(out, ws[:, i + 1], n2)
            skip = to_rgb(out, ws[:, i + 2], skip)
            i += 2
        return skip

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float | None = None,
        truncation_cutoff: int | None = None,
        noise_mode: NoiseMode = "const",
        *,
        truncation: float | None = None,
        force_fp32: bool = True,
        update_emas: bool = False,
    ) -> torch.Tensor:
        """z [B, z_dim] -> images [B, C, H, W]: ``G(z)``, ``G(z, truncation=0.7)`` or NVIDIA's
        ``G(z, c, truncation_psi=0.7, noise_mode="const")`` (``c``: None or an empty tensor; ``force_fp32`` and
        ``update_emas`` are accepted and have nothing to do: the networks run in float32)."""
        del force_fp32, update_emas
        self._check_label(c)
        if truncation is not None and truncation_psi is not None and truncation != truncation_psi:
            raise ValueError("give truncation or truncation_psi (the same thing, NVIDIA's name), not both")
        psi = _pick_truncation(1.0 if truncation is None else truncation, truncation_psi)
        ws = self.mapping(z, psi, truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode)


def _pick_truncation(truncation: float, truncation_psi: float | None) -> float:
    psi = truncation if truncation_psi is None else truncation_psi
    if isinstance(psi, bool) or not isinstance(psi, (int, float)):
        raise TypeError(f"truncation must be a number, got {type(psi).__name__}")
    return float(psi)
