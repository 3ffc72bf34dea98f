"""Ranger (RAdam + Lookahead + gradient centralization) against an independent float64 computation, on a quadratic,
and through a state-dict round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cycle_encoding.checkpoints.common import torch_load
from cycle_encoding.optim import Ranger


def reference_ranger(params0, grads, lr, betas, eps, k, alpha, use_gc, gc_conv_only, threshold=5.0):
    """RAdam (Liu et al. 2020, rectified, momentum SGD while rho_t <= threshold) + Lookahead (Zhang et al. 2019) +
    gradient centralization (Yong et al. 2020), written from the papers' formulas in numpy float64."""
    b1, b2 = betas
    ps = [np.array(p, dtype=np.float64) for p in params0]
    slow = [p.copy() for p in ps]
    m = [np.zeros_like(p) for p in ps]
    v = [np.zeros_like(p) for p in ps]
    rho_inf = 2 / (1 - b2) - 1
    history = []
    for t, gs in enumerate(grads, start=1):
        for j, g in enumerate(gs):
            g = np.array(g, dtype=np.float64)
            min_dim = 3 if gc_conv_only else 1
            if use_gc and g.ndim > min_dim:
                axes = tuple(range(1, g.ndim))
                g = g - g.mean(axis=axes, keepdims=True)
            m[j] = b1 * m[j] + (1 - b1) * g
            v[j] = b2 * v[j] + (1 - b2) * g * g
            m_hat = m[j] / (1 - b1**t)
            rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
            if rho_t > threshold:
                # rectification term r_t, and the adaptive lr sqrt(1 - b2^t) / (sqrt(v) + eps) as in the Ranger code
                r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                ps[j] = ps[j] - lr * r_t * m_hat * math.sqrt(1 - b2**t) / (np.sqrt(v[j]) + eps)
            else:
                ps[j] = ps[j] - lr * m_hat
            if t % k == 0:
                slow[j] = slow[j] + alpha * (ps[j] - slow[j])
                ps[j] = slow[j].copy()
        history.append([p.copy() for p in ps])
    return history


@pytest.mark.parametrize("use_gc, gc_conv_only", [(True, False), (True, True), (False, False)])
def test_first_steps_match_the_formulas(use_gc, gc_conv_only):
    torch.manual_seed(0)
    shapes = [(4, 3), (4,), (2, 3, 3, 3)]  # linear weight (GC unless conv-only), bias (never GC), conv weight (GC)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params0 = [p.detach().numpy().copy() for p in params]
    steps = 20  # covers momentum-SGD steps (rho_t <= 5, t <= 5 or so), rectified steps, and Lookahead at 6, 12, 18
    grads = [[torch.randn(s) * (1 + 0.3 * t) for s in shapes] for t in range(steps)]
    kw = dict(lr=1e-2, betas=(0.95, 0.999), eps=1e-5, k=6, alpha=0.5)
    opt = Ranger(params, use_gc=use_gc, gc_conv_only=gc_conv_only, **kw)
    ref = reference_ranger(
        params0, [[g.numpy() for g in gs] for gs in grads], use_gc=use_gc, gc_conv_only=gc_conv_only, **kw
    )
    adaptive_seen = set()
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
        adaptive_seen.add(Ranger.rectification(t + 1, kw["betas"], 5.0)[0])
        for p, r in zip(params, ref[t]):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=2e-5, atol=2e-6, err_msg=f"step {t + 1}")
    assert adaptive_seen == {True, False}
    # the parameters really moved, and the lookahead step pulled them back halfway
    assert not np.allclose(params[0].detach().numpy(), params0[0])


