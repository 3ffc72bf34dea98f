"""Frechet distance: closed forms on Gaussians (diagonal, and 2-D non-commuting covariances via the 2x2 trace of a
square root), sample estimates, and the classifier FD helper against features computed separately."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.metrics import (
    classifier_frechet_distance,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
)
from cycle_encoding.networks.classifier import AttributeClassifier, ClassifierConfig


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def closed_form_2d(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """For 2x2 M with positive eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)) (no matrix square root)."""
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_two_dimensional_non_commuting_closed_form() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        s1, s2 = random_spd(rng, 2), random_spd(rng, 2)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        got = frechet_distance_from_stats(mu1, s1, mu2, s2)
        assert got == pytest.approx(closed_form_2d(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
        assert got == pytest.approx(frechet_distance_from_stats(mu2, s2, mu1, s1), rel=1e-9)


def test_diagonal_closed_form_and_identity() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    s = random_spd(rng, 6)
    assert frechet_distance_from_stats(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-8)


def test_sample_estimate_approaches_the_gaussian_value() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.5, -0.5])
    s1, s2 = random_spd(rng, 2), random_spd(rng, 2)
    xa = rng.multivariate_normal(mu1, s1, size=40_000)
    xb = rng.multivariate_normal(mu2, s2, size=40_000)
    truth = closed_form_2d(mu1, s1, mu2, s2)
    assert frechet_distance(xa, xb) == pytest.approx(truth, rel=0.03)
    # the statistics are the sample mean and the unbiased covariance
    mu, cov = feature_stats(torch.from_numpy(xa))
    np.testing.assert_allclose(mu, xa.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, (xa - xa.mean(0)).T @ (xa - xa.mean(0)) / (len(xa) - 1), rtol=1e-9)


def test_bad_shapes_are_one_line_errors() -> None:
    with pytest.raises(CycleEncodingError, match="different sizes"):
        frechet_distance(np.zeros((5, 3)), np.ones((5, 4)))
    with pytest.raises(CycleEncodingError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.ones((5, 3)))


def test_classifier_fd_uses_penultimate_features() -> None:
    torch.manual_seed(0)
    clf = AttributeClassifier(
        ClassifierConfig(arch="vggbn", outputs=tuple("abc"), input_size=16, in_channels=1, widths=(4, 8))
    ).eval()
    a = torch.rand(40, 1, 16, 16) * 2 - 1
    b = (torch.rand(30, 1, 16, 16) * 2 - 1) * 0.5
    out = classifier_frechet_distance(a, b, clf, batch_size=16, name="tiny")
    with torch.no_grad():
        fa = clf.features(a)[-1]
        fb = clf.features(b)[-1]
    assert fa.shape == (40, 8)
    assert out["fd"] == pytest.approx(frechet_distance(fa.numpy(), fb.numpy()), rel=1e-5)
    assert out["dims"] == 8 and out["images_a"] == 40 and out["images_b"] == 30
    assert "not the Inception FID" in out["name"] and "tiny" in out["name"]
    same = classifier_frechet_distance(a, a, clf)
    assert abs(same["fd"]) < 1e-6 < out["fd"]
