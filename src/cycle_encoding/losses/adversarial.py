"""The latent adversarial losses of e4e / Cycle Encoding and the lazy R1 penalty.
Design notes: docs/INTERNALS.md, "cycle_encoding.losses.adversarial"."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CycleEncodingError

if TYPE_CHECKING:
    from .latent_pool import LatentPool


def active_codes(ws: torch.Tensor, stage: int) -> torch.Tensor:
    """The codes the stage uses: ``ws[:, :stage + 1]`` (``w_0`` and the codes of the active offsets)."""
    if ws.ndim != 3:
        raise CycleEncodingError(f"codes must be [B, N, w_dim], got {list(ws.shape)}")
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= ws.shape[1] - 1:
        raise CycleEncodingError(f"stage must be an integer in [0, {ws.shape[1] - 1}], got {stage!r}")
    return ws[:, : stage + 1]


def encoder_adversarial_loss(
    D: nn.Module | Callable[[torch.Tensor], torch.Tensor], ws: torch.Tensor, stage: int
) -> torch.Tensor:
    """Non-saturating encoder loss: mean of ``softplus(-D(w_i))`` over the batch and the active codes i = 0..stage
    of the absolute codes ``ws`` ``[B, N, w_dim]``. Gradients flow into ``ws`` (and into D's parameters if they
    require grad: freeze D during the encoder step)."""
    return F.softplus(-D(active_codes(ws, stage))).mean()


@torch.no_grad()
def sample_real_codes(G: nn.Module, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` real codes ``mapping(z)``, ``z ~ N(0, I)``, no truncation: ``[n, w_dim]`` on G's device; ``generator`` (a
    CPU torch.Generator) makes the draw reproducible whatever the device."""
    z = torch.randn(n, G.z_dim, generator=generator).to(G.w_avg.device)
    return G.mapping(z)[:, 0]


@torch.no_grad()
def fake_codes_for_discriminator(ws: torch.Tensor, stage: int, pool: LatentPool | None = None) -> torch.Tensor:
    """Fake codes for D from the encoder's absolute codes ``[B, N, w_dim]``: through ``pool`` one random active code
    per sample (maybe swapped for a past one), ``[B, w_dim]``; without a pool all active codes,
    ``[B * (stage + 1), w_dim]``. Detached."""
    act = active_codes(ws, stage).detach()
    if pool is not None:
        return pool.query(act)
    return act.reshape(-1, act.shape[-1])


def discriminator_loss(
    D: nn.Module | Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor, scores: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """``mean softplus(-D(real)) + mean softplus(D(fake))``, its two parts and (``scores``) D's mean scores, as floats."""
    real_pred, fake_pred = D(real), D(fake)
    real_loss = F.softplus(-real_pred).mean()
    fake_loss = F.softplus(fake_pred).mean()
    logs = {"d_real": float(real_loss.detach()), "d_fake": float(fake_loss.detach())}
    if scores:
        logs.update(real_score=float(real_pred.detach().mean()), fake_score=float(fake_pred.detach().mean()))
    return real_loss + fake_loss, logs


def r1_penalty(D: nn.Module | Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """``mean_b ||d D(real_b) / d real_b||^2`` (squared L2 norm over all of a sample's input entries), with the graph
    kept so that it can be back-propagated into D's parameters (double backward)."""
    real = real.detach().requires_grad_(True)
    with torch.enable_grad():
        out = D(real)
        (grad,) = torch.autograd.grad(out.sum(), real, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def lazy_r1_loss(
    D: nn.Module | Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, gamma: float = 10.0, every: int = 16
) -> torch.Tensor:
    """The lazy R1 term taken every ``every`` steps: ``gamma / 2 * r1_penalty * every``."""
    return gamma / 2 * r1_penalty(D, real) * every


def r1_due(step: int, every: int = 16) -> bool:
    """Whether the lazy R1 step is taken at global step ``step`` (``step % every == 0``, as e4e; never if every <= 0)."""
    return every > 0 and step % every == 0
