"""Editability measures: Latent Editing Consistency (LEC), edit success, preservation.
Design notes: docs/INTERNALS.md, "cycle_encoding.editing.measures"."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import CycleEncodingError
from ..losses.identity import IdentitySimilarity, build_identity
from ..losses.perceptual import build_perceptual
from ..metrics import mse, summarize
from .directions import DirectionSet

Codes = torch.Tensor
Encode = Callable[[torch.Tensor], torch.Tensor]
Render = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def latent_editing_consistency(
    pivots: Codes,
    edit: Callable[[Codes], Codes],
    encode: Encode,
    render: Render,
    inverse: Callable[[Codes], Codes] | None = None,
) -> torch.Tensor:
    """``[B]``: ``|| w - inverse(encode(render(edit(w)))) ||_F`` per code (``inverse`` None: the edit is not undone)."""
    if pivots.ndim != 3:
        raise CycleEncodingError(f"pivots must be [B, N, w_dim], got {list(pivots.shape)}")
    back = encode(render(edit(pivots))).to(pivots)
    if inverse is not None:
        back = inverse(back)
    return (pivots - back).flatten(1).norm(dim=1)


@torch.no_grad()
def direction_lec(
    directions: DirectionSet,
    component: int | str,
    strength: float,
    pivots: Codes,
    encode: Encode,
    render: Render,
    layers: Sequence[int] | None = None,
    undo: bool = True,
) -> torch.Tensor:
    """LEC of one added edit (component, strength, layers); ``undo=False`` leaves the edit in (for comparison)."""
    edit = partial(directions.apply, component=component, strength=strength, layers=layers)
    inverse = partial(directions.apply, component=component, strength=-strength, layers=layers)
    return latent_editing_consistency(pivots, edit, encode, render, inverse if undo else None)


@torch.no_grad()
def attribute_changes(
    scorer: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor, edited: torch.Tensor
) -> torch.Tensor:
    """``[B, S]``: score(edited[:, s]) - score(reference) for reference images ``[B, C, H, W]`` and edits
    ``[B, S, C, H, W]``."""
    if edited.ndim != 5 or reference.ndim != 4 or edited.shape[0] != reference.shape[0]:
        raise CycleEncodingError(
            f"reference [B, C, H, W] and edits [B, S, C, H, W] expected, got {list(reference.shape)} and "
            f"{list(edited.shape)}"
        )
    b, s = edited.shape[:2]
    # one call for both, so that an edit equal to its reference scores exactly the same (batching changes rounding)
    scores = torch.as_tensor(scorer(torch.cat([reference, edited.flatten(0, 1).to(reference)]))).reshape(-1).float()
    base, after = scores[:b], scores[b:].reshape(b, s)
    return after - base[:, None]


def success_summary(changes: torch.Tensor, strengths: Sequence[float]) -> dict[str, Any]:
    """Per strength: the score change's mean +- std over images and the fraction of images whose score moved in the
    strength's direction (strength 0: none asked, left out)."""
    if changes.ndim != 2 or changes.shape[1] != len(strengths):
        raise CycleEncodingError(f"changes must be [B, {len(strengths)}], got {list(changes.shape)}")
    rows = _per_strength(changes, strengths, "score_change")
    for row, c in zip(rows, changes.t()):
        if row["strength"] != 0:
            row["moved_as_asked"] = float((torch.sign(c) == (1.0 if row["strength"] > 0 else -1.0)).double().mean())
    return {"per_strength": rows}


def _per_strength(values: torch.Tensor, strengths: Sequence[float], key: str) -> list[dict[str, Any]]:
    """Per strength (column of ``values [B, S]``): ``{"strength": a, key: mean +- std over the images}``."""
    return [{"strength": float(a), key: summarize(values[:, j].tolist())} for j, a in enumerate(strengths)]


@dataclass
class Preservation:
    """A measure of what an edit kept: ``fn(edited, reference) -> [B]``; ``kind`` 'distance' (lower = kept more)
    or 'similarity' (higher = kept more)."""

    name: str
    kind: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @torch.no_grad()
    def __call__(self, edited: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.fn(edited, reference.to(edited))).reshape(-1).float().cpu()


def preservation_from_module(module: torch.nn.Module, kind: str | None = None) -> Preservation:
    """A Preservation from a perceptual distance (kind 'distance') or an identity similarity (kind 'similarity'); the
    kind is read from the class when not given."""
    if kind is None:
        kind = "similarity" if isinstance(module, IdentitySimilarity) else "distance"
    return Preservation(getattr(module, "name", type(module).__name__), kind, module)


def build_preservation(
    name: str, device: str | torch.device = "cpu", weights: str | Path | None = None
) -> Preservation:
    """By name: ``mse``; a perceptual distance (``lpips-alex``, ``lpips-vgg``, ``dlib-face``, ... with ``weights`` the
    backbone file LPIPS needs); or ``identity:NAME`` (``identity:arcface`` with ``weights`` = model_ir_se50.pth,
    ``identity:dlib-face``, ...)."""
    if name == "mse":
        return Preservation("mse", "distance", mse)
    if name.startswith("identity:"):
        net = build_identity(name.split(":", 1)[1], device, weights)
        return preservation_from_module(net, "similarity")
    return preservation_from_module(build_perceptual(name, device, weights), "distance")


def preservation_summary(values: torch.Tensor, strengths: Sequence[float], measure: Preservation) -> dict[str, Any]:
    """Per strength: mean +- std over images of ``values [B, S]``."""
    return {"measure": measure.name, "kind": measure.kind, "per_strength": _per_strength(values, strengths, "value")}


def lec_summary(values: torch.Tensor, strengths: Sequence[float]) -> dict[str, Any]:
    """Per strength: mean +- std over images of LEC values ``[B, S]``."""
    return {"per_strength": _per_strength(values, strengths, "lec")}
