"""The inversion stages on a tiny generator: the encoder pivot, the regularized refinement (Eq. 5-6, reset per target,
optimizer state from a training checkpoint), PTI's W projector, and pivotal tuning (lower error than the pivot, the
early stop at the threshold, the locality regularizer keeping G close to the original near the pivot)."""

from __future__ import annotations

import math

import pytest
import torch

from cycle_encoding.data.datasets import TensorDataset
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.inversion import (
    Inverter,
    ProjectConfig,
    RefineConfig,
    RegularizedRefiner,
    TuneConfig,
    encoder_pivot,
    load_encoder_source,
    pivotal_tune,
    project_w,
)
from cycle_encoding.inversion.common import LossNetworks, cpu_generator, render
from cycle_encoding.inversion.project import learning_rate, noise_regularization
from cycle_encoding.inversion.tune import locality_codes
from cycle_encoding.ops import pool_to
from cycle_encoding.optim import Ranger
from tests.conftest import make_tiny_generator, own_images, stand_in_perceptual, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    G = make_tiny_generator(resolution=16)
    E = tiny_encoder(G)
    return {
        "G": G,
        "E": E,
        "data": TensorDataset(own_images(G, 24, seed=1), name="own images"),
        "target": own_images(G, 1, seed=7),
        "P": stand_in_perceptual(),
    }


def test_encoder_pivot_is_eval_mode_code_with_the_offsets_asked(tiny):
    G, E, x = tiny["G"], tiny["E"], tiny["target"]
    E.trained_stage = 0
    E.train()
    E.stage = 2
    ws = encoder_pivot(E, x, "all")
    assert E.training and E.stage == 2  # restored
    E2 = tiny_encoder(G)
    E2.eval()
    with torch.no_grad():
        assert torch.equal(ws, E2(x))  # all offsets, eval mode
    w0 = encoder_pivot(E, x, "trained")  # stage 0: one code for all layers
    assert torch.allclose(w0, w0[:, :1].expand_as(w0)) and not torch.allclose(ws, ws[:, :1].expand_as(ws))
    E.trained_stage = None
    with pytest.raises(CycleEncodingError, match="does not record the stage"):
        encoder_pivot(E, x, "trained")
    E.eval()


def test_refine_lowers_target_loss_and_resets(tiny):
    G, E, data, x, P = tiny["G"], tiny["E"], tiny["data"], tiny["target"], tiny["P"]
    cfg = RefineConfig(lr=1e-2, identity_lambda=0.1)
    before = {k: v.clone() for k, v in E.state_dict().items()}
    r = RegularizedRefiner(G, E, data, cfg, LossNetworks(P), image_size=16)
    out = r.refine(x, seed=11)
    # L_S of the target falls from the trained encoder's to the pivot's
    assert out.target_loss < 0.8 * out.first_target_loss, (out.first_target_loss, out.target_loss)
    assert len(out.losses) == 16 and sum(rec["updated"] for rec in out.losses) == 15
    # Eq. 6 with lambda_reg = M = 7: the loss is the mean of L_S over the 8 images
    for rec in out.losses:
        assert rec["loss"] == pytest.approx((rec["target_l_s"] + 7 * rec["reg_l_s"]) / 8, rel=1e-5)
    # the first step's L_S of the target, computed here from the same draws: train mode, batch [7 random + x],
    # G's random noise drawn from the image's generator after the images (the authors' randomize_noise=True)
    gen = cpu_generator(11)
    idx = torch.randperm(len(data), generator=gen)[:7]
    batch = torch.cat([data.images[idx], x])
    noise = G.make_noise(8, generator=gen, device="cpu")
    Ec = tiny_encoder(G).train()
    with torch.no_grad():
        y = pool_to(G.synthesis(Ec(batch), noise=noise), 16)
        ls = (y[-1:] - x).square().mean() + 0.8 * P(y[-1:], x)[0]
    assert out.losses[0]["target_l_s"] == pytest.approx(float(ls), rel=1e-5)
    # the pivot is the target's code of the last forward, in train mode, after 15 updates
    assert out.pivot.shape == (1, G.num_ws, G.w_dim)
    # reset: the caller's encoder untouched, the refiner back to it, the same seed gives the same pivot
    assert all(torch.equal(before[k], v) for k, v in E.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in r.E.state_dict().items())
    again = r.refine(x, seed=11)
    assert torch.equal(again.pivot, out.pivot)
    assert not torch.equal(r.refine(x, seed=12).pivot, out.pivot)  # other random images, other pivot


