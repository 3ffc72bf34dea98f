"""Pivotal tuning of several images at once: ``pivotal_tune_many``.

Every image keeps its own copy of the generator's weights: the copies are stacked along a leading image axis
(``[n, ...]`` per parameter) and one batched forward/backward serves all of them. Each modulated convolution is one
grouped convolution with one group per image (its own weights), the style modulation applied to the activations and
the demodulation to the outputs (the same function as the per-sample weights ``pivotal_tune``'s batch-1 passes
build, without building them: measured faster than a weight per sample). Every other layer (biases, noise strengths, the constant input, ToRGB) takes its image's row, and the
blur/upsampling filters are shared buffers. The frozen original G of the locality regularizer runs the same code with
its weights broadcast to every image (no copy), so its renders are what it renders for that image alone.

Each image's loss is its own (the summed loss's gradient for an image's weights is that image's gradient), each
image draws its regularizer codes from its own seeded generator (``seeds[i]``, the seed ``pivotal_tune`` is given
for it), and Adam is elementwise with one step count for all images, so one Adam over the stacked weights takes the
step that each image's own Adam would. An image whose perceptual distance meets the stop threshold leaves the batch
before the update, as in ``pivotal_tune``: its weights are taken out, and the others' weights and Adam state are
carried over to a smaller stack and continue.

The result equals ``pivotal_tune`` on each image alone up to float rounding, not bit for bit: the modulation applied
to the activations rounds differently from the per-sample weights, and grouped convolutions over n images and the
perceptual network on a batch of n sum in another order than on one image (measured in fp32: losses within ~1e-6
relative per step, tuned weights within ~1e-5 of their change after 8-12 steps; see the tests and ``benchmarks/speed.py
--workloads tune-batch``). In bf16 the batched images are as close to the ones tuned alone in bf16 as bf16 is to
fp32. The fp32 path keeps torch's for-loop Adam as ``pivotal_tune`` does,
``bf16`` its fused Adam.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..networks.stylegan2 import Generator, ModulatedConv2d, StyledConv, ToRGB
from ..ops import LRELU_GAIN, LRELU_SLOPE, autocast
from .common import LossNetworks, cpu_generator, frozen
from .tune import TuneConfig, TuneResult, locality_codes, locality_noise

Params = dict[str, torch.Tensor]


def stack_parameters(G: Generator, n: int) -> Params:
    """``n`` copies of G's synthesis weights as leaf tensors ``[n, *shape]`` with gradients on (the mapping network
    is left out: tuning never changes it)."""
    return {
        k: p.detach()[None].repeat(n, *([1] * p.ndim)).requires_grad_(True)
        for k, p in G.named_parameters()
        if not k.startswith("style.")
    }


def broadcast_parameters(G: Generator, n: int) -> Params:
    """G's synthesis weights seen as ``n`` identical rows (expanded views, no copy): the frozen original's."""
    return {k: p.detach()[None].expand(n, *p.shape) for k, p in G.named_parameters() if not k.startswith("style.")}


def _modulated_conv(
    m: ModulatedConv2d, P: Params, name: str, x: torch.Tensor, style: torch.Tensor, n: int, b: int
) -> torch.Tensor:
    """``m``'s modulated convolution with image i's own weights for its ``b`` rows: x ``[n*b, in, H, W]``, style
    ``[n, b, w_dim]`` -> ``[n*b, out, H', W']``. The modulation scales the activations (not the weights): x * s is
    convolved with each image's W (one group per image, its b rows as the batch), then each output channel is
    demodulated by rsqrt(sum_i s_i^2 sum_k W_oik^2 + eps): the same function as the per-sample weights of
    ``ModulatedConv2d._forward_fused`` without building a weight per sample."""
    lin_w, lin_b = P[f"{name}.modulation.weight"], P[f"{name}.modulation.bias"]
    mod = m.modulation
    s = torch.baddbmm((lin_b * mod.lr_mul)[:, None, :], style, (lin_w * mod.scale).transpose(1, 2))  # [n, b, in]
    s = s * m.scale
    W = P[f"{name}.weight"].squeeze(1)  # [n, out, in, k, k] (a view: its gradient is no full-size copy)
    _, in_channel, height, width = x.shape
    k, out_channel = m.kernel_size, m.out_channel
    xs = (x.view(n, b, in_channel, height, width) * s[:, :, :, None, None].to(x.dtype)).transpose(0, 1)
    xs = xs.reshape(b, n * in_channel, height, width)
    if m.upsample:
        wt = W.transpose(1, 2).reshape(n * in_channel, out_channel, k, k)
        out = F.conv_transpose2d(xs, wt, padding=0, stride=2, groups=n)
    else:
        out = F.conv2d(xs, W.reshape(n * out_channel, in_channel, k, k), padding=m.padding, groups=n)
    h2, w2 = out.shape[-2:]
    out = out.view(b, n, out_channel, h2, w2).transpose(0, 1)  # [n, b, out, H', W']
    if m.demodulate:
        wsq = W.pow(2).sum([3, 4])  # [n, out, in]
        demod = torch.rsqrt(torch.bmm(s.pow(2), wsq.transpose(1, 2)) + m.eps)  # [n, b, out]
        out = out * demod[:, :, :, None, None].to(out.dtype)
    out = out.reshape(n * b, out_channel, h2, w2)
    if m.upsample:
        out = m.blur(out)
    return out


def _styled_conv(
    layer: StyledConv,
    P: Params,
    name: str,
    x: torch.Tensor,
    style: torch.Tensor,
    noise: torch.Tensor | None,
    n: int,
    b: int,
) -> torch.Tensor:
    out = _modulated_conv(layer.conv, P, f"{name}.conv", x, style, n, b)
    c, h, w = out.shape[1:]
    out = out.view(n, b, c, h, w)
    if noise is not None:  # [b, 1, H, W] (the same for every image) or [n, b, 1, H, W]
        out = out + P[f"{name}.noise.weight"].view(n, 1, 1, 1, 1) * noise
    out = out + P[f"{name}.activate.bias"].view(n, 1, c, 1, 1).to(out.dtype)
    return (F.leaky_relu(out, LRELU_SLOPE) * LRELU_GAIN).view(n * b, c, h, w)


def _to_rgb(
    layer: ToRGB, P: Params, name: str, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None, n: int, b: int
) -> torch.Tensor:
    out = _modulated_conv(layer.conv, P, f"{name}.conv", x, style, n, b)
    c, h, w = out.shape[1:]
    out = (out.view(n, b, c, h, w) + P[f"{name}.bias"].view(n, 1, c, 1, 1)).view(n * b, c, h, w)
    if skip is not None:
        out = out + layer.upsample(skip)
    return out


def stacked_synthesis(
    G: Generator, P: Params, ws: torch.Tensor, noise: Sequence[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """Render ``ws`` ``[n, b, num_ws, w_dim]`` (b codes per image) with the stacked weights ``P`` (``[n, ...]``, as
    ``stack_parameters`` makes them; G gives the architecture and the filters): images ``[n, b, C, R, R]``.
    ``noise``: one entry per noise layer, ``[b, 1, H, W]`` (every image the same, e.g. G's constant noise) or
    ``[n, b, 1, H, W]``, or None for no noise (``noise_mode="none"``); None: G's constant noise."""
    n, b = ws.shape[:2]
    if ws.ndim != 4 or ws.shape[2] != G.num_ws or ws.shape[3] != G.w_dim:
        raise ValueError(f"ws must have shape [n, b, {G.num_ws}, {G.w_dim}], got {list(ws.shape)}")
    if noise is None:
        noise = G.noise_buffers()
    const = P["input.input"]  # [n, 1, C, 4, 4]
    out = const.expand(n, b, *const.shape[2:]).reshape(n * b, *const.shape[2:])
    out = _styled_conv(G.conv1, P, "conv1", out, ws[:, :, 0], noise[0], n, b)
    skip = _to_rgb(G.to_rgb1, P, "to_rgb1", out, ws[:, :, 1], None, n, b)
    i = 1
    for j in range(len(G.to_rgbs)):
        out = _styled_conv(G.convs[2 * j], P, f"convs.{2 * j}", out, ws[:, :, i], noise[1 + 2 * j], n, b)
        out = _styled_conv(G.convs[2 * j + 1], P, f"convs.{2 * j + 1}", out, ws[:, :, i + 1], noise[2 + 2 * j], n, b)
        skip = _to_rgb(G.to_rgbs[j], P, f"to_rgbs.{j}", out, ws[:, :, i + 2], skip, n, b)
        i += 2
    return skip.view(n, b, *skip.shape[1:])


def _noise(G: Generator, mode: str, gens: Sequence[torch.Generator], count: int) -> list[torch.Tensor | None]:
    """The regularizer rows' noise per layer, ``count`` codes per image: ``locality_noise`` of each image (from its
    own generator when random) stacked ``[n, count, 1, H, W]``; None for ``"none"``."""
    per_image = [locality_noise(G, mode, count, g) for g in gens]
    out: list[torch.Tensor | None] = []
    for j in range(len(per_image[0])):
        layer = [r[j] for r in per_image]
        out.append(None if layer[0] is None else torch.stack(layer))  # type: ignore[arg-type]
    return out


def _unstack(G: Generator, P: Params, i: int) -> Generator:
    """Image i's tuned generator: a copy of G with image i's synthesis weights (eval mode, gradients off)."""
    tuned = copy.deepcopy(G).eval()
    with torch.no_grad():
        for k, p in tuned.named_parameters():
            if k in P:
                p.copy_(P[k][i])
    return tuned.requires_grad_(False)


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
    float rounding (see the module doc). ``on_step(i, record)`` sees image i's step records. ``G`` is not changed."""
    c = config or TuneConfig()
    nets = nets or LossNetworks()
    device = G.w_avg.device
    piv = [p.to(device).detach().reshape(1, G.num_ws, G.w_dim) for p in pivots]
    xs = [x.to(device).reshape(1, *x.shape[-3:]) for x in targets]
    total = len(piv)
    if len(xs) != total:
        raise ValueError(f"{total} pivots but {len(xs)} targets")
    seeds = list(seeds) if seeds is not None else [0] * total
    if len(seeds) != total:
        raise ValueError(f"{total} pivots but {len(seeds)} seeds")
    results: list[TuneResult | None] = [None] * total
    if total == 0:
        return []
    gens = [cpu_generator(s) for s in seeds]
    active = list(range(total))  # the images still tuning, in stack order
    P = stack_parameters(G, total)
    names = list(P)
    fast = c.precision != "fp32"

    def make_opt(params: Params) -> torch.optim.Adam:
        return torch.optim.Adam(
            [params[k] for k in names], lr=c.lr, betas=(0.9, 0.999), **({"fused": True} if fast else {})
        )

    opt = make_opt(P)
    losses: list[list[dict[str, Any]]] = [[] for _ in range(total)]
    updates = 0
    perceptual = nets.perceptual

    def finish(i: int, row: int, params: Params, stopped: bool) -> None:
        results[i] = TuneResult(generator=_unstack(G, params, row), losses=losses[i], updates=updates,
                                stopped_early=stopped)  # fmt: skip

    def emit(i: int, rec: dict[str, Any]) -> None:
        losses[i].append(rec)
        if on_step is not None:
            on_step(i, rec)

    with frozen(G):
        for step in range(c.steps):
            n = len(active)
            regularize = c.locality and step % c.locality_every == 0
            pivot = torch.stack([piv[i] for i in active])  # [n, 1, N, w_dim]
            x = torch.cat([xs[i] for i in active])  # [n, C, R, R]
            wr = new = old = pv = None
            if regularize and c.batch_passes:
                wr = torch.stack([locality_codes(G, piv[i], c.locality_samples, c.locality_alpha,
                                                 c.locality_truncation, gens[i]) for i in active])  # fmt: skip
                rest = _noise(G, c.locality_noise_mode, [gens[i] for i in active], wr.shape[1])
                noise = _join(G, rest, n, wr.shape[1])
                with autocast(device, c.precision):
                    both = stacked_synthesis(G, P, torch.cat([pivot, wr], 1), noise).float()
                    with torch.no_grad():
                        old = stacked_synthesis(G, broadcast_parameters(G, n), wr, rest).float()
                y, new = both[:, 0], both[:, 1:]
                if perceptual is not None:
                    k = wr.shape[1]
                    ys = torch.cat([y[:, None], new], 1).flatten(0, 1)
                    xo = torch.cat([x.to(both.dtype)[:, None], old], 1).flatten(0, 1)
                    with autocast(device, c.precision):
                        pv = perceptual(ys, xo).float().reshape(n, 1 + k)
            else:
                with autocast(device, c.precision):
                    y = stacked_synthesis(G, P, pivot)[:, 0]
                y = y.float()
            mse = (y - x).square().flatten(1).mean(1)  # [n]
            recs = [{"stage": "tune", "step": step, "l2": float(v)} for v in mse.detach()]
            loss = c.l2_lambda * mse
            stop = [False] * n
            if perceptual is not None:
                if pv is not None:
                    p = pv[:, 0]
                else:
                    with autocast(device, c.precision):
                        p = perceptual(y, x).float().reshape(n)
                for r, v in zip(recs, p.detach()):
                    r["perceptual"] = float(v)
                loss = loss + c.perceptual_lambda * p
                if c.stop_threshold is not None:
                    stop = [r["perceptual"] <= c.stop_threshold for r in recs]
            keep = [j for j in range(n) if not stop[j]]
            for j in range(n):
                if stop[j]:
                    recs[j]["stopped"] = True
                    emit(active[j], recs[j])
                    finish(active[j], j, P, True)
            if not keep:
                active = []
                break
            sub = keep if len(keep) < n else None
            if sub is not None:  # the images that stopped leave: the rest go on with rows `keep`
                idx = torch.tensor(keep, device=device)
                Pk = {k: v.index_select(0, idx) for k, v in P.items()}
                loss = loss.index_select(0, idx)
                if wr is not None:
                    wr, new, old = wr[idx], new[idx], old[idx]
                    if pv is not None:
                        pv = pv[idx]
            else:
                Pk = P
            m = len(keep)
            if regularize:
                if wr is None:
                    kept = [active[j] for j in keep]
                    wr = torch.stack([locality_codes(G, piv[i], c.locality_samples, c.locality_alpha,
                                                     c.locality_truncation, gens[i]) for i in kept])  # fmt: skip
                    rest = _noise(G, c.locality_noise_mode, [gens[i] for i in kept], wr.shape[1])
                    with autocast(device, c.precision):
                        new = stacked_synthesis(G, Pk, wr, rest)
                        with torch.no_grad():
                            old = stacked_synthesis(G, broadcast_parameters(G, m), wr, rest)
                    new, old = new.float(), old.float()
                assert new is not None and old is not None
                reg = c.locality_l2_lambda * (new - old).square().flatten(1).mean(1)
                if perceptual is not None and c.locality_perceptual_lambda:
                    if pv is not None:
                        pn = pv[:, 1:].mean(1)
                    else:
                        with autocast(device, c.precision):
                            pn = perceptual(new.flatten(0, 1), old.flatten(0, 1)).float().reshape(m, -1).mean(1)
                    reg = reg + c.locality_perceptual_lambda * pn
                for j, v in zip(keep, reg.detach()):
                    recs[j]["locality"] = float(v)
                loss = loss + reg
            for j, v in zip(keep, loss.detach()):
                recs[j]["loss"] = float(v)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            before = active
            if sub is not None:
                P, opt = _shrink(P, opt, idx, make_opt)
                active = [active[j] for j in keep]
            opt.step()
            updates += 1
            for j in keep:
                emit(before[j], recs[j])
    for row, i in enumerate(active):
        finish(i, row, P, False)
    opt.zero_grad(set_to_none=True)
    return [r for r in results if r is not None]


def _join(G: Generator, rest: list[torch.Tensor | None], n: int, count: int) -> list[torch.Tensor]:
    """Noise for [pivot row, regularizer rows] of every image: G's constant noise on the pivot's row, ``rest``
    (``_noise``) on the others, zeros where it has none: ``[n, 1 + count, 1, H, W]`` per layer."""
    out = []
    for nb, r in zip(G.noise_buffers(), rest):
        first = nb[None].expand(n, *nb.shape)
        r = nb.new_zeros(n, count, *nb.shape[1:]) if r is None else r
        out.append(torch.cat([first, r], 1))
    return out


def _shrink(
    P: Params, opt: torch.optim.Adam, idx: torch.Tensor, make_opt: Callable[[Params], torch.optim.Adam]
) -> tuple[Params, torch.optim.Adam]:
    """The stack reduced to rows ``idx``: new leaf weights with their gradients, and an Adam whose state (moments,
    step count) is the old one's rows, so each remaining image's next step is the one it would take alone."""
    Q = {k: v.detach().index_select(0, idx).requires_grad_(True) for k, v in P.items()}
    for k, v in P.items():
        if v.grad is not None:
            Q[k].grad = v.grad.index_select(0, idx)
    new = make_opt(Q)
    for k in P:
        st = opt.state.get(P[k])
        if st:
            new.state[Q[k]] = {
                s: (t.index_select(0, idx) if isinstance(t, torch.Tensor) and t.ndim > 0 else t) for s, t in st.items()
            }
    return Q, new
