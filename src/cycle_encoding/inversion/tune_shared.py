"""One generator tuned on many images: PTI's multi-ID mode (``training/coaches/multi_id_coach.py`` in PTI and in the
Cycle Encoding authors' tree).

Every image's pivot is given (computed first by the stages before tuning). One trainable copy of G and one Adam
(``tune.tuning_copy``) serve all images: for ``steps`` rounds, for each image in the given order, one step of the
same loss as ``pivotal_tune`` (``tune.tuning_loss``: MSE + perceptual on the image's pivot and target, the locality
regularizer on the global step counter's interval), ``zero_grad``, ``backward``, one Adam step. The global step
counter ``g = round * images + position`` counts every step over all images; the regularizer runs on steps with
``g % locality_every == 0`` (the rule ``pivotal_tune`` applies to its own counter). PTI computes its flag after each
step from the counter before the increment, so its schedule is the same one shifted by a step (steps 0, 1, 1 + k,
1 + 2k, ...); with the default interval 1 (PTI's and this project's) both regularize every step.

Early stop: none, as PTI's multi-ID coach (``stop_threshold`` is not used): a shared generator keeps moving for
every image after one image is close enough, so a distance measured at an image's step is no longer its distance
after the round, and stopping the whole tuning when all images are under the threshold would rest on stale
measurements; the loop is PTI's, ``steps * images`` Adam steps.

Seeds: PTI draws the regularizer's codes from one global random state. Here each image draws them from its own
``torch.Generator`` seeded by ``seeds[i]`` (the run folder gives the seed ``pivotal_tune`` would get for that image:
run seed, image index, stage), so an image's draws do not depend on the other images, and one image tuned in this
mode is ``pivotal_tune`` without early stop, bit for bit. The state of a tuning (the weights, Adam's state, every
image's generator state, the rounds done and the losses so far) is a ``SharedTuneState``: ``save_every`` rounds it
goes to ``on_save`` (the run folder writes it atomically), and a tuning started with ``resume=`` that state goes on
as if never stopped (same weights, bit for bit, on the same machine).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.common import torch_load
from ..errors import CycleEncodingError
from ..losses.networks import LossNetworks
from ..networks.stylegan2 import Generator
from ..utils import atomic_write
from .common import cpu_generator, frozen
from .tune import TuneConfig, tuning_copy, tuning_loss

STATE_FORMAT = "cycle-encoding-shared-tune-state"


@dataclass
class SharedTuneState:
    """Where a shared tuning stands after ``rounds`` whole rounds (what a checkpoint holds)."""

    rounds: int
    images: list[str]  # what the tuning was started on (names or hashes), in order: a resume must match
    weights: dict[str, torch.Tensor]  # the tuned copy's parameters
    optimizer: dict[str, Any]  # Adam's state_dict
    rng: list[torch.Tensor]  # every image's generator state
    losses: list[list[dict[str, Any]]] = field(default_factory=list)  # per image, its steps' records so far


@dataclass
class SharedTuneResult:
    generator: Generator  # the one tuned copy (eval mode, gradients off)
    losses: list[list[dict[str, Any]]]  # per image, its steps' records
    rounds: int
    updates: int  # Adam steps taken over all images


def pivotal_tune_shared(
    G: Generator,
    pivots: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    nets: LossNetworks | None = None,
    config: TuneConfig | None = None,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    *,
    keys: Sequence[str] | None = None,
    resume: SharedTuneState | None = None,
    save_every: int = 0,
    on_save: Callable[[SharedTuneState], None] | None = None,
) -> SharedTuneResult:
    """Tune one copy of ``G`` on every ``(pivot [1, N, w_dim], target [1, C, R, R])`` pair (see the module doc).

    ``seeds[i]``: the seed of image i's regularizer draws (default: i). ``on_step(i, record)`` sees each step's
    losses. ``keys``: what identifies the images (default: their positions), recorded in the saved states; a
    ``resume`` state must have the same. ``save_every`` > 0: after every that many rounds (and not after the last)
    ``on_save`` gets the state. ``G`` is not changed."""
    c = config or TuneConfig()
    n = len(pivots)
    if n == 0 or len(targets) != n:
        raise CycleEncodingError(f"shared tuning needs one target per pivot, got {n} pivots and {len(targets)} targets")
    nets = nets or LossNetworks()
    seeds = list(range(n)) if seeds is None else list(seeds)
    keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
    device = G.w_avg.device
    ws = [p.to(device).detach() for p in pivots]
    xs = [x.to(device) for x in targets]
    gens = [cpu_generator(s) for s in seeds]
    tuned, opt = tuning_copy(G, c)
    losses: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    start = 0
    if resume is not None:
        start = _restore(resume, keys, c.steps, tuned, opt, gens)
        losses = [list(r) for r in resume.losses]
    with frozen(G):
        for rnd in range(start, c.steps):
            for i in range(n):
                g = rnd * n + i
                rec: dict[str, Any] = {"stage": "tune", "step": g, "round": rnd}
                regularize = c.locality and g % c.locality_every == 0
                loss = tuning_loss(tuned, G, ws[i], xs[i], nets.perceptual, c, gens[i], regularize, rec)
                assert loss is not None
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[i].append(rec)
                if on_step is not None:
                    on_step(i, rec)
            done = rnd + 1
            if save_every > 0 and on_save is not None and done % save_every == 0 and done < c.steps:
                on_save(_state(done, keys, tuned, opt, gens, losses))
    opt.zero_grad(set_to_none=True)
    tuned.requires_grad_(False).eval()
    return SharedTuneResult(generator=tuned, losses=losses, rounds=c.steps, updates=c.steps * n)


def _state(
    rounds: int, keys: list[str], tuned: Generator, opt: torch.optim.Optimizer, gens: list[torch.Generator],
    losses: list[list[dict[str, Any]]],
) -> SharedTuneState:  # fmt: skip
    weights = {k: p.detach().clone() for k, p in tuned.named_parameters()}
    optim = copy.deepcopy(opt.state_dict())  # a snapshot: the live state dict holds the moments Adam updates
    return SharedTuneState(rounds, list(keys), weights, optim, [g.get_state() for g in gens], [list(r) for r in losses])


def _restore(
    st: SharedTuneState, keys: list[str], steps: int, tuned: Generator, opt: torch.optim.Optimizer,
    gens: list[torch.Generator],
) -> int:  # fmt: skip
    """Put a saved state into the tuned copy, its Adam and the images' generators; the rounds already done."""
    if st.images != keys:
        raise CycleEncodingError(
            f"the saved shared tuning was started on {len(st.images)} other image(s) than these {len(keys)}"
        )
    if not 0 <= st.rounds <= steps or len(st.rng) != len(gens):
        raise CycleEncodingError(f"the saved shared tuning does not fit ({st.rounds} rounds of {steps})")
    with torch.no_grad():
        params = dict(tuned.named_parameters())
        if set(params) != set(st.weights):
            raise CycleEncodingError("the saved shared tuning is of another generator (its weights differ in names)")
        for k, p in params.items():
            p.copy_(st.weights[k])
    opt.load_state_dict(st.optimizer)
    for g, s in zip(gens, st.rng):
        g.set_state(s)
    return st.rounds


def save_state(path: str | Path, st: SharedTuneState) -> Path:
    """``st`` as a torch file (tensors and plain containers only: it loads with ``weights_only=True``), atomically."""
    doc = {"format": STATE_FORMAT, "version": 1, "rounds": st.rounds, "images": st.images, "weights": st.weights,
           "optimizer": st.optimizer, "rng": st.rng, "losses": st.losses}  # fmt: skip
    return atomic_write(path, lambda t: torch.save(doc, t))


def load_state(path: str | Path) -> SharedTuneState:
    doc = torch_load(path)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CycleEncodingError(f"{path}: not a saved shared tuning")
    return SharedTuneState(int(doc["rounds"]), list(doc["images"]), doc["weights"], doc["optimizer"], doc["rng"],
                           doc["losses"])  # fmt: skip
