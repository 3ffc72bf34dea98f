"""StyleGAN2 generator and discriminator: shapes, ranges, truncation, noise, mixing, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from cycle_encoding import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig
from tests.conftest import make_tiny_generator, tiny_generator_config


@pytest.mark.parametrize(
    "resolution,img_channels",
    [(8, 3), (16, 1), (32, 3), (64, 1), (128, 3), (256, 3), (512, 1), (1024, 3)],
)
def test_shapes_ranges_and_determinism(resolution, img_channels):
    # narrow widths so that even 1024 px runs quickly on a CPU
    cfg = GeneratorConfig(resolution=resolution, style_dim=16, n_mlp=2, channel_base=2048, channel_max=8,
                          img_channels=img_channels)  # fmt: skip
    torch.manual_seed(0)
    G = Generator(cfg).eval()
    G.compute_w_avg(500)
    assert G.num_ws == 2 * int(math.log2(resolution)) - 2
    assert G.resolution == resolution
    z = torch.randn(2, 16)
    with torch.no_grad():
        ws = G.mapping(z, truncation=0.7)
        assert ws.shape == (2, G.num_ws, 16)
        img = G.synthesis(ws, noise_mode="const")
        img2 = G.synthesis(ws, noise_mode="const")
    assert img.shape == (2, img_channels, resolution, resolution)
    assert torch.isfinite(img).all()
    # a freshly initialised generator's output has unit-order magnitude (equalized learning rate at work)
    assert 0.05 < img.std().item() < 20
    assert torch.equal(img, img2)  # CPU determinism with constant noise
    # same seed, fresh model: bit-identical
    torch.manual_seed(0)
    G2 = Generator(cfg).eval()
    G2.compute_w_avg(500)
    with torch.no_grad():
        assert torch.equal(G2.synthesis(G2.mapping(z, truncation=0.7)), img)


def test_rosinality_table_reproduced():
    cfg = GeneratorConfig.rosinality(1024, channel_multiplier=2)
    assert cfg.channels() == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    assert cfg.num_ws == 18 and cfg.num_noises == 17
    assert GeneratorConfig.rosinality(256, channel_multiplier=1).channels()[256] == 64


def test_truncation_moves_toward_w_avg(tiny_generator):
    G = tiny_generator
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        w1 = G.mapping(z, truncation=1.0)
        w0 = G.mapping(z, truncation=0.0)
        wh = G.mapping(z, truncation=0.5)
        wc = G.mapping(z, truncation=0.5, truncation_cutoff=3)
    torch.testing.assert_close(w0, G.w_avg.expand_as(w0))
    torch.testing.assert_close(wh, G.w_avg + 0.5 * (w1 - G.w_avg))
    torch.testing.assert_close(wc[:, :3], wh[:, :3])
    torch.testing.assert_close(wc[:, 3:], w1[:, 3:])
    d1 = (w1 - G.w_avg).norm(dim=-1)
    assert torch.all((wh - G.w_avg).norm(dim=-1) < d1)


def test_w_avg_is_mean_of_mapping(tiny_generator):
    G = tiny_generator
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, G.z_dim, generator=g)
    with torch.no_grad():
        ref = G.style(z).double().mean(0).float()
    torch.testing.assert_close(G.w_avg, ref, atol=1e-5, rtol=1e-5)


def test_noise_modes(tiny_generator):
    G = tiny_generator
    ws = G.mapping(torch.randn(2, G.z_dim))
    with torch.no_grad():
        const = G.synthesis(ws, noise_mode="const")
        none = G.synthesis(ws, noise_mode="none")
        torch.manual_seed(1)
        r1 = G.synthesis(ws, noise_mode="random")
        torch.manual_seed(2)
        r2 = G.synthesis(ws, noise_mode="random")
        zero_noise = G.synthesis(ws, noise=[torch.zeros_like(n) for n in G.noise_buffers()])
    assert not torch.allclose(const, none)
    assert not torch.allclose(r1, r2)
    torch.testing.assert_close(none, zero_noise)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="bogus")


def test_style_mixing_takes_layers_from_second_code(tiny_generator):
    G = tiny_generator
    a = G.mapping(torch.randn(3, G.z_dim))
    b = G.mapping(torch.randn(3, G.z_dim))
    mixed = G.style_mix(a, b, torch.tensor([2, 4, G.num_ws]))
    assert torch.equal(mixed[0, :2], a[0, :2]) and torch.equal(mixed[0, 2:], b[0, 2:])
    assert torch.equal(mixed[1, :4], a[1, :4]) and torch.equal(mixed[1, 4:], b[1, 4:])
    assert torch.equal(mixed[2], a[2])
    torch.manual_seed(0)
    ws = G.sample_ws(64, mixing_prob=1.0)
    # with mixing every sample has two distinct codes, layer 0 differs from the last layer
    assert torch.all((ws[:, 0] - ws[:, -1]).abs().sum(-1) > 0)
    ws = G.sample_ws(8, mixing_prob=0.0)
    assert torch.equal(ws[:, 0], ws[:, -1])


def test_bad_inputs_give_clear_errors(tiny_generator):
    G = tiny_generator
    with pytest.raises(ValueError, match=r"z must have shape"):
        G.mapping(torch.randn(2, G.z_dim + 1))
    with pytest.raises(ValueError, match=r"ws must have shape"):
        G.synthesis(torch.randn(2, G.num_ws + 1, G.w_dim))
    with pytest.raises(ValueError, match="power of two"):
        GeneratorConfig(resolution=48)
    with pytest.raises(ValueError, match="img_channels"):
        GeneratorConfig(resolution=32, img_channels=2)


def test_fused_and_unfused_generators_agree(tiny_generator):
    G = tiny_generator
    ws = G.mapping(torch.randn(3, G.z_dim))
    with torch.no_grad():
        a = G.synthesis(ws)
        G.set_fused_modconv(True)
        b = G.synthesis(ws)
        G.set_fused_modconv(False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    G = make_tiny_generator().train().requires_grad_(True)
    ws = G.sample_ws(2, mixing_prob=0.5)
    G.synthesis(ws, noise_mode="random").square().mean().backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


@pytest.mark.parametrize("resolution,img_channels,batch", [(16, 3, 4), (32, 1, 3), (8, 3, 6)])
def test_discriminator_shapes_and_r1_double_backward(resolution, img_channels, batch):
    torch.manual_seed(0)
    D = Discriminator(DiscriminatorConfig(resolution=resolution, channel_base=256, channel_max=32,
                                          img_channels=img_channels))  # fmt: skip
    x = torch.randn(batch, img_channels, resolution, resolution, requires_grad=True)
    logits = D(x)
    assert logits.shape == (batch, 1)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    r1 = grad.pow(2).flatten(1).sum(1).mean()
    r1.backward()  # double backward through blur, leaky ReLU, minibatch stddev
    # every weight takes part (biases after the last smooth op only shift piecewise-linear parts)
    no_grad = [n for n, p in D.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad and all(n.endswith("bias") for n in no_grad)
    assert all(n.startswith(("final_conv", "final_linear")) for n in no_grad)


def test_discriminator_uses_batch_statistics():
    torch.manual_seed(0)
    D = Discriminator(DiscriminatorConfig(resolution=8, channel_base=128, channel_max=16))
    x = torch.randn(4, 3, 8, 8)
    y = x.clone()
    y[3] = torch.randn(3, 8, 8)
    # changing one sample changes the others' logits through the minibatch stddev feature
    assert not torch.allclose(D(x)[0], D(y)[0])


def test_tiny_config_fixture_is_small():
    G = Generator(tiny_generator_config(resolution=32))
    assert sum(p.numel() for p in G.parameters()) < 200_000
