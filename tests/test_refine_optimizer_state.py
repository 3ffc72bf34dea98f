"""The refinement's Ranger state: read from an e4e-layout ``.pt`` (their ``optimizer`` key, over parameters in their
module order) and mapped by name, strict on mismatches; the companion file of an encoder ``.safetensors`` (bf16);
the substitute (moments estimated from training images) and a fresh Ranger, and which one a run used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cycle_encoding.checkpoints.optimizer import (
    companion_path,
    from_optimizer,
    load_optimizer_state,
    save_optimizer_state,
)
from cycle_encoding.data.datasets import TensorDataset
from cycle_encoding.errors import CheckpointError, CycleEncodingError
from cycle_encoding.inversion import RefineConfig, RegularizedRefiner, load_encoder_source
from cycle_encoding.inversion.common import LossNetworks, cpu_generator, reconstruction_terms, weighted_sum
from cycle_encoding.ops import pool_to
from cycle_encoding.optim import Ranger
from tests.conftest import make_tiny_generator
from tests.layouts import e4e_encoder_sd, e4e_module_order

BUFFERS = (".running_mean", ".running_var", ".num_batches_tracked")
ARCH = dict(num_ws=8, w_dim=32, input_size=32, widths=(8, 16, 24, 32), units=(1, 1, 1, 1))


# these networks are tiny: a second intra-op thread only adds waiting (7x slower on 2 busy cores)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def their_checkpoint(steps: int = 3, skip_heads: tuple[int, ...] = (7,), lr: float = 1e-3):
    """An e4e training checkpoint as their coach writes it: ``state_dict`` in their module order and ``optimizer``,
    the state_dict of a Ranger built over ``list(encoder.parameters())`` in that same order, after a few steps with
    distinct gradients; the heads in ``skip_heads`` never got a gradient (no state, as in a run that ended before
    them). The param group has e4e's Ranger keys."""
    sd = e4e_module_order(e4e_encoder_sd(**ARCH, seed=5))
    names = [k for k in sd if not k.endswith(BUFFERS)]
    params = [nn.Parameter(sd[k].clone().float()) for k in names]
    opt = Ranger(params, lr=lr)
    g = torch.Generator().manual_seed(9)
    for _ in range(steps):
        for k, p in zip(names, params):
            skipped = any(k.startswith(f"styles.{h}.") for h in skip_heads)
            p.grad = None if skipped else torch.randn(p.shape, generator=g)
        opt.step()
    state = opt.state_dict()
    state["param_groups"] = [
        {"lr": lr, "alpha": 0.5, "k": 6, "step_counter": 0, "betas": (0.95, 0.999), "N_sma_threshhold": 5,
         "eps": 1e-5, "weight_decay": 0, "params": list(range(len(params)))}
    ]  # fmt: skip
    ckpt = {
        "state_dict": {f"encoder.{k}": v for k, v in sd.items()},
        "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 32},
        "latent_avg": torch.zeros(ARCH["num_ws"], ARCH["w_dim"]),
        "global_step": steps,
        "optimizer": state,
    }
    by_name = {names[i]: st for i, st in state["state"].items()}
    return ckpt, by_name


def test_e4e_optimizer_state_is_restored_by_name(tmp_path):
    ckpt, theirs = their_checkpoint()
    torch.save(ckpt, tmp_path / "e4e_run.pt")
    src = load_encoder_source(tmp_path / "e4e_run.pt")
    assert src.optimizer_state is not None and src.optimizer_settings["lr"] == 1e-3
    E = src.encoder
    opt = Ranger(E.parameters())
    opt.load_state_dict(src.optimizer_state.to_state_dict(E))
    restored = 0
    for name, p in E.named_parameters():
        if name.startswith("styles.7."):
            assert not opt.state.get(p), name  # never had a gradient in their run: no state
            continue
        st = opt.state[p]
        assert st["step"] == 3 and torch.equal(st["exp_avg"], theirs[name]["exp_avg"]), name
        assert torch.equal(st["exp_avg_sq"], theirs[name]["exp_avg_sq"]) and torch.equal(
            st["slow_buffer"], theirs[name]["slow_buffer"]
        )
        restored += 1
    assert restored == len(theirs)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["n_sma_threshold"] == 5


