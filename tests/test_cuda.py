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