def test_gradient_centralization_switch_changes_the_update():
    torch.manual_seed(1)
    w = torch.randn(3, 5)
    g = torch.randn(3, 5) + 2.0  # a large mean per row: GC removes it
    out = {}
    for use_gc in (True, False):
        p = torch.nn.Parameter(w.clone())
        opt = Ranger([p], lr=0.1, use_gc=use_gc)
        p.grad = g.clone()
        opt.step()
        out[use_gc] = (w - p.detach()) / 0.1  # first step: momentum SGD, update = lr * g_used
    np.testing.assert_allclose(out[False].numpy(), g.numpy(), rtol=1e-5)
    np.testing.assert_allclose(out[True].numpy(), (g - g.mean(1, keepdim=True)).numpy(), rtol=1e-4, atol=1e-6)


def test_minimizes_a_quadratic():
    torch.manual_seed(2)
    # 1-D parameter (no GC): an ill-conditioned quadratic
    a = torch.logspace(0, 2, 10)
    c = torch.randn(10)
    x = torch.nn.Parameter(torch.zeros(10))
    # 2-D parameter in a group without GC (a per-group option). With GC the row means of a matrix are not
    # restored once the adaptive steps have moved them (centered gradients have no row-mean component), so a plain
    # quadratic in a matrix is not a fair target for GC.
    target = torch.randn(4, 6)
    wmat = torch.nn.Parameter(torch.zeros(4, 6))

    def loss_fn():
        return 0.5 * (a * (x - c) ** 2).sum() + 0.5 * ((wmat - target) ** 2).sum()

    opt = Ranger([{"params": [x]}, {"params": [wmat], "use_gc": False}], lr=0.05)
    start = float(loss_fn().detach())
    for i in range(1000):
        if i in (500, 750):  # step the lr down: Adam-type steps hover around the minimum at a distance ~ lr
            for group in opt.param_groups:
                group["lr"] /= 10
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    end = float(loss_fn().detach())
    assert end < start * 1e-4, (start, end)
    assert torch.allclose(x, c, atol=1e-2) and torch.allclose(wmat, target, atol=1e-2)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.LeakyReLU(0.2), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 3)
    )


def _train(model, opt, data, steps):
    for x, y in data[:steps]:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return data[steps:]


def test_state_dict_round_trip_continues_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 2, 5, 5, generator=g), torch.randn(6, 3, generator=g)) for _ in range(25)]

    model_a = _model(0)
    opt_a = Ranger(model_a.parameters(), lr=1e-3)
    rest = _train(model_a, opt_a, data, 9)  # stop mid Lookahead cycle: slow weights differ from the fast ones
    sd = opt_a.state_dict()
    assert all("slow_buffer" in s for s in sd["state"].values())
    assert any(not torch.equal(s["slow_buffer"], p) for s, p in zip(sd["state"].values(), model_a.parameters()))
    torch.save({"model": model_a.state_dict(), "optimizer": sd}, tmp_path / "ckpt.pt")

    ck = torch_load(tmp_path / "ckpt.pt")  # weights_only loading
    model_b = _model(1)
    model_b.load_state_dict(ck["model"])
    opt_b = Ranger(model_b.parameters(), lr=5.0, k=2)  # hyper-parameters come back from the state dict too
    opt_b.load_state_dict(ck["optimizer"])
    assert opt_b.param_groups[0]["lr"] == 1e-3 and opt_b.param_groups[0]["k"] == 6

    model_c = _model(2)  # control: same weights, fresh optimizer: must NOT match (so the test can fail)
    model_c.load_state_dict(ck["model"])
    opt_c = Ranger(model_c.parameters(), lr=1e-3)

    _train(model_a, opt_a, rest, len(rest))
    _train(model_b, opt_b, rest, len(rest))
    _train(model_c, opt_c, rest, len(rest))
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert sa["step"] == sb["step"] == 25
        for key in ("exp_avg", "exp_avg_sq", "slow_buffer"):
            assert torch.equal(sa[key], sb[key])
    assert any(not torch.equal(pa, pc) for pa, pc in zip(model_a.parameters(), model_c.parameters()))


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw in ({"lr": 0}, {"alpha": 1.5}, {"k": 0}, {"betas": (1.0, 0.999)}, {"eps": 0}):
        with pytest.raises(ValueError):
            Ranger(p, **kw)
