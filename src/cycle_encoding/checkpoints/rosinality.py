"""rosinality/stylegan2-pytorch generator layout (docs/FORMATS.md): the architecture read off the tensors' shapes,
never asked for, and export."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..networks.stylegan2 import Generator, GeneratorConfig
from .common import atomic_torch_save

_STYLE_KEY = re.compile(r"^style\.(\d+)\.weight$")
_TORGB_KEY = re.compile(r"^to_rgbs\.(\d+)\.conv\.weight$")


def _need(sd: Mapping[str, torch.Tensor], key: str, ndim: int, source: str | Path) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(source, f"missing key {key}: not a rosinality StyleGAN2 generator state dict")
    t = sd[key]
    if t.ndim != ndim:
        raise CheckpointError(source, f"key {key} has shape {list(t.shape)}, expected a {ndim}-d tensor")
    return t


def _infer_channel_rule(chans: dict[int, int]) -> tuple[int, int]:
    """(channel_base, channel_max) such that min(base // r, max) reproduces ``chans`` where possible."""
    cmax = max(chans.values())
    rmax = max(chans)
    below = [r for r, c in chans.items() if c < cmax]
    if below:
        r = max(below)
        return chans[r] * r, cmax
    # every resolution at the cap: rosinality's default base if it fits, else the smallest that does
    return (32768 if 32768 // rmax >= cmax else cmax * rmax), cmax


def infer_generator_config(sd: Mapping[str, torch.Tensor], source: str | Path) -> GeneratorConfig:
    """Read the architecture of a rosinality ``g_ema`` state dict from its tensors."""
    styles = sorted(int(m.group(1)) for k in sd if (m := _STYLE_KEY.match(k)))
    if not styles:
        raise CheckpointError(source, "no mapping layers (style.1.weight ...): not a rosinality generator state dict")
    if styles != list(range(1, len(styles) + 1)):
        raise CheckpointError(source, f"mapping layers are not numbered 1..n (found style.{styles})")
    style_dim = _need(sd, "style.1.weight", 2, source).shape[1]
    ch4 = _need(sd, "conv1.conv.weight", 5, source).shape[1]
    img_channels = _need(sd, "to_rgb1.conv.weight", 5, source).shape[1]
    n_rgb = len({int(m.group(1)) for k in sd if (m := _TORGB_KEY.match(k))})
    log_size = n_rgb + 2
    if not 3 <= log_size <= 10:
        raise CheckpointError(source, f"{n_rgb} to_rgbs layers give resolution 2^{log_size}, outside 8..1024")
    chans = {4: int(ch4)}
    for k in range(n_rgb):
        chans[2 ** (k + 3)] = int(_need(sd, f"convs.{2 * k}.conv.weight", 5, source).shape[1])
    base, cmax = _infer_channel_rule(chans)
    blur = (1.0, 3.0, 3.0, 1.0)
    kb = sd.get("to_rgbs.0.upsample.kernel")
    if kb is not None and kb.ndim == 2 and kb.shape[0] == kb.shape[1]:
        k1 = (kb.double() / kb.double().sum()).sum(0)  # separable: row sums give the 1-D kernel
        k1 = k1 / k1[0] if float(k1[0]) != 0 else k1
        blur = tuple(round(float(v), 6) for v in k1)
    try:
        return GeneratorConfig(
            resolution=2**log_size,
            style_dim=int(style_dim),
            n_mlp=len(styles),
            channel_base=int(base),
            channel_max=int(cmax),
            img_channels=int(img_channels),
            blur_kernel=blur,
        )
    except ValueError as e:
        raise CheckpointError(source, f"shapes fit no StyleGAN2 architecture: {e}") from None


def rosinality_state_dict(G: Generator) -> dict[str, torch.Tensor]:
    """The ``g_ema`` state dict of rosinality's layout (exactly this module's state dict)."""
    return {k: v.detach().cpu().clone() for k, v in G.state_dict().items()}


def rosinality_table(size: int, channel_multiplier: int) -> dict[int, int]:
    """The widths rosinality's ``Generator(size, ..., channel_multiplier)`` builds: 512 up to 32 px, then
    ``256 * cm`` at 64 px halving with each resolution (its ``self.channels``; no cap)."""
    return {r: 512 if r <= 32 else 16384 * channel_multiplier // r for r in (2**i for i in range(2, size.bit_length()))}


def rosinality_fit(config: GeneratorConfig) -> dict[str, Any]:
    """Whether rosinality's class (and so e4e's and PTI's copies of it) builds this architecture, its call, and else
    what differs, the widths and image channels to patch into it, and which code loads the file as it is."""
    chans, size = config.channels(), config.resolution
    cm = max(1, round(chans.get(64, 512) / 256)) if size >= 64 else 2  # below 64 px the multiplier changes nothing
    table = rosinality_table(size, cm)
    call = f"Generator({size}, {config.style_dim}, {config.n_mlp}, channel_multiplier={cm}"
    if tuple(config.blur_kernel) != (1.0, 3.0, 3.0, 1.0):
        call += f", blur_kernel={[int(v) if float(v).is_integer() else v for v in config.blur_kernel]}"
    call += f", lr_mlp={config.lr_mlp:g})" if config.lr_mlp != 0.01 else ")"
    wrong, patch = [], []
    if chans != table:
        wrong.append(f"widths {chans} where it builds {table}")
        patch.append(f"set Generator.channels to {chans}")
    if config.img_channels != 3:
        c = config.img_channels
        wrong.append(f"{c}-channel images where its ToRGB makes 3")
        patch.append(f"make ToRGB's ModulatedConv2d output {c} channel(s) and its bias [1, {c}, 1, 1]")
    if not wrong:
        return {"loads": True, "call": call}
    return {
        "loads": False,
        "call": call,
        "channels": chans,
        "img_channels": config.img_channels,
        "reason": f"rosinality's {call} cannot build this generator: it has {' and '.join(wrong)}",
        "loaders": "cycle-encoding (load_generator, generate, info) reads it as it is",
        "patch": "for rosinality's code (and e4e's and PTI's copies of its class): " + "; ".join(patch),
    }


def rosinality_note(config: GeneratorConfig) -> str | None:
    """None when rosinality's own class loads the export, else one line saying why not and what loads it."""
    fit = rosinality_fit(config)
    return None if fit["loads"] else f"{fit['reason']}. {fit['loaders']}; {fit['patch']}"


def export_rosinality(G: Generator, path: str | Path) -> Path:
    """Write ``{'g_ema': state_dict, 'latent_avg': w_avg}`` as rosinality's converter does, plus
    ``'cycle_encoding'``: the architecture and :func:`rosinality_fit` (rosinality's loaders read only ``g_ema``)."""
    meta = {"architecture": G.config.to_dict(), "rosinality": rosinality_fit(G.config)}
    obj = {"g_ema": rosinality_state_dict(G), "latent_avg": G.w_avg.detach().cpu().clone(), "cycle_encoding": meta}
    return atomic_torch_save(obj, path)
