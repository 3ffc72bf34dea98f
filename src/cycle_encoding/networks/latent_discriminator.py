"""The latent discriminator of e4e / Cycle Encoding: an MLP that tells mapping-network codes from encoder codes.
Design notes: docs/INTERNALS.md, "cycle_encoding.networks.latent_discriminator"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigRecord
from ..errors import CycleEncodingError


@dataclass(frozen=True)
class LatentDiscriminatorConfig(ConfigRecord):
    """Input width ``w_dim``, hidden width (None: ``w_dim``), number of linear layers, LeakyReLU slope."""

    w_dim: int = 512
    hidden_dim: int | None = None
    num_layers: int = 4
    negative_slope: float = 0.2

    def __post_init__(self) -> None:
        if self.w_dim < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
            raise CycleEncodingError(f"latent discriminator: widths must be positive, got {self}")
        if self.num_layers < 1:
            raise CycleEncodingError(f"latent discriminator: needs at least one layer, got {self.num_layers}")

    @property
    def width(self) -> int:
        return self.w_dim if self.hidden_dim is None else self.hidden_dim


class LatentDiscriminator(nn.Module):
    """``D(w)``: one logit per code. Input ``[..., w_dim]`` -> ``[..., 1]`` (any leading dimensions)."""

    def __init__(self, config: LatentDiscriminatorConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = config if config is not None else LatentDiscriminatorConfig(**kwargs)
        layers: list[nn.Module] = []
        dim = c.w_dim
        for _ in range(c.num_layers - 1):
            layers += [nn.Linear(dim, c.width), nn.LeakyReLU(c.negative_slope)]
            dim = c.width
        layers.append(nn.Linear(dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.shape[-1] != self.config.w_dim:
            raise ValueError(f"latent discriminator expects codes [..., {self.config.w_dim}], got {list(w.shape)}")
        return self.mlp(w)