def test_e4e_optimizer_state_that_does_not_fit_is_an_error(tmp_path):
    ckpt, _ = their_checkpoint(steps=1, skip_heads=())
    # two entries of different shapes swapped: their order is not this encoder's
    st = ckpt["optimizer"]["state"]
    st[0], st[1] = st[1], st[0]
    torch.save(ckpt, tmp_path / "swapped.pt")
    with pytest.raises(CheckpointError, match=r"swapped\.pt.*entry 0 maps to parameter 'input_layer\.0\.weight'"):
        load_encoder_source(tmp_path / "swapped.pt")
    ckpt, _ = their_checkpoint(steps=1, skip_heads=())
    ckpt["optimizer"]["param_groups"][0]["params"].append(999)  # one parameter more than the encoder has
    torch.save(ckpt, tmp_path / "more.pt")
    with pytest.raises(CheckpointError, match=r"more\.pt.*covers \d+ parameters, the encoder\.\* state dict has"):
        load_encoder_source(tmp_path / "more.pt")


def tiny_setup():
    G = make_tiny_generator(resolution=32)
    with torch.no_grad():
        z = torch.randn(17, G.z_dim, generator=torch.Generator().manual_seed(1))
        imgs = G(z, truncation=0.8).clamp(-1, 1)
    return G, TensorDataset(imgs[:16], name="own images"), imgs[16:]


def test_refinement_restores_the_file_state_for_every_target(tmp_path):
    G, data, x = tiny_setup()
    ckpt, theirs = their_checkpoint()
    torch.save(ckpt, tmp_path / "e4e_run.pt")
    src = load_encoder_source(tmp_path / "e4e_run.pt")
    src.encoder.set_w_avg(G.w_avg)
    ref = RegularizedRefiner(G, src.encoder, data, RefineConfig(), optimizer_state=src.optimizer_state, image_size=32)
    assert ref.optimizer_source == "restored" and ref.lr == 1e-3 and "e4e_run.pt" in ref.optimizer_note
    p = dict(ref.E.named_parameters())["styles.0.linear.weight"]
    first = ref.refine(x, seed=1)
    st = ref.optimizer.state[p]  # after the reset: the file's state again, not the one the refinement left
    assert st["step"] == 3 and torch.equal(st["exp_avg"], theirs["styles.0.linear.weight"]["exp_avg"])
    assert torch.equal(ref.refine(x, seed=1).pivot, first.pivot)
    with pytest.raises(CycleEncodingError, match="holds no optimizer state"):
        RegularizedRefiner(G, src.encoder, data, RefineConfig(optimizer_state="restore"), image_size=32)


