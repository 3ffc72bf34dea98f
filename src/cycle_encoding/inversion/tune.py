"""Stage ``tune``: pivotal tuning of all the generator's weights with the pivot fixed (PTI), with the locality
regularizer and PTI's early stop.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.tune"."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import check_at_least, check_one_of
from ..networks.stylegan2 import NOISE_MODES, Generator
from ..ops import PRECISIONS, autocast
from .common import LossNetworks, cpu_generator, frozen, synthesis_pass


@dataclass(frozen=True)
class TuneConfig:
    """Options of pivotal tuning (defaults: the Cycle Encoding authors' PTI settings)."""

    steps: int = 350
    lr: float = 3e-4
    l2_lambda: float = 1.0
    perceptual_lambda: float = 1.0
    stop_threshold: float | None = 0.07  # None: never stop early
    locality: bool = True
    locality_alpha: float = 30.0
    locality_truncation: float = 0.5
    locality_l2_lambda: float = 0.1
    locality_perceptual_lambda: float = 0.1
    locality_every: int = 1
    locality_samples: int = 1
    locality_noise_mode: str = "none"
    precision: str = "fp32"  # "bf16": autocast networks, fp32 weights/loss/optimizer (see the design notes)
    batch_passes: bool = False  # True: the pivot's and the regularizer's renders in one batched pass (see the doc)
    compile: bool = False  # torch.compile the generators' passes (once per process; see the design notes)

    def __post_init__(self) -> None:
        check_at_least(self, "tune.", steps=0, locality_every=1, locality_samples=1)
        if not self.lr > 0:
            raise ValueError(f"tune.lr must be positive, got {self.lr}")
        check_one_of(self, "tune.", locality_noise_mode=NOISE_MODES, precision=PRECISIONS)


@dataclass
class TuneResult:
    generator: Generator  # the tuned copy (eval mode, gradients off)
    losses: list[dict[str, Any]]
    updates: int  # optimizer steps taken
    stopped_early: bool


def locality_codes(
    G_orig: Generator, pivot: torch.Tensor, count: int, alpha: float, truncation: float, gen: torch.Generator
) -> torch.Tensor:
    """``count`` codes at distance ``alpha`` from the pivot, toward mapped random codes: ``[count, N, w_dim]``."""
    z = torch.randn(count, G_orig.z_dim, generator=gen).to(pivot.device)
    with torch.no_grad():
        wz = G_orig.mapping(z, truncation=truncation)
    d = wz - pivot
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return pivot + alpha * d / norm


def locality_noise(G: Generator, mode: str, count: int, gen: torch.Generator) -> list[torch.Tensor | None]:
    """The noise of the regularizer's ``count`` renders per noise layer, the same for the tuned and the original G:
    None for ``"none"``, G's constant noise for ``"const"``, and for ``"random"`` a draw from the tuning's seeded
    generator ``gen`` (layer by layer, after the step's codes), so a run repeats and each image's draws are its own."""
    bufs = G.noise_buffers()
    if mode == "none":
        return [None] * len(bufs)
    if mode == "const":
        return [n.expand(count, *n.shape[1:]) for n in bufs]
    return [torch.randn(count, *n.shape[1:], generator=gen).to(n.device) for n in bufs]


def stacked_noise(G: Generator, rest: list[torch.Tensor | None], count: int) -> list[torch.Tensor]:
    """Noise for a batch [pivot, regularizer codes]: G's constant noise for the pivot's row, ``rest`` (from
    ``locality_noise``) for the others; zeros where ``rest`` has none (adding 0 leaves the activation exactly as
    without noise)."""
    return [
        torch.cat([n, n.new_zeros(count, *n.shape[1:]) if r is None else r]) for n, r in zip(G.noise_buffers(), rest)
    ]


def tuning_loss(
    tuned: Generator,
    G: Generator,
    pivot: torch.Tensor,
    x: torch.Tensor,
    perceptual: torch.nn.Module | None,
    c: TuneConfig,
    gen: torch.Generator,
    regularize: bool,
    rec: dict[str, Any],
    stop_threshold: float | None = None,
) -> torch.Tensor | None:
    """One step's loss of the tuned copy ``tuned`` on the pivot ``pivot`` and its target ``x`` (see the design notes),
    the locality regularizer's codes drawn from ``gen`` when ``regularize``; the terms go into ``rec``. None (and
    ``rec["stopped"]``) when the perceptual distance is at or under ``stop_threshold``: the step is not taken.
    ``G`` is the frozen original (gradients off)."""
    device = pivot.device
    synthesis = synthesis_pass(c.compile, device)
    new = old = p_new = None
    if regularize:  # drawn before the stop check: a stop ends the tuning, so no later draw is affected
        wr = locality_codes(G, pivot, c.locality_samples, c.locality_alpha, c.locality_truncation, gen)
        rest = locality_noise(G, c.locality_noise_mode, wr.shape[0], gen)
    if regularize and c.batch_passes:
        # one pass of the tuned G on [pivot, w_r...] (the w_r rows without noise or with G's constant noise,
        # as the regularizer asks), one perceptual call on both pairs: the same terms as two passes
        noise = stacked_noise(tuned, rest, wr.shape[0])
        with autocast(device, c.precision):
            both = synthesis(tuned, torch.cat([pivot, wr]), noise=noise).float()
            with torch.no_grad():  # the frozen original: no gradient, no activations kept
                old = synthesis(G, wr, noise=rest).float()
        y, new = both[:1], both[1:]
        if perceptual is not None:
            with autocast(device, c.precision):
                pv = perceptual(both, torch.cat([x.to(both.dtype), old])).float()
            p_new = pv[1:].mean()
    else:
        with autocast(device, c.precision):
            y = synthesis(tuned, pivot, noise_mode="const")
        y = y.float()
    mse = F.mse_loss(y, x)
    rec["l2"] = float(mse.detach())
    loss = c.l2_lambda * mse
    if perceptual is not None:
        if p_new is not None:
            p = pv[:1].mean()
        else:
            with autocast(device, c.precision):
                p = perceptual(y, x).float().mean()
        rec["perceptual"] = float(p.detach())
        loss = loss + c.perceptual_lambda * p
        if stop_threshold is not None and rec["perceptual"] <= stop_threshold:
            rec["stopped"] = True
            return None
    if regularize:
        if new is None:
            with autocast(device, c.precision):
                new = synthesis(tuned, wr, noise=rest)
                with torch.no_grad():  # the frozen original: no gradient, no activations kept
                    old = synthesis(G, wr, noise=rest)
            new, old = new.float(), old.float()
        assert new is not None and old is not None
        reg = c.locality_l2_lambda * F.mse_loss(new, old)
        if perceptual is not None and c.locality_perceptual_lambda:
            if p_new is None:
                with autocast(device, c.precision):
                    p_new = perceptual(new, old).float().mean()
            reg = reg + c.locality_perceptual_lambda * p_new
        rec["locality"] = float(reg.detach())
        loss = loss + reg
    rec["loss"] = float(loss.detach())
    return loss


def tuning_adam(params: list[torch.Tensor], c: TuneConfig) -> torch.optim.Adam:
    """The tuning's Adam (lr ``c.lr``, betas 0.9, 0.999; torch's fused kernel outside fp32)."""
    fused = {"fused": True} if c.precision != "fp32" else {}
    return torch.optim.Adam(params, lr=c.lr, betas=(0.9, 0.999), **fused)


def tuning_copy(G: Generator, c: TuneConfig) -> tuple[Generator, torch.optim.Adam]:
    """A trainable copy of ``G`` and its Adam."""
    tuned = copy.deepcopy(G).eval()
    tuned.requires_grad_(True)
    return tuned, tuning_adam([p for p in tuned.parameters() if p.requires_grad], c)


def pivotal_tune(
    G: Generator,
    pivot: torch.Tensor,
    target: torch.Tensor,
    nets: LossNetworks | None = None,
    config: TuneConfig | None = None,
    seed: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TuneResult:
    """Tune a copy of ``G`` so that it renders ``target`` ``[1, C, R, R]`` from ``pivot`` ``[1, N, w_dim]``; ``G``
    itself is not changed (it is the frozen original of the locality regularizer)."""
    c = config or TuneConfig()
    nets = nets or LossNetworks()
    device = G.w_avg.device
    gen = cpu_generator(seed)
    pivot = pivot.to(device).detach()
    x = target.to(device)
    tuned, opt = tuning_copy(G, c)
    losses: list[dict[str, Any]] = []
    stopped = False
    with frozen(G):
        for step in range(c.steps):
            rec: dict[str, Any] = {"stage": "tune", "step": step}
            regularize = c.locality and step % c.locality_every == 0
            loss = tuning_loss(tuned, G, pivot, x, nets.perceptual, c, gen, regularize, rec, c.stop_threshold)
            if loss is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(rec)
            if on_step is not None:
                on_step(rec)
            if loss is None:
                stopped = True
                break
    opt.zero_grad(set_to_none=True)
    tuned.requires_grad_(False).eval()
    updates = len(losses) - stopped
    return TuneResult(generator=tuned, losses=losses, updates=updates, stopped_early=stopped)
