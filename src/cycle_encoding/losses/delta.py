"""The offset (delta) regularization of e4e / Cycle Encoding.
Design notes: docs/INTERNALS.md, "cycle_encoding.losses.delta"."""

from __future__ import annotations

import torch

from .adversarial import active_codes


def delta_loss(ws: torch.Tensor, stage: int, p: float = 2.0) -> torch.Tensor:
    """``ws``: codes ``[B, N, w_dim]`` (absolute or relative to w_avg); ``stage``: number of active offsets.

    Returns the scalar ``sum_{i=1..stage} mean_b ||ws[b, i] - ws[b, 0]||_p`` (p = 2 by default, as the paper).
    The gradient at a zero offset is 0 (PyTorch's subgradient of the norm)."""
    codes = active_codes(ws, stage)  # checked: [B, stage + 1, w_dim]
    # all active offsets 1..stage, as METHOD.md says (e4e's code sums 1..stage-1: keep this, docs/INTERNALS.md)
    offsets = codes[:, 1:] - codes[:, :1]  # [B, stage, w_dim]; none at stage 0, whose loss is then 0
    return torch.linalg.vector_norm(offsets, ord=p, dim=2).mean(0).sum()
