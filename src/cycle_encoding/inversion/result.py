"""What the inversion of one image gives (``InversionResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..networks.stylegan2 import Generator


@dataclass
class InversionResult:
    """One image's inversion. Tensors are on the CPU; ``generator`` is the tuned G (None without ``tune``)."""

    name: str
    target: torch.Tensor  # [1, C, R, R]
    pivots: dict[str, torch.Tensor] = field(default_factory=dict)  # stage -> [1, N, w_dim]
    recons: dict[str, torch.Tensor] = field(default_factory=dict)  # stage -> [1, C, R, R]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    losses: list[dict[str, Any]] = field(default_factory=list)
    generator: Generator | None = None
    tune: dict[str, Any] | None = None
    refine: dict[str, Any] | None = None

    @property
    def pivot(self) -> torch.Tensor:
        """The pivot of the last pivot stage."""
        return self.pivots[[s for s in self.pivots][-1]]
