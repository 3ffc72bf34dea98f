"""Pivotal tuning of several images at once (``pivotal_tune_many``): each its own stacked weights, one vmapped pass.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.tune_batch"."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..networks.stylegan2 import Generator
from ..ops import autocast
from .common import LossNetworks, cpu_generator, frozen
from .tune import TuneConfig, TuneResult, locality_codes, locality_noise, stacked_noise, tuning_adam

Params = dict[str, torch.Tensor]
Noise = list[torch.Tensor | None]
Draws = tuple[torch.Tensor, list[Noise]]  # each image's regularizer codes [n, k, N, w_dim] and noise
Renders = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # the tuned and frozen renders of them, perceptual


class _Synthesis(nn.Module):
    """``G.synthesis`` as a module's forward, so that ``torch.func.functional_call`` runs it with other weights."""

    def __init__(self, G: Generator) -> None:
        super().__init__()
        self.G = G

    def forward(self, ws: torch.Tensor, noise: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return self.G.synthesis(ws, noise=noise)


def stack_parameters(G: Generator, n: int) -> Params:
    """``n`` copies of G's synthesis weights as leaf tensors ``[n, *shape]`` with gradients on (the mapping network
    is left out: tuning never changes it)."""
    return {
        k: p.detach()[None].repeat(n, *([1] * p.ndim)).requires_grad_(True)
        for k, p in G.named_parameters()
        if not k.startswith("style.")
    }


def stacked_synthesis(
    G: Generator, P: Params, ws: torch.Tensor, noise: Sequence[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """Render ``ws`` ``[n, b, num_ws, w_dim]`` (b codes per image) with the stacked weights ``P`` (``[n, ...]``, as
    ``stack_parameters`` makes them): images ``[n, b, C, R, R]``, image i's rows by ``G.synthesis`` with image i's
    weights. ``noise``: one entry per noise layer, ``[b, 1, H, W]`` (every image the same, e.g. G's constant noise)
    or ``[n, b, 1, H, W]``, or None for no noise (``noise_mode="none"``); None: G's constant noise. G's parameters
    are swapped for P's during the call, so no other thread may use G meanwhile (``pivotal_tune_many`` calls it on a
    private copy)."""
    if ws.ndim != 4 or ws.shape[2] != G.num_ws or ws.shape[3] != G.w_dim:
        raise ValueError(f"ws must have shape [n, b, {G.num_ws}, {G.w_dim}], got {list(ws.shape)}")
    noise = G.noise_buffers() if noise is None else list(noise)
    dims = [0 if t is not None and t.ndim == 5 else None for t in noise]
    module = _Synthesis(G)

    def one(p: Params, w: torch.Tensor, nz: Noise) -> torch.Tensor:
        return torch.func.functional_call(module, {f"G.{k}": v for k, v in p.items()}, (w, nz))

    return torch.func.vmap(one, in_dims=(0, 0, dims))(P, ws, noise)


class _Stack:
    """The images still tuning: their indices (in row order), their weights stacked ``[n, ...]``, one Adam."""

    def __init__(self, G: Generator, c: TuneConfig, n: int) -> None:
        self.active = list(range(n))
        self.P = stack_parameters(G, n)
        self.c = c
        self.opt = tuning_adam(list(self.P.values()), c)
        self.updates = 0

    def rows(self, keep: list[int]) -> Params:
        """The weights of rows ``keep`` (differentiable views of the stack)."""
        if len(keep) == len(self.active):
            return self.P
        idx = torch.tensor(keep, device=next(iter(self.P.values())).device)
        return {k: v.index_select(0, idx) for k, v in self.P.items()}

    def update(self, loss: torch.Tensor, keep: list[int]) -> None:
        """One Adam step on the kept rows' summed loss; rows not in ``keep`` leave the stack first (weights,
        gradients and Adam state carried over row by row, so each remaining image takes the step it would alone)."""
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        if len(keep) < len(self.active):
            idx = torch.tensor(keep, device=loss.device)
            Q = {k: v.detach().index_select(0, idx).requires_grad_(True) for k, v in self.P.items()}
            for k, v in self.P.items():
                if v.grad is not None:
                    Q[k].grad = v.grad.index_select(0, idx)
            opt = tuning_adam(list(Q.values()), self.c)
            for k in self.P:
                st = self.opt.state.get(self.P[k], {})
                opt.state[Q[k]] = {s: t.index_select(0, idx) if t.ndim > 0 else t for s, t in st.items()}
            self.P, self.opt = Q, opt
            self.active = [self.active[j] for j in keep]
        self.opt.step()
        self.updates += 1


def _unstack(G: Generator, P: Params, i: int) -> Generator:
    """Image i's tuned generator: a copy of G with image i's synthesis weights (eval mode, gradients off)."""
    tuned = copy.deepcopy(G).eval()
    with torch.no_grad():
        for k, p in tuned.named_parameters():
            if k in P:
                p.copy_(P[k][i])
    return tuned.requires_grad_(False)


def _stack_layers(per_image: list[Noise]) -> Noise:
    """Per-image noise lists -> one list, each layer stacked over the images (None where the images have none)."""
    return [None if layer[0] is None else torch.stack(layer) for layer in zip(*per_image)]  # type: ignore[misc]


def _draw(G: Generator, c: TuneConfig, piv: list[torch.Tensor], gens: list[torch.Generator]) -> Draws:
    """Each image's regularizer codes ``[n, k, N, w_dim]`` and noise (``locality_noise``, per image), drawn from its
    own generator in ``pivotal_tune``'s order (codes, then noise)."""
    wr, rests = [], []
    for p, g in zip(piv, gens):
        wr.append(locality_codes(G, p, c.locality_samples, c.locality_alpha, c.locality_truncation, g))
        rests.append(locality_noise(G, c.locality_noise_mode, c.locality_samples, g))
    return torch.stack(wr), rests


@torch.no_grad()
def _original(G: Generator, wr: torch.Tensor, rests: list[Noise]) -> torch.Tensor:
    """The frozen G's renders of every image's codes ``[n, k, ...]``, in one batch (its weights are every image's)."""
    noise = [None if t is None else t.flatten(0, 1) for t in _stack_layers(rests)]
    return G.synthesis(wr.flatten(0, 1), noise=noise).unflatten(0, wr.shape[:2]).float()


def _fit(
    T: Generator,
    G: Generator,
    P: Params,
    c: TuneConfig,
    perceptual: Any,
    step: int,
    pivot: torch.Tensor,
    x: torch.Tensor,
    draws: Draws | None,
) -> tuple[torch.Tensor, list[dict[str, Any]], list[bool], Renders | None]:
    """The pivot's renders by each image's weights and their reconstruction terms: (loss ``[n]``, records, stop
    flags, and with ``draws`` (``batch_passes``) the regularizer's renders from the same pass: (new, old, their
    perceptual distances or None)); ``T`` is the template the stacked weights run in."""
    n = pivot.shape[0]
    with autocast(x.device, c.precision):
        if draws is None:
            y, extra = stacked_synthesis(T, P, pivot)[:, 0].float(), None
        else:
            wr, rests = draws
            noise = _stack_layers([stacked_noise(G, r, wr.shape[1]) for r in rests])
            both = stacked_synthesis(T, P, torch.cat([pivot, wr], 1), noise).float()
            y, new, old = both[:, 0], both[:, 1:], _original(G, wr, rests)
            extra = (new, old, None)
            if perceptual is not None:
                pv = perceptual(both.flatten(0, 1), torch.cat([x[:, None], old], 1).flatten(0, 1))
                pv = pv.float().reshape(n, -1)
                extra = (new, old, pv[:, 1:].mean(1))
        p = None
        if perceptual is not None:
            p = pv[:, 0] if draws is not None else perceptual(y, x).float().reshape(n)
    mse = (y - x).square().flatten(1).mean(1)
    recs: list[dict[str, Any]] = [{"stage": "tune", "step": step, "l2": float(v)} for v in mse.detach()]
    loss = c.l2_lambda * mse
    stop = [False] * n
    if p is not None:
        for r, v in zip(recs, p.detach()):
            r["perceptual"] = float(v)
        loss = loss + c.perceptual_lambda * p
        if c.stop_threshold is not None:
            stop = [r["perceptual"] <= c.stop_threshold for r in recs]
    return loss, recs, stop, extra


def _locality(
    T: Generator, G: Generator, P: Params, c: TuneConfig, perceptual: Any, extra: Renders | None, draws: Draws | None
) -> torch.Tensor:
    """The regularizer's term per image ``[m]``, from the renders ``extra`` (new, old, perceptual or None), or, when
    None, from renders of ``draws`` made here."""
    if extra is None:
        wr, rests = draws
        with autocast(wr.device, c.precision):
            new = stacked_synthesis(T, P, wr, _stack_layers(rests)).float()
            old = _original(G, wr, rests)
        extra = (new, old, None)
    new, old, pn = extra
    reg = c.locality_l2_lambda * (new - old).square().flatten(1).mean(1)
    if perceptual is not None and c.locality_perceptual_lambda:
        if pn is None:
            with autocast(new.device, c.precision):
                pn = perceptual(new.flatten(0, 1), old.flatten(0, 1)).float().reshape(new.shape[0], -1).mean(1)
        reg = reg + c.locality_perceptual_lambda * pn
    return reg


def pivotal_tune_many(
    G: Generator,
    pivots: Sequence[torch.Tensor] | torch.Tensor,
    targets: Sequence[torch.Tensor] | torch.Tensor,
    nets: LossNetworks | None = None,
    config: TuneConfig | None = None,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[TuneResult]:
    """``pivotal_tune`` for several images in one batched loop: image i (pivot ``[1, N, w_dim]``, target ``[1, C, R,
    R]``, seed ``seeds[i]``) gets what ``pivotal_tune(G, pivots[i], targets[i], nets, config, seeds[i])`` gives, up to
    float rounding (see the design notes). ``on_step(i, record)`` sees image i's step records. ``G`` is not changed."""
    c = config or TuneConfig()
    perceptual = (nets or LossNetworks()).perceptual
    device = G.w_avg.device
    piv = [p.to(device).detach().reshape(1, G.num_ws, G.w_dim) for p in pivots]
    xs = [x.to(device).reshape(1, *x.shape[-3:]) for x in targets]
    seeds = list(seeds) if seeds is not None else [0] * len(piv)
    for what, count in (("targets", len(xs)), ("seeds", len(seeds))):
        if count != len(piv):
            raise ValueError(f"{len(piv)} pivots but {count} {what}")
    if not piv:
        return []
    gens = [cpu_generator(s) for s in seeds]
    S = _Stack(G, c, len(piv))
    # the module the stacked weights run in (G itself stays untouched), its modulation on the activations: a
    # weight per image and code measured 1.4x slower (benchmarks/speed.py --workloads tune-batch)
    T = copy.deepcopy(G).requires_grad_(False)
    T.set_fused_modconv(False)
    losses: list[list[dict[str, Any]]] = [[] for _ in piv]
    results: dict[int, TuneResult] = {}

    def emit(i: int, rec: dict[str, Any]) -> None:
        losses[i].append(rec)
        if on_step is not None:
            on_step(i, rec)

    def finish(i: int, row: int, stopped: bool) -> None:
        results[i] = TuneResult(_unstack(G, S.P, row), losses[i], S.updates, stopped)

    with frozen(G):
        for step in range(c.steps):
            act = S.active
            regularize = c.locality and step % c.locality_every == 0
            draws = _draw(G, c, [piv[i] for i in act], [gens[i] for i in act]) if regularize else None
            pivot, x = torch.stack([piv[i] for i in act]), torch.cat([xs[i] for i in act])
            loss, recs, stop, extra = _fit(T, G, S.P, c, perceptual, step, pivot, x, draws if c.batch_passes else None)
            for j, r in enumerate(recs):
                if stop[j]:
                    r["stopped"] = True
                    emit(act[j], r)
                    finish(act[j], j, True)
            keep = [j for j in range(len(act)) if not stop[j]]
            if not keep:
                S.active = []
                break
            loss = loss[keep]
            if regularize:
                extra = None if extra is None else tuple(None if t is None else t[keep] for t in extra)
                draws = None if draws is None else (draws[0][keep], [draws[1][j] for j in keep])
                reg = _locality(T, G, S.rows(keep), c, perceptual, extra, draws)
                for j, v in zip(keep, reg.detach()):
                    recs[j]["locality"] = float(v)
                loss = loss + reg
            for j, v in zip(keep, loss.detach()):
                recs[j]["loss"] = float(v)
            S.update(loss, keep)
            for j in keep:
                emit(act[j], recs[j])
    for row, i in enumerate(S.active):
        finish(i, row, False)
    return [results[i] for i in range(len(piv))]