def test_refine_takes_optimizer_state_and_data_from_training_checkpoint(tiny, tmp_path):
    G, data = tiny["G"], tiny["data"]
    from cycle_encoding.checkpoints.common import atomic_torch_save
    from cycle_encoding.utils import save_image

    folder = tmp_path / "train"
    for i in range(10):
        save_image(data.images[i], folder / f"{i:02d}.png")
    # a train-encoder checkpoint after 3 Ranger steps
    Et = tiny_encoder(G)
    opt = Ranger(Et.parameters(), lr=5e-4, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(3):
        Et.train()
        loss = Et(data.images[:4]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = {
        "format": "cycle-encoding-train",
        "version": 1,
        "step": 3,
        "encoder": Et.state_dict(),
        "encoder_config": Et.config.to_dict(),
        "trained_stage": 1,
        "opt_e": opt.state_dict(),
        "config": {"data": str(folder), "lr": 5e-4, "betas": [0.9, 0.99], "eps": 1e-6, "image_size": None},
    }
    atomic_torch_save(ckpt, tmp_path / "checkpoint.pt")
    src = load_encoder_source(tmp_path / "checkpoint.pt")
    assert src.train_data == str(folder) and src.optimizer_state is not None and src.encoder.trained_stage == 1
    inv = Inverter(G, tmp_path / "checkpoint.pt", stages=("refine",), perceptual="none", identity="none",
                   refine={"num_random": 3, "steps": 3})  # fmt: skip
    ref = inv.refiner
    assert ref is not None and ref.lr == 5e-4
    assert len(ref.data) == 10 and inv.describe()["refine"]["optimizer_state"] == "restored"
    steps = {int(s["step"]) for s in ref.optimizer.state.values()}
    assert steps == {3}
    first = next(iter(ref.optimizer.state.values()))["exp_avg"].clone()
    res = inv.invert(tiny["target"])
    assert {int(s["step"]) for s in ref.optimizer.state.values()} == {3}  # reset after the image
    assert torch.equal(next(iter(ref.optimizer.state.values()))["exp_avg"], first)
    assert res.refine["updates"] == 2


def test_refine_without_training_images_says_so(tiny):
    with pytest.raises(CycleEncodingError, match=r"needs the encoder's training images.*--train-data"):
        Inverter(tiny["G"], tiny["E"], stages=("encoder", "refine"), perceptual="none", identity="none")
    with pytest.raises(CycleEncodingError, match=r"no-such-folder.*--train-data"):
        Inverter(tiny["G"], tiny["E"], stages=("refine",), perceptual="none", identity="none",
                 train_data="/tmp/no-such-folder")  # fmt: skip


def test_projector_schedule_and_noise_regularization():
    c = ProjectConfig(steps=100)
    assert learning_rate(0, c) == 0.0
    assert learning_rate(5, c) == pytest.approx(0.01)  # end of the ramp-up (t = 0.05)
    assert learning_rate(50, c) == pytest.approx(0.01)
    assert learning_rate(90, c) == pytest.approx(0.01 * (0.5 - 0.5 * math.cos(0.4 * math.pi)))
    assert learning_rate(2, c) == pytest.approx(0.01 * 0.4)
    # a checkerboard correlates -1 with both one-pixel shifts at 4x4: (-1)^2 + (-1)^2; a constant map +1 likewise
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1
    assert float(noise_regularization([checker.view(1, 1, 4, 4)])) == pytest.approx(2.0)
    # at 16x16 a constant map counts at 16, 8 (two scales: pooling stops at 8)
    assert float(noise_regularization([torch.ones(1, 1, 16, 16)])) == pytest.approx(4.0)


def test_projector_finds_a_w_code(tiny):
    G, x = tiny["G"], tiny["target"]
    before = {k: v.clone() for k, v in G.state_dict().items()}
    r = project_w(G, x, LossNetworks(tiny["P"]), ProjectConfig(steps=60, l2_lambda=1.0, w_avg_samples=2000), seed=3)
    assert torch.allclose(r.pivot, r.pivot[:, :1].expand_as(r.pivot))  # W: one code on every layer
    start = G.w_avg.view(1, 1, -1).expand(1, G.num_ws, -1)
    assert (render(G, r.pivot) - x).square().mean() < 0.7 * (render(G, start) - x).square().mean()
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    with pytest.raises(CycleEncodingError, match="perceptual distance"):
        project_w(G, x, LossNetworks(), ProjectConfig(steps=2))


def test_tune_lowers_error_below_the_pivot(tiny):
    G, E, x, P = tiny["G"], tiny["E"], tiny["target"], tiny["P"]
    pivot = encoder_pivot(E, x)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    r = pivotal_tune(G, pivot, x, LossNetworks(P), TuneConfig(steps=40, lr=3e-3, stop_threshold=None), seed=0)
    err_pivot = float((render(G, pivot) - x).square().mean())
    err_tuned = float((render(r.generator, pivot) - x).square().mean())
    assert err_tuned < 0.3 * err_pivot, (err_pivot, err_tuned)
    assert r.updates == 40 and not r.stopped_early
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())  # the original is not changed
    tuned = r.generator.state_dict()
    assert all(torch.equal(before[k], tuned[k]) for k in before if k.startswith("style."))  # mapping: no gradient


def test_tune_early_stop_fires_at_the_threshold(tiny):
    G, E, x, P = tiny["G"], tiny["E"], tiny["target"], tiny["P"]
    pivot = encoder_pivot(E, x)
    p0 = float(P(render(G, pivot), x)[0])
    thr = 0.5 * p0
    r = pivotal_tune(G, pivot, x, LossNetworks(P), TuneConfig(steps=300, lr=3e-3, stop_threshold=thr), seed=0)
    assert r.stopped_early and 0 < r.updates < 300
    vals = [rec["perceptual"] for rec in r.losses]
    assert vals[-1] <= thr and all(v > thr for v in vals[:-1]) and len(vals) == r.updates + 1
    # the returned generator is the one that met the threshold (measured here again)
    assert float(P(render(r.generator, pivot), x)[0]) == pytest.approx(vals[-1], rel=1e-5)


def test_locality_regularizer_keeps_generator_close_near_the_pivot(tiny):
    G, x, P = tiny["G"], tiny["target"], tiny["P"]
    with torch.no_grad():
        pivot = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(5)), truncation=0.8)
    # alpha scaled to this tiny G's codes (||w_z - w_p|| is about 10 here; about 30 is "near" for FFHQ's)
    alpha = 3.0
    codes = locality_codes(G, pivot, 32, alpha, 0.5, cpu_generator(99))  # other draws than the tuning's
    drift = {}
    for on in (False, True):
        cfg = TuneConfig(steps=40, lr=3e-3, stop_threshold=None, locality=on, locality_alpha=alpha)
        r = pivotal_tune(G, pivot, x, LossNetworks(P), cfg, seed=1)
        with torch.no_grad():
            new, old = r.generator.synthesis(codes, noise_mode="none"), G.synthesis(codes, noise_mode="none")
        drift[on] = float((new - old).square().mean())
        assert any("locality" in rec for rec in r.losses) == on
    assert drift[True] < 0.8 * drift[False], drift
