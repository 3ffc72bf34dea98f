"""The resampling and modulation ops against direct reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cycle_encoding.networks.stylegan2 import ModulatedConv2d
from cycle_encoding.ops import Blur, Upsample, fused_leaky_relu, make_kernel, upfirdn2d


def np_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad0: int, pad1: int) -> np.ndarray:
    """Direct loops: zero-insert, pad, true 2-D convolution, decimate (float64)."""
    b, c, h, w = x.shape
    u = np.zeros((b, c, h * up, w * up))
    u[:, :, ::up, ::up] = x
    p = np.pad(u, ((0, 0), (0, 0), (pad0, pad1), (pad0, pad1)))
    kh, kw = k.shape
    oh, ow = p.shape[2] - kh + 1, p.shape[3] - kw + 1
    out = np.zeros((b, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            # convolution: flip the kernel
            out[:, :, i, j] = (p[:, :, i : i + kh, j : j + kw] * k[::-1, ::-1]).sum(axis=(2, 3))
    return out[:, :, ::down, ::down]


def test_upsample_and_blur_equal_numpy_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    up = Upsample([1, 3, 3, 1])
    k1 = np.array([1.0, 3.0, 3.0, 1.0])
    k = np.outer(k1, k1) / np.outer(k1, k1).sum() * 4
    ref = np_upfirdn2d(x.numpy(), k, up=2, down=1, pad0=2, pad1=1)
    got = up(x)
    assert got.shape == (2, 3, 14, 10)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6, rtol=0)
    # an asymmetric kernel catches a missing flip
    ka = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.25, 1.0]], dtype=torch.float64)
    got = upfirdn2d(x, ka, up=2, down=1, pad=(1, 1))
    np.testing.assert_allclose(got.numpy(), np_upfirdn2d(x.numpy(), ka.numpy(), 2, 1, 1, 1), atol=1e-6, rtol=0)


def test_downsampling_and_blur_equal_numpy_reference():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    k1 = np.array([1.0, 3.0, 3.0, 1.0])
    k = np.outer(k1, k1) / np.outer(k1, k1).sum()
    down = upfirdn2d(x, make_kernel([1, 3, 3, 1]), down=2, pad=(1, 1))
    np.testing.assert_allclose(down.numpy(), np_upfirdn2d(x.numpy(), k, 1, 2, 1, 1), atol=1e-6)
    np.testing.assert_allclose(
        Blur([1, 3, 3, 1], pad=(2, 1))(x).numpy(), np_upfirdn2d(x.numpy(), k, 1, 1, 2, 1), atol=1e-6
    )


def test_negative_padding_crops():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    out = upfirdn2d(x, torch.ones(1, 1), pad=(-1, -2))
    assert torch.equal(out, x[:, :, 1:4, 1:4])


def naive_modulated_conv(mc: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per sample: scale the weight by its style, demodulate, plain conv2d (transposed for upsampling)."""
    outs = []
    s = F.linear(style, mc.modulation.weight * mc.modulation.scale, mc.modulation.bias * mc.modulation.lr_mul)
    for b in range(x.shape[0]):
        w = mc.weight[0] * mc.scale * s[b].view(1, -1, 1, 1)
        if mc.demodulate:
            w = w / torch.sqrt((w**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if mc.upsample:
            o = F.conv_transpose2d(x[b : b + 1], w.transpose(0, 1), stride=2)
            o = mc.blur(o)
        else:
            o = F.conv2d(x[b : b + 1], w, padding=mc.kernel_size // 2)
        outs.append(o)
    return torch.cat(outs)


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_modulated_conv_equals_naive_per_sample(upsample, demodulate, fused):
    torch.manual_seed(2)
    k = 1 if (not demodulate and not upsample) else 3
    mc = ModulatedConv2d(6, 5, k, style_dim=8, demodulate=demodulate, upsample=upsample)
    mc.fused = fused
    with torch.no_grad():
        mc.modulation.bias.normal_()
    x = torch.randn(3, 6, 8, 8)
    style = torch.randn(3, 8)
    got = mc(x, style)
    ref = naive_modulated_conv(mc, x, style)
    assert got.shape == ref.shape == (3, 5, 16 if upsample else 8, 16 if upsample else 8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_fused_leaky_relu_formula_and_double_backward():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = fused_leaky_relu(x, b)
    pre = x + b.view(1, -1, 1, 1)
    ref = torch.where(pre >= 0, pre, 0.2 * pre) * np.sqrt(2)
    torch.testing.assert_close(y, ref)
    assert torch.autograd.gradcheck(lambda a, c: fused_leaky_relu(a, c), (x, b))
    assert torch.autograd.gradgradcheck(lambda a, c: fused_leaky_relu(a, c) ** 2, (x, b))


def test_resampling_supports_double_backward():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    up = Upsample([1, 3, 3, 1]).double()
    k = make_kernel([1, 3, 3, 1]).double()
    assert torch.autograd.gradgradcheck(lambda a: upfirdn2d(up(a) ** 2, k, down=2, pad=(1, 1)), (x,))
