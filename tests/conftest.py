"""Shared fixtures. Tests are small and CPU-only; networks are tiny unless a test says otherwise."""

from __future__ import annotations

import pytest
import torch

from cycle_encoding.networks.stylegan2 import Generator, GeneratorConfig

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_generator_config(resolution: int = 16, img_channels: int = 3, **kw) -> GeneratorConfig:
    """A small StyleGAN2 for tests: 32-d styles, 2 mapping layers, at most 32 channels."""
    args = dict(
        resolution=resolution,
        style_dim=32,
        n_mlp=2,
        channel_base=32 * 16,
        channel_max=32,
        img_channels=img_channels,
    )
    args.update(kw)
    return GeneratorConfig(**args)


def make_tiny_generator(seed: int = 0, **kw) -> Generator:
    torch.manual_seed(seed)
    G = Generator(tiny_generator_config(**kw))
    # random non-zero noise strengths and biases so every parameter matters in comparisons
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise.weight") or name.endswith("activate.bias") or name.endswith("to_rgb1.bias"):
                p.normal_(0, 0.1)
    G.compute_w_avg(2000)
    return G.eval()


@pytest.fixture
def tiny_generator() -> Generator:
    return make_tiny_generator()
