"""The latent discriminator, its losses, lazy R1, the pool of past codes, and the delta loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.losses.adversarial import (
    active_codes,
    discriminator_loss,
    encoder_adversarial_loss,
    fake_codes_for_discriminator,
    lazy_r1_loss,
    r1_due,
    r1_penalty,
    sample_real_codes,
)
from cycle_encoding.losses.delta import delta_loss
from cycle_encoding.losses.latent_pool import LatentPool
from cycle_encoding.networks.latent_discriminator import LatentDiscriminator, LatentDiscriminatorConfig

# -- the network ---------------------------------------------------------------------------------------------------


def test_default_discriminator_has_e4e_layout():
    D = LatentDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in D.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (512, 512),
        "mlp.0.bias": (512,),
        "mlp.2.weight": (512, 512),
        "mlp.2.bias": (512,),
        "mlp.4.weight": (512, 512),
        "mlp.4.bias": (512,),
        "mlp.6.weight": (1, 512),
        "mlp.6.bias": (1,),
    }
    acts = [m for m in D.mlp if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 3 and all(a.negative_slope == 0.2 for a in acts)


def test_loads_an_e4e_style_state_dict_and_computes_the_same_function():
    torch.manual_seed(0)
    # e4e's LatentCodesDiscriminator(512, 4) is an nn.Sequential named `mlp` of Linear / LeakyReLU(0.2)
    theirs = nn.Sequential(
        nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Linear(512, 512),
        nn.LeakyReLU(0.2), nn.Linear(512, 1),
    )  # fmt: skip
    sd = {f"mlp.{k}": v for k, v in theirs.state_dict().items()}
    D = LatentDiscriminator()
    D.load_state_dict(sd, strict=True)
    w = torch.randn(5, 512)
    torch.testing.assert_close(D(w), theirs(w), rtol=0, atol=0)


def test_small_width_and_shapes():
    D = LatentDiscriminator(LatentDiscriminatorConfig(w_dim=32))
    assert D.mlp[0].weight.shape == (32, 32) and D.mlp[-1].weight.shape == (1, 32)
    assert D(torch.randn(4, 3, 32)).shape == (4, 3, 1)
    D2 = LatentDiscriminator(w_dim=16, hidden_dim=64, num_layers=2)
    assert D2.mlp[0].weight.shape == (64, 16) and D2.mlp[2].weight.shape == (1, 64)
    assert LatentDiscriminatorConfig.from_dict(D2.config.to_dict()) == D2.config
    with pytest.raises(ValueError, match="expects codes"):
        D(torch.randn(2, 31))
    with pytest.raises(CycleEncodingError):
        LatentDiscriminatorConfig(num_layers=0)


# -- R1 ------------------------------------------------------------------------------------------------------------


def _numpy_input_gradient(D: LatentDiscriminator, w: np.ndarray) -> np.ndarray:
    """d D(w) / d w for an MLP of Linear + LeakyReLU, by the chain rule in numpy float64."""
    layers = [m for m in D.mlp if isinstance(m, nn.Linear)]
    slope = D.config.negative_slope
    Ws = [m.weight.detach().double().numpy() for m in layers]
    bs = [m.bias.detach().double().numpy() for m in layers]
    grads = []
    for x in w.astype(np.float64):
        jac = np.eye(len(x))
        h = x
        for i, (W, b) in enumerate(zip(Ws, bs)):
            z = W @ h + b
            jac = W @ jac
            if i < len(Ws) - 1:
                d = np.where(z > 0, 1.0, slope)
                h = np.where(z > 0, z, slope * z)
                jac = d[:, None] * jac
        grads.append(jac[0])
    return np.stack(grads)


def test_r1_equals_the_formula():
    torch.manual_seed(1)
    D = LatentDiscriminator(w_dim=6, hidden_dim=7, num_layers=3)
    real = torch.randn(9, 6)
    g = _numpy_input_gradient(D, real.numpy())
    expect = float((g**2).sum(1).mean())
    assert float(r1_penalty(D, real).detach()) == pytest.approx(expect, rel=1e-5)
    assert float(lazy_r1_loss(D, real, gamma=10.0, every=16).detach()) == pytest.approx(10 / 2 * expect * 16, rel=1e-5)
    assert not real.requires_grad  # the caller's tensor is left alone


def test_r1_double_backward_matches_finite_differences():
    torch.manual_seed(2)
    D = LatentDiscriminator(w_dim=4, hidden_dim=5, num_layers=3).double()
    real = torch.randn(6, 4, dtype=torch.float64)
    params = dict(D.named_parameters())
    loss = lazy_r1_loss(D, real, gamma=10.0, every=16)
    loss.backward()  # double backward through autograd.grad(create_graph=True)
    # every weight feeds the input gradient (the last bias does not: its gradient stays None)
    weights = [m.weight for m in D.mlp if isinstance(m, nn.Linear)]
    assert all(w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0 for w in weights)

    def r1_of(name: str, value: torch.Tensor) -> float:
        ps = {k: (value if k == name else v.detach()) for k, v in params.items()}
        return float(lazy_r1_loss(lambda w: functional_call(D, ps, (w,)), real, 10.0, 16).detach())

    for name in ("mlp.0.weight", "mlp.2.bias", "mlp.4.weight"):
        p = params[name].detach()
        idx = (0,) * p.ndim
        eps = 1e-6
        plus, minus = p.clone(), p.clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (r1_of(name, plus) - r1_of(name, minus)) / (2 * eps)
        assert float(params[name].grad[idx]) == pytest.approx(fd, rel=1e-4, abs=1e-7), name


def test_r1_due_every_16_steps():
    assert [s for s in range(50) if r1_due(s, 16)] == [0, 16, 32, 48]
    assert not any(r1_due(s, 0) for s in range(5))


# -- adversarial losses --------------------------------------------------------------------------------------------


def test_encoder_adversarial_loss_is_the_mean_over_active_codes():
    torch.manual_seed(3)
    D = LatentDiscriminator(w_dim=8, num_layers=3)
    ws = torch.randn(4, 6, 8, requires_grad=True)
    stage = 2
    loss = encoder_adversarial_loss(D, ws, stage)
    # e4e's form: the average over the active codes of each code's batch mean of softplus(-D(w_i))
    with torch.no_grad():
        per_code = [np.log1p(np.exp(-D(ws[:, i]).double().numpy())).mean() for i in range(stage + 1)]
    assert float(loss.detach()) == pytest.approx(float(np.mean(per_code)), rel=1e-5)
    loss.backward()
    assert ws.grad[:, : stage + 1].abs().sum() > 0
    assert torch.equal(ws.grad[:, stage + 1 :], torch.zeros_like(ws.grad[:, stage + 1 :]))
    with pytest.raises(CycleEncodingError, match="stage"):
        active_codes(ws, 6)


def test_discriminator_loss_formula():
    torch.manual_seed(4)
    D = LatentDiscriminator(w_dim=8, num_layers=2)
    real, fake = torch.randn(5, 8), torch.randn(7, 8)
    loss, parts = discriminator_loss(D, real, fake)
    with torch.no_grad():
        r = np.log1p(np.exp(-D(real).double().numpy())).mean()
        f = np.log1p(np.exp(D(fake).double().numpy())).mean()
    assert float(loss.detach()) == pytest.approx(r + f, rel=1e-5)
    assert parts["d_real"] == pytest.approx(r, rel=1e-5) and parts["d_fake"] == pytest.approx(f, rel=1e-5)


def test_discriminator_loss_falls_on_separable_codes():
    torch.manual_seed(5)
    w_dim = 16
    D = LatentDiscriminator(w_dim=w_dim)
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    shift = torch.zeros(w_dim)
    shift[0] = 3.0

    def batch():
        return torch.randn(32, w_dim) + shift, torch.randn(32, w_dim) - shift

    real, fake = batch()
    with torch.no_grad():
        start = float(discriminator_loss(D, real, fake)[0])

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        opt.step()

    for step in range(48):  # e4e's order: a step on the loss, then one on the lazy R1 term when it is due
        r, f = batch()
        update(discriminator_loss(D, r, f)[0])
        if r1_due(step, 16):
            update(lazy_r1_loss(D, r, 10.0, 16))
    with torch.no_grad():
        end = float(discriminator_loss(D, real, fake)[0])
    assert end < 0.5 * start, (start, end)


def test_sample_real_codes_are_untruncated_mapping_outputs(tiny_generator):
    G = tiny_generator
    g = torch.Generator().manual_seed(7)
    codes = sample_real_codes(G, 6, generator=g)
    z = torch.randn(6, G.z_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expect = G.style(z)
        truncated = G.mapping(z, truncation=0.5)[:, 0]
    assert codes.shape == (6, G.w_dim) and not codes.requires_grad
    torch.testing.assert_close(codes, expect)
    assert not torch.allclose(codes, truncated)


def test_fake_codes_for_discriminator():
    torch.manual_seed(8)
    ws = torch.randn(3, 5, 4, requires_grad=True)
    flat = fake_codes_for_discriminator(ws, 2)
    assert flat.shape == (9, 4) and not flat.requires_grad
    torch.testing.assert_close(flat, ws[:, :3].detach().reshape(-1, 4))
    pool = LatentPool(size=50, seed=0)
    pooled = fake_codes_for_discriminator(ws, 2, pool)
    assert pooled.shape == (3, 4)
    for b in range(3):  # each row is one of that sample's active codes
        assert any(torch.equal(pooled[b], ws[b, i].detach()) for i in range(3))


# -- the pool ------------------------------------------------------------------------------------------------------


def _tagged(ids: range, w_dim: int = 3) -> torch.Tensor:
    """Codes whose first entry is a unique id, so that a returned code can be traced to its query."""
    x = torch.zeros(len(ids), w_dim)
    x[:, 0] = torch.tensor(list(ids), dtype=torch.float32)
    return x


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_pool_returns_past_codes_with_the_stated_probability(p):
    pool = LatentPool(size=50, p=p, seed=0)
    first = _tagged(range(50))
    torch.testing.assert_close(pool.query(first), first)  # filling: returned as they are
    assert len(pool) == 50
    seen = set(range(50))
    n_past, n_total, next_id = 0, 0, 50
    for _ in range(1000):
        batch = _tagged(range(next_id, next_id + 8))
        out = pool.query(batch)
        for j, row in enumerate(out):
            tag = int(row[0])
            if tag != next_id + j:
                # a code queried before this one (earlier in this batch or before), never a made-up one
                assert tag in seen and tag < next_id + j
                n_past += 1
            n_total += 1
            seen.add(next_id + j)
        next_id += 8
        assert len(pool) == 50
    frac = n_past / n_total
    sigma = (p * (1 - p) / n_total) ** 0.5
    assert abs(frac - p) < 4 * sigma, (frac, p)


def test_pool_edge_cases_and_per_sample_pick():
    zero = LatentPool(size=0, seed=0)
    x = torch.randn(4, 3)
    torch.testing.assert_close(zero.query(x), x)
    always = LatentPool(size=2, p=1.0, seed=0)
    always.query(_tagged(range(2)))
    out = always.query(_tagged(range(2, 6)))
    assert all(int(r[0]) != 2 + j for j, r in enumerate(out))
    never = LatentPool(size=2, p=0.0, seed=0)
    never.query(_tagged(range(2)))
    torch.testing.assert_close(never.query(_tagged(range(2, 6))), _tagged(range(2, 6)))
    # [B, n, w_dim]: one of each sample's n codes, uniformly
    pick = LatentPool(size=0, seed=1)
    ws = torch.arange(3, dtype=torch.float32).view(1, 3, 1).repeat(3000, 1, 2)
    counts = np.bincount(pick.query(ws)[:, 0].long().numpy(), minlength=3)
    assert counts.sum() == 3000 and all(abs(c - 1000) < 4 * (3000 * (1 / 3) * (2 / 3)) ** 0.5 for c in counts)
    with pytest.raises(CycleEncodingError):
        LatentPool(size=-1)
    with pytest.raises(CycleEncodingError):
        pick.query(torch.zeros(2, 2, 2, 2))


def test_pool_state_round_trip_continues_exactly():
    a = LatentPool(size=10, seed=3)
    for _ in range(5):
        a.query(torch.randn(4, 6))
    state = a.state_dict()
    b = LatentPool(size=1, seed=99)
    b.load_state_dict(state)
    c = LatentPool(size=10, seed=99)  # control: different rng state
    c.load_state_dict({**state, "rng_state": torch.Generator().manual_seed(99).get_state()})
    g = torch.Generator().manual_seed(0)
    differ = False
    for _ in range(10):
        x = torch.randn(4, 6, generator=g)
        oa, ob, oc = a.query(x), b.query(x), c.query(x)
        assert torch.equal(oa, ob)
        differ |= not torch.equal(oa, oc)
    assert differ
    assert all(torch.equal(u, v) for u, v in zip(a.codes, b.codes))


# -- delta loss ----------------------------------------------------------------------------------------------------


def test_delta_loss_equals_its_formula():
    torch.manual_seed(9)
    ws = torch.randn(3, 6, 5)
    wn = ws.double().numpy()
    for stage in range(6):
        expect = sum(np.sqrt(((wn[:, i] - wn[:, 0]) ** 2).sum(1)).mean() for i in range(1, stage + 1))
        assert float(delta_loss(ws, stage)) == pytest.approx(float(expect), rel=1e-5, abs=1e-7), stage
    assert float(delta_loss(ws, 0)) == 0.0
    w_avg = torch.randn(5) * 10
    assert float(delta_loss(ws + w_avg, 4)) == pytest.approx(float(delta_loss(ws, 4)), rel=1e-4)
    with pytest.raises(CycleEncodingError):
        delta_loss(ws, 6)


def test_delta_loss_gradient_is_finite_at_zero_offsets():
    w0 = torch.randn(2, 1, 4)
    ws = w0.repeat(1, 5, 1).requires_grad_(True)
    loss = delta_loss(ws, 4)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(ws.grad).all()