def test_companion_file_round_trip_in_bf16(tmp_path):
    ckpt, _ = their_checkpoint(steps=7, skip_heads=())
    torch.save(ckpt, tmp_path / "e4e_run.pt")
    src = load_encoder_source(tmp_path / "e4e_run.pt")
    from cycle_encoding.checkpoints.encoder import save_encoder

    save_encoder(src.encoder, tmp_path / "enc.safetensors")
    save_optimizer_state(companion_path(tmp_path / "enc.safetensors"), src.optimizer_state, src.encoder, torch.bfloat16)
    again = load_encoder_source(tmp_path / "enc.safetensors")
    assert again.optimizer_state is not None and again.optimizer_settings["lr"] == 1e-3
    for name, st in src.optimizer_state.state.items():
        got = again.optimizer_state.state[name]
        assert got["step"] == st["step"] == 7
        torch.testing.assert_close(got["exp_avg"], st["exp_avg"], rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(got["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-2, atol=1e-9)
        # the slow weights are stored as their offset from the weights: far more precise than bf16 weights
        err = (got["slow_buffer"] - st["slow_buffer"]).abs().max()
        assert err <= 1e-2 * (st["slow_buffer"] - dict(src.encoder.named_parameters())[name]).abs().max() + 1e-7
    other = load_encoder_source(tmp_path / "e4e_run.pt").encoder
    other.styles[0].linear.weight.data = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match=r"styles\.0\.linear\.weight"):
        load_optimizer_state(companion_path(tmp_path / "enc.safetensors"), other)


def test_substitute_is_the_mean_of_centralized_gradients_and_keeps_batchnorm(tmp_path):
    G, data, _ = tiny_setup()
    ckpt, _ = their_checkpoint()
    ckpt.pop("optimizer")
    torch.save(ckpt, tmp_path / "no_state.pt")
    src = load_encoder_source(tmp_path / "no_state.pt")
    assert src.optimizer_state is None
    E = src.encoder
    E.set_w_avg(G.w_avg)
    before = {k: v.clone() for k, v in E.state_dict().items()}
    cfg = RefineConfig(substitute_batches=3, num_random=3, noise_mode="const", perceptual_lambda=0.0)
    ref = RegularizedRefiner(G, E, data, cfg, seed=4, image_size=32, source="no_state.pt")
    assert ref.optimizer_source == "substitute" and "no_state.pt holds no optimizer state" in ref.optimizer_note
    assert all(torch.equal(before[k], v) for k, v in ref.E.state_dict().items())  # BatchNorm statistics put back
    # independent computation: the same draws, the mean (and mean square) of the centralized gradient
    gen = cpu_generator(4 * 7_919 + 12_345)
    Ec = load_encoder_source(tmp_path / "no_state.pt").encoder
    Ec.set_w_avg(G.w_avg)
    Ec.stage = "all"
    Ec.train()
    w = Ec.styles[2].convs[0].weight
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for _ in range(3):
        idx = torch.randperm(len(data), generator=gen)[:4]
        batch = data.images[idx]
        y = pool_to(G.synthesis(Ec(batch), noise_mode="const"), 32)
        loss = weighted_sum(reconstruction_terms(y, batch, LossNetworks()), {"l2": 1.0}).mean()
        Ec.zero_grad()
        loss.backward()
        g = w.grad - w.grad.mean(dim=(1, 2, 3), keepdim=True)
        m += g / 3
        v += g * g / 3
    st = ref.optimizer.state[ref.E.styles[2].convs[0].weight]
    torch.testing.assert_close(st["exp_avg"], m, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(st["exp_avg_sq"], v, rtol=1e-4, atol=1e-12)
    assert st["step"] % 6 == 0 and st["step"] >= 1000


def test_a_substitute_estimated_once_serves_another_refiner(tmp_path, monkeypatch):
    """A worker process takes its parent's substitute (through a file, as invert's workers do) instead of estimating
    it again: the same state, tensor for tensor, and the same refined pivot; a restored state is not handed on."""
    G, data, x = tiny_setup()
    ckpt, _ = their_checkpoint()
    ckpt.pop("optimizer")
    torch.save(ckpt, tmp_path / "no_state.pt")
    E = load_encoder_source(tmp_path / "no_state.pt").encoder
    E.set_w_avg(G.w_avg)
    cfg = RefineConfig(substitute_batches=3, num_random=3, noise_mode="const", perceptual_lambda=0.0, steps=3)
    parent = RegularizedRefiner(G, E, data, cfg, seed=4, image_size=32, source="no_state.pt")
    torch.save(parent.substitute_state(), tmp_path / "substitute.pt")
    monkeypatch.setattr(RegularizedRefiner, "_estimate_substitute", lambda self, seed: pytest.fail("estimated again"))
    given = torch.load(tmp_path / "substitute.pt", weights_only=True)
    worker = RegularizedRefiner(G, E, data, cfg, seed=4, image_size=32, source="no_state.pt", substitute=given)
    assert worker.optimizer_source == "substitute" and worker.optimizer_note == parent.optimizer_note
    for p, q in zip(parent.E.parameters(), worker.E.parameters()):
        a, b = parent.optimizer.state[p], worker.optimizer.state[q]
        assert a["step"] == b["step"] and all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "slow_buffer"))
    assert torch.equal(parent.refine(x[:1], seed=1).pivot, worker.refine(x[:1], seed=1).pivot)
    ckpt2, _ = their_checkpoint()
    torch.save(ckpt2, tmp_path / "with_state.pt")
    src = load_encoder_source(tmp_path / "with_state.pt")
    src.encoder.set_w_avg(G.w_avg)
    restored = RegularizedRefiner(G, src.encoder, data, cfg, optimizer_state=src.optimizer_state, image_size=32)
    assert restored.optimizer_source == "restored" and restored.substitute_state() is None


def test_fresh_state_moves_the_encoder_less_than_a_substitute():
    """A fresh Ranger's first steps are small unadapted steps; a state with moments takes full adaptive steps."""
    G, data, x = tiny_setup()
    from cycle_encoding.networks.encoder import Encoder4Editing, EncoderConfig

    torch.manual_seed(0)
    E = Encoder4Editing(EncoderConfig(**ARCH))
    E.set_w_avg(G.w_avg)
    moved = {}
    for choice in ("fresh", "substitute"):
        # one draw of random images for all steps: steps=1 gives the code before any update in the same batch
        cfg = RefineConfig(optimizer_state=choice, steps=6, resample_each_step=False)
        start = RegularizedRefiner(G, E, data, RefineConfig(steps=1, resample_each_step=False), image_size=32)
        out = RegularizedRefiner(G, E, data, cfg, image_size=32).refine(x, seed=1)
        moved[choice] = float((out.pivot - start.refine(x, seed=1).pivot).norm())
    assert moved["substitute"] > 2 * moved["fresh"], moved


def test_state_of_a_live_optimizer_by_name():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = Ranger(lin.parameters())
    lin(torch.randn(5, 3)).sum().backward()
    opt.step()
    st = from_optimizer(opt, lin, "live")
    assert set(st.state) == {"0.weight", "0.bias", "1.weight", "1.bias"} and st.settings["lr"] == 1e-4
