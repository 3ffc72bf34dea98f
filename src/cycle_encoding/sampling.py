"""Rendering a generator's samples by seed (NVIDIA's seed convention, so seeds match their tools)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .networks.stylegan2 import Generator, NoiseMode

MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds 0 .. 2**32 - 1
# Truncation psi puts a sample at psi times its distance from the average code (the usual values lie in 0.5 .. 1);
# at 10 the codes lie 10x farther out than any the generator was trained on and its images are mostly saturated;
# 1e30 only overflows float32 into a white or black image.
MAX_TRUNCATION = 10.0
TRUNCATION_WHY = " (psi scales a sample's distance from the average code; the usual values lie in 0.5 .. 1)"


def z_from_seed(seed: int, z_dim: int) -> torch.Tensor:
    """z for a seed exactly as NVIDIA's generate.py draws it: RandomState(seed).randn(1, z_dim)."""
    return torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim)).float()


@torch.no_grad()
def render_seeds(
    G: Generator,
    seeds: Sequence[int],
    truncation: float = 1.0,
    noise_mode: NoiseMode = "const",
    batch_size: int = 8,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (seeds, images [b, C, H, W] on the CPU) batch by batch."""
    device = G.w_avg.device
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i : i + batch_size])
        z = torch.cat([z_from_seed(s, G.z_dim) for s in chunk]).to(device)
        ws = G.mapping(z, truncation=truncation)
        if noise_mode == "random":  # each seed's noise drawn from a CPU generator of that seed
            per_seed = [G.make_noise(1, torch.Generator(device="cpu").manual_seed(s), "cpu") for s in chunk]
            images = G.synthesis(ws, noise=[torch.cat(layer).to(device) for layer in zip(*per_seed)])
        else:
            images = G.synthesis(ws, noise_mode=noise_mode)
        yield chunk, images.cpu()
