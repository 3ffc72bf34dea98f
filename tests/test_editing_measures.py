"""Editability measures: LEC is 0 for an encoder/generator pair that inverts exactly and grows by the edit's size when
the edit is not undone; edit success and preservation against hand computations."""

from __future__ import annotations

import pytest
import torch

from cycle_encoding.editing import (
    Preservation,
    attribute_changes,
    build_preservation,
    direction_lec,
    interfacegan_direction,
    latent_editing_consistency,
    success_summary,
)
from cycle_encoding.editing.measures import preservation_from_module
from cycle_encoding.losses.perceptual import FeatureMapDistance

N, W = 4, 8  # layers and width of the toy code space
C, H = 2, 4  # the toy images: [B, 2, 4, 4] = 32 values = N * W


class LinearPair:
    """A 'generator' ws -> images that is an invertible linear map, and its exact inverse as the 'encoder'."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(N * W, N * W, generator=g, dtype=torch.float64))
        self.A = q  # orthogonal: well conditioned
        self.bias = torch.zeros(N * W, dtype=torch.float64)

    def render(self, ws: torch.Tensor) -> torch.Tensor:
        return (ws.double().flatten(1) @ self.A).reshape(-1, C, H, H)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (images.double().flatten(1) @ self.A.t() + self.bias).reshape(-1, N, W)


@pytest.fixture
def pivots() -> torch.Tensor:
    return torch.randn(5, N, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_lec_is_zero_for_an_exact_inverse(pivots):
    pair = LinearPair()
    ds = interfacegan_direction(torch.randn(W, dtype=torch.float64))
    for a in (-3.0, 0.0, 2.0):
        lec = direction_lec(ds, 0, a, pivots, pair.encode, pair.render, layers=[1, 2])
        assert lec.shape == (5,)
        assert float(lec.max()) < 1e-10


def test_lec_grows_by_the_edit_when_it_is_not_undone(pivots):
    pair = LinearPair()
    v = torch.randn(W, dtype=torch.float64)
    ds = interfacegan_direction(v)
    layers = [0, 3]
    for a in (0.5, 2.0, -4.0):
        lec = direction_lec(ds, 0, a, pivots, pair.encode, pair.render, layers=layers, undo=False)
        # the re-encoded code is the edited one, so the distance is the edit's size |a| * ||v|| * sqrt(#layers)
        want = abs(a) * float(ds.vectors[0].double().norm()) * len(layers) ** 0.5
        torch.testing.assert_close(lec, torch.full((5,), want, dtype=lec.dtype), rtol=1e-5, atol=1e-8)


def test_lec_sees_an_encoder_that_is_off(pivots):
    pair = LinearPair()
    pair.bias = 0.01 * torch.ones(N * W, dtype=torch.float64)  # every re-encoding is shifted
    ds = interfacegan_direction(torch.randn(W, dtype=torch.float64))
    lec = direction_lec(ds, 0, 1.0, pivots, pair.encode, pair.render)
    torch.testing.assert_close(lec, torch.full((5,), 0.01 * (N * W) ** 0.5, dtype=lec.dtype), rtol=1e-6, atol=0)
    # the general form takes any edit and inverse
    lec2 = latent_editing_consistency(pivots, lambda w: 2 * w, pair.encode, pair.render, lambda w: w / 2)
    torch.testing.assert_close(lec2, torch.full((5,), 0.005 * (N * W) ** 0.5, dtype=lec.dtype), rtol=1e-6, atol=0)


def test_edit_success_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    strengths = [-2.0, 0.0, 1.0]
    edited = torch.stack([ref + 0.1 * a for a in strengths], dim=1)  # [3, 3 strengths, C, H, W]
    edited[2, 2] = ref[2] - 0.05  # one edit that went the wrong way

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))

    ch = attribute_changes(score, ref, edited)
    want = torch.tensor([[-0.2, 0.0, 0.1]] * 3)
    want[2, 2] = -0.05
    torch.testing.assert_close(ch, want, atol=1e-6, rtol=0)
    s = success_summary(ch, strengths)["per_strength"]
    assert s[0]["moved_as_asked"] == 1.0 and "moved_as_asked" not in s[1]
    assert abs(s[2]["moved_as_asked"] - 2 / 3) < 1e-9
    assert abs(s[0]["score_change"]["mean"] + 0.2) < 1e-6


class TinyFeatures(torch.nn.Module):
    name = "tiny features"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Conv2d(3, 4, 3, padding=1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(self.c(x))]


def test_preservation_measures():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    y = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    mse = build_preservation("mse")
    assert mse.kind == "distance"
    torch.testing.assert_close(mse(x, y), ((x - y) ** 2).mean(dim=(1, 2, 3)))
    assert float(mse(x, x).abs().max()) == 0
    dist = FeatureMapDistance(TinyFeatures())
    p = preservation_from_module(dist)
    assert isinstance(p, Preservation) and p.kind == "distance" and p.name == "feature-maps of tiny features"
    torch.testing.assert_close(p(x, y), dist(x, y))
    assert float(p(x, x).abs().max()) < 1e-6
