"""The offset (delta) regularization of e4e / Cycle Encoding.

With codes ``w_i = w_0 + D_i`` (i = 1 .. N-1), the loss at stage ``s`` is

    L_delta = sum_{i=1..s} mean_b || w_{b,i} - w_{b,0} ||_2

the L2 norm (not squared) of each active offset, averaged over the batch and summed over the active offsets. Offsets
beyond the stage are not counted (at stage 0 the loss is 0). Adding ``w_avg`` to every code does not change it.

Difference from e4e's training code (which Cycle Encoding's builds on): there the sum runs over
``i = 1 .. stage - 1``, so the offset activated last is not regularized while it is the newest (and at stage 1 none
is). METHOD.md specifies the sum over all active offsets, which is what this computes.
"""

from __future__ import annotations

import torch

from .adversarial import active_codes


def delta_loss(ws: torch.Tensor, stage: int, p: float = 2.0) -> torch.Tensor:
    """``ws``: codes ``[B, N, w_dim]`` (absolute or relative to w_avg); ``stage``: number of active offsets.

    Returns the scalar ``sum_{i=1..stage} mean_b ||ws[b, i] - ws[b, 0]||_p`` (p = 2 by default, as the paper).
    The gradient at a zero offset is 0 (PyTorch's subgradient of the norm)."""
    codes = active_codes(ws, stage)  # checked: [B, stage + 1, w_dim]
    offsets = codes[:, 1:] - codes[:, :1]  # [B, stage, w_dim]; none at stage 0, whose loss is then 0
    return torch.linalg.vector_norm(offsets, ord=p, dim=2).mean(0).sum()
