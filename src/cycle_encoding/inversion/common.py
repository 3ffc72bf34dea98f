"""Pieces the inversion stages share: the loss networks by name, per-sample reconstruction terms, seeds, rendering.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.common"."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..data.datasets import resize_square
from ..errors import CycleEncodingError
from ..losses.networks import LossNetworks
from ..networks.stylegan2 import Generator
from ..ops import compile_pass, convert_channels

STAGE_NUMBERS = {"encoder": 1, "refine": 2, "project": 3, "tune": 4}


def reconstruction_terms(y: torch.Tensor, x: torch.Tensor, nets: LossNetworks) -> dict[str, torch.Tensor]:
    """Per-sample terms between reconstructions ``y`` and targets ``x``: ``l2`` (MSE), ``perceptual`` (distance),
    ``identity`` (1 - cosine), each ``[B]``; a term whose network is None is absent."""
    out = {"l2": (y - x.to(y.dtype)).square().flatten(1).mean(dim=1)}
    if nets.perceptual is not None:
        out["perceptual"] = nets.perceptual(y, x).reshape(-1)
    if nets.identity is not None:
        out["identity"] = 1 - nets.identity(y, x).reshape(-1)
    return out


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum_k weights[k] * terms[k]`` over the terms present (same shape as each term)."""
    zero = torch.zeros_like(next(iter(terms.values())))
    return sum((w * v for k, v in terms.items() if (w := weights.get(k, 0.0))), zero)


def stage_seed(seed: int, index: int, stage: str) -> int:
    """The seed of one stage of one image: a fixed mix of the run seed, the image's index and the stage."""
    return ((int(seed) * 1_000_003 + int(index)) * 16 + STAGE_NUMBERS[stage]) & 0x7FFF_FFFF_FFFF_FFFF


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Gradients off for ``module``'s parameters inside the block (restored after): a network used, not trained."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


@torch.no_grad()
def render(G: Generator, ws: torch.Tensor) -> torch.Tensor:
    """G's image of codes ``ws`` with its constant noise (what every stage's reconstruction is)."""
    return G.synthesis(ws.to(G.w_avg.device), noise_mode="const")


def _synthesis(G: Generator, ws: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return G.synthesis(ws, **kwargs)


_COMPILED_SYNTHESIS: dict[str, Callable[..., torch.Tensor]] = {}


def synthesis_pass(compiled: bool, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """``f(G, ws, **kwargs) = G.synthesis(ws, **kwargs)``, plain or through ``torch.compile``, compiled once per
    process and device type: the generator is an argument, its weights inputs of the graph, so every image's new
    tuned copy reuses the graphs compiled for the first (one per batch shape, grad mode and noise layout)."""
    if not compiled:
        return _synthesis
    kind = torch.device(device).type
    if kind not in _COMPILED_SYNTHESIS:
        _COMPILED_SYNTHESIS[kind] = compile_pass(_synthesis, torch.device(device))
    return _COMPILED_SYNTHESIS[kind]


def check_target(G: Generator, x: torch.Tensor) -> torch.Tensor:
    """A target image as ``[1, C, R, R]`` on G's device; R = G's resolution (resized, centre-cropped if not square)."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise CycleEncodingError(f"one target image at a time, got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3:
        raise CycleEncodingError(f"a target image is [C, H, W] in [-1, 1], got shape {list(x.shape)}")
    x = convert_channels(x, G.img_channels, f"the target (the generator makes {G.img_channels}-channel images)")
    x = resize_square(x.float().cpu(), G.resolution)
    return x[None].to(G.w_avg.device)
