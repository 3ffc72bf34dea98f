"""CUDA paths: run where a GPU exists (skipped on CPU-only machines such as CI)."""

from __future__ import annotations

import pytest
import torch

import cycle_encoding as ce
from cycle_encoding import Discriminator, DiscriminatorConfig
from cycle_encoding.utils import resolve_device
from tests.conftest import make_tiny_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("fused", [False, True])
def test_generator_on_cuda_matches_cpu(tmp_path, fused):
    G = make_tiny_generator(resolution=64)
    ce.save_generator(G, tmp_path / "g.safetensors")
    Gc = ce.load_generator(tmp_path / "g.safetensors", device="cuda")
    assert Gc.w_avg.is_cuda and resolve_device("auto").type == "cuda"
    G.set_fused_modconv(fused)
    Gc.set_fused_modconv(fused)
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        ref = G(z, truncation=0.7)
        got = Gc(z.cuda(), truncation=0.7).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_discriminator_r1_on_cuda():
    D = Discriminator(DiscriminatorConfig(resolution=32, channel_base=512, channel_max=32)).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda", requires_grad=True)
    (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    assert all(p.grad is not None for n, p in D.named_parameters() if n.endswith("weight"))


def test_encoder_training_steps_on_cuda(tmp_path):
    from cycle_encoding.training.encoder_trainer import EncoderTrainer, load_train_config
    from cycle_encoding.utils import save_image

    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, tmp_path / "g.safetensors")
    (tmp_path / "data").mkdir()
    with torch.no_grad():
        for i, im in enumerate(G(torch.randn(8, G.z_dim)).clamp(-1, 1)):
            save_image(im, tmp_path / "data" / f"{i}.png")
    cfg = load_train_config(dict(
        generator=str(tmp_path / "g.safetensors"), data=str(tmp_path / "data"), out=str(tmp_path / "runs"),
        preset="e4e", total_steps=40, max_steps=4, batch_size=4, perceptual="none", val_count=2, r1_every=2,
        encoder={"widths": [8, 16, 16, 32], "units": [1, 1, 1, 1]}, device="cuda",
    ))  # fmt: skip
    t = EncoderTrainer(cfg, quiet=True)
    assert t.E.latent_avg.is_cuda and t.D.mlp[0].weight.is_cuda
    summary = t.run()
    t.close()
    assert summary["step"] == 4 and (t.run_dir / "encoder.safetensors").is_file()
