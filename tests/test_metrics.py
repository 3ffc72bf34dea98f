"""Metrics against independent computations: MSE/PSNR against numpy, SSIM against scikit-image's
structural_similarity, the MS-SSIM size rule, summaries, and the image reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from cycle_encoding.data.images import list_images, read_image
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.metrics import compute_metrics, ms_ssim, mse, psnr, ssim, summarize


def _pair(b: int, c: int, h: int, w: int, noise: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish content (upsampled noise) so SSIM is far from 0 and 1
    base = torch.nn.functional.interpolate(torch.rand(b, c, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    target = base * 2 - 1
    pred = (target + noise * torch.randn(b, c, h, w, generator=g)).clamp(-1, 1)
    return pred, target


def test_mse_and_psnr_against_numpy():
    pred, target = _pair(3, 3, 24, 20)
    p, t = pred.double().numpy(), target.double().numpy()
    want_mse = ((p - t) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(mse(pred, target).numpy(), want_mse, rtol=1e-5)
    # PSNR on [-1, 1] with peak-to-peak 2 equals PSNR on [0, 1] with peak 1
    p01, t01 = (p + 1) / 2, (t + 1) / 2
    want_psnr = 10 * np.log10(1.0 / ((p01 - t01) ** 2).reshape(3, -1).mean(1))
    np.testing.assert_allclose(psnr(pred, target).numpy(), want_psnr, rtol=1e-5)
    assert torch.isinf(psnr(target, target)).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_against_scikit_image(channels):
    pred, target = _pair(2, channels, 48, 40, seed=channels)
    got = ssim(pred, target).double().numpy()
    want = []
    for i in range(2):
        a = ((pred[i].double().numpy() + 1) / 2).clip(0, 1)
        b = ((target[i].double().numpy() + 1) / 2).clip(0, 1)
        want.append(
            structural_similarity(
                a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0
            )
        )
    assert 0.2 < min(want) < max(want) < 0.99  # a meaningful range, not a degenerate case
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert torch.allclose(ssim(target, target), torch.ones(2))


def test_ms_ssim_size_rule():
    small_p, small_t = _pair(1, 3, 160, 200)
    with pytest.raises(CycleEncodingError, match=r"needs both sides > 160 px, got 160x200"):
        ms_ssim(small_p, small_t)
    values, notes = compute_metrics(small_p, small_t)
    assert values["ms_ssim"] == [None] and values["ssim"][0] is not None
    assert any(n.startswith("ms_ssim: n/a: MS-SSIM with 5 scales and an 11-px window") for n in notes)
    # 161 px is enough: the value is the standard MS-SSIM, 1 for identical images, lower with more noise
    p1, t = _pair(2, 3, 161, 170, noise=0.05)
    p2, _ = _pair(2, 3, 161, 170, noise=0.3)
    a, b = ms_ssim(p1, t), ms_ssim(p2, t)
    assert a.shape == (2,) and (a > b).all() and (b > 0).all()
    assert torch.allclose(ms_ssim(t, t), torch.ones(2))
    # SSIM itself needs the window
    tiny_p, tiny_t = _pair(1, 1, 8, 8)
    values, notes = compute_metrics(tiny_p, tiny_t)
    assert values["ssim"] == [None] and any("SSIM needs both sides >= 11 px" in n for n in notes)


def test_summarize():
    s = summarize([1.0, 2.0, None, 4.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert summarize([None]) == {"mean": None, "std": None, "n": 0}
    assert summarize([0.5])["std"] == 0.0
    # an infinite PSNR (identical images) is counted, not averaged
    s = summarize([20.0, float("inf"), 30.0])
    assert s == {"mean": 25.0, "std": pytest.approx(np.std([20.0, 30.0], ddof=1)), "n": 2, "infinite": 1}


def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((9, 7), 128, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    (tmp_path / "notes.txt").write_text("x")
    x = read_image(tmp_path / "rgb.png")
    assert x.shape == (3, 9, 7) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), rgb.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    y = read_image(tmp_path / "grey.png")
    assert y.shape == (1, 9, 7)
    np.testing.assert_allclose(y[0].numpy(), grey / 127.5 - 1, atol=1e-6)
    assert torch.equal(read_image(tmp_path / "rgba.png"), x)
    assert torch.equal(read_image(tmp_path / "grey.png", channels=3), y.expand(3, -1, -1))
    assert [p.name for p in list_images(tmp_path)] == ["grey.png", "rgb.png", "rgba.png"]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(CycleEncodingError, match=r"broken\.png: cannot read image"):
        read_image(tmp_path / "broken.png")
