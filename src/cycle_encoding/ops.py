"""Resampling and activation ops of StyleGAN2 in plain PyTorch.

Every op here is made of ordinary differentiable PyTorch functions, so it runs on any device and
supports double backward (the R1 penalty differentiates through the discriminator's gradient).
No custom kernels are compiled; the module names and buffers follow rosinality's layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CycleEncodingError

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)

PRECISIONS = ("fp32", "bf16")
"""Compute precisions of the optimization loops: ``fp32`` everything in float32 (the authors' path, exact);
``bf16`` the networks' forward and backward under bfloat16 autocast, with float32 weights, loss and optimizer."""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            out.update(value.split())
    return out


def bf16_units(device: torch.device | str, cpuinfo: str | None = None) -> str | None:
    """What computes bfloat16 natively on ``device`` (for a message), or None where bf16 would be emulated and
    slower than fp32: a CUDA GPU that supports bf16; a CPU with AMX-BF16, AVX512-BF16 or Arm's BF16 extension."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return f"CUDA GPU with bf16 ({torch.cuda.get_device_name(dev)})"
        return None
    if dev.type == "cpu":
        flags = cpu_flags(cpuinfo)
        for flag in ("amx_bf16", "avx512_bf16", "bf16"):
            if flag in flags:
                return f"CPU with {flag}"
    return None


def resolve_precision(precision: str, device: torch.device | str, cpuinfo: str | None = None) -> tuple[str, str]:
    """``(fp32 | bf16, why)``: ``auto`` (the command line's default) becomes bf16 where :func:`bf16_units` finds
    native bf16 (the fast path; equal quality measured in ``docs/RESULTS.md``), else fp32; the others are kept."""
    if precision == "auto":
        units = bf16_units(device, cpuinfo)
        if units:
            return "bf16", f"auto: {units}"
        return "fp32", f"auto: no native bf16 on {torch.device(device).type}"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return precision, "as given"


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """The block's network ops in ``precision``: ``fp32`` changes nothing (no autocast context at all, so the
    computation is exactly the one without this call); ``bf16`` runs them under ``torch.autocast`` in bfloat16
    (convolutions and matmuls in bf16, reductions and losses kept in float32 by autocast's rules) on the CPU or
    CUDA. Parameters stay float32; their gradients are float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        yield
        return
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"bf16 autocast runs on cpu or cuda, not {kind}")
    with torch.autocast(device_type=kind, dtype=torch.bfloat16):
        yield


M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4


def compile_pass(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """``fn`` (a network's forward pass) compiled by ``torch.compile`` for fixed shapes (the training steps, the
    refinement; the first calls take a minute or two: graph capture and code generation). On a CPU the generated
    code is C++: a missing compiler is a one-line error here rather than a long trace at the first step."""
    if device.type == "cpu" and not has_compiler():
        raise CycleEncodingError("--compile on a CPU needs a C++ compiler (g++); install it or leave --compile off")
    return torch.compile(fn, dynamic=False)


def has_compiler() -> bool:
    """Whether ``torch.compile`` can generate CPU code here (the C++ compiler torch's inductor uses, on the PATH)."""
    from torch._inductor import config as inductor_config  # lazy: heavy, only for torch.compile

    cxx = inductor_config.cpp.cxx
    names = [c for c in (cxx if isinstance(cxx, (tuple, list)) else (cxx,)) if c] or ["g++"]
    return any(shutil.which(str(c)) for c in names)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``,
    set from inside): large activations are reused, not page-faulted in afresh on every pass; the peak is unchanged.
    False (nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    return ok


M = TypeVar("M", bound=nn.Module)


class FixedMeasure(nn.Module):
    """A network that stays in eval mode whatever the caller asks: a loss or metric network is a fixed measure."""

    def train(self: M, mode: bool = True) -> M:
        return nn.Module.train(self, False)


def convert_channels(x: torch.Tensor, channels: int | None, who: str = "images") -> torch.Tensor:
    """Images ``[..., C, H, W]`` with ``channels`` channels (None: as they are): grey -> RGB repeats the channel (a
    view), RGB -> grey is ITU-R 601-2 luma (PIL's 'L'); any other change is one clear error naming ``who``."""
    c = x.shape[-3]
    if channels is None or channels == c:
        return x
    if channels == 3 and c == 1:
        return x.expand(*x.shape[:-3], 3, -1, -1)
    if channels == 1 and c == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * luma).sum(-3, keepdim=True)
    raise CycleEncodingError(f"{who}: cannot convert {c} channels to {channels}")


def as_rgb(x: torch.Tensor, who: str = "images") -> torch.Tensor:
    """Images ``[B, 1 or 3, H, W]`` as three channels (a grey image repeated, as a view); else one clear error."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise CycleEncodingError(f"{who}: expected images [B, C, H, W] with 1 or 3 channels, got {list(x.shape)}")
    return convert_channels(x, 3, who)


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Images ``[B, C, H, W]`` resized to ``size`` (a side, or (height, width)), antialiased bilinear; unchanged at
    that size."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True)


def pool_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images average-pooled to ``size`` x ``size`` (e4e's face_pool of G's output); unchanged at that size."""
    if images.shape[-1] == size:
        return images
    return F.adaptive_avg_pool2d(images, (size, size))


def make_kernel(k: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A normalized 2-D FIR kernel; a 1-D kernel is made separable (outer product)."""
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with ``kernel`` [kh, kw] (true convolution), downsample ``x`` [B, C,
    H, W]; ``pad`` is (before, after) on both axes (negative values crop): StyleGAN2's reference ``upfirdn2d``."""
    pad0, pad1 = pad
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x
    if up > 1:
        out = out.reshape(b, c, h, 1, w, 1)
        out = F.pad(out, (0, up - 1, 0, 0, 0, up - 1))
        out = out.reshape(b, c, h * up, w * up)
    out = F.pad(out, (max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)))
    if pad0 < 0 or pad1 < 0:
        hh, ww = out.shape[-2:]
        out = out[:, :, max(-pad0, 0) : hh - max(-pad1, 0), max(-pad0, 0) : ww - max(-pad1, 0)]
    # one depthwise convolution over all channels (a [B*C, 1, H, W] single-channel convolution computes the
    # same, but its backward pass was ~7x slower on CPUs); a stride of `down` keeps only the outputs used
    weight = torch.flip(kernel, [0, 1]).to(out).view(1, 1, kh, kw).repeat(c, 1, 1, 1)
    return F.conv2d(out, weight, stride=down, groups=c)


class Upsample(nn.Module):
    """x2 (or ``factor``) upsampling with the blur kernel, as used on the RGB skip path."""

    def __init__(self, kernel: Sequence[float], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel) * (factor**2)
        self.register_buffer("kernel", k)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Bias add, leaky ReLU (slope 0.2) and gain sqrt(2): StyleGAN2's biased activation, differentiable twice."""
    x = x + bias.view([1, -1] + [1] * (x.ndim - 2)).to(x.dtype)
    return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


class FusedLeakyReLU(nn.Module):
    """Learned per-channel bias followed by the scaled leaky ReLU (parameter name ``bias``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)
