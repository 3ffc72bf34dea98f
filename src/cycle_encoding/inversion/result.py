"""What the inversion of one image gives (``InversionResult``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..editing.directions import check_strength
from ..errors import CycleEncodingError
from ..networks.stylegan2 import Generator
from ..utils import to_pil
from .common import render


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
    base_generator: Generator | None = field(default=None, repr=False)  # the generator inverted into

    @property
    def pivot(self) -> torch.Tensor:
        """The pivot of the last pivot stage."""
        return self.pivots[[s for s in self.pivots][-1]]

    def to_pil(self, stage: str | None = None) -> Image.Image:
        """A stage's reconstruction as a PIL image (default: the last stage's); ``"target"``: the image inverted."""
        if stage == "target":
            return to_pil(self.target[0])
        if stage is None:
            stage = list(self.recons)[-1]
        if stage not in self.recons:
            raise CycleEncodingError(f"no stage {stage!r} in this result (stages: {', '.join(self.recons)}, target)")
        return to_pil(self.recons[stage][0])

    def edit(
        self,
        direction: Any,
        strength: float,
        component: int | str = 0,
        layers: Sequence[int] | None = None,
        mode: str = "add",
    ) -> Image.Image:
        """The pivot moved along ``direction`` by ``strength``, rendered by this image's generator (the tuned one
        after ``tune``) with its constant noise, as a PIL image. ``direction``: a DirectionSet (``load_directions``,
        ``sefa_directions``, ...; ``component``, ``layers`` and ``mode`` pick from it) or a tensor ``[w_dim]`` /
        ``[num_ws, w_dim]`` added as ``strength * direction``. Strength 0 gives ``to_pil()`` of the last stage."""
        G = self.generator if self.generator is not None else self.base_generator
        if G is None:
            raise CycleEncodingError("this result holds no generator to render with (made outside Inverter.invert)")
        ws = self.pivot.to(G.w_avg.device)
        if isinstance(direction, torch.Tensor):
            d = direction.to(ws)
            if d.shape[-1] != ws.shape[-1] or d.ndim > 2:
                raise CycleEncodingError(f"a direction is [w_dim] or [num_ws, w_dim], got {list(d.shape)}")
            edited = ws + check_strength(strength) * d
        elif hasattr(direction, "apply"):
            edited = direction.apply(ws, component, strength, layers, mode)
        else:
            raise CycleEncodingError(f"a direction is a DirectionSet or a tensor, got {type(direction).__name__}")
        return to_pil(render(G, edited)[0].cpu())
