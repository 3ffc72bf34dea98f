"""The shipped Fashion-MNIST classifiers: the files load, match their card's sha256, keep their test accuracy on the
first 2,000 test images; the registered ``fmnist-features`` perceptual and identity terms against a separate
computation on the same network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cycle_encoding.assets import MODELS_DIR, card_sha256, shipped_model_card, shipped_model_path
from cycle_encoding.checkpoints.classifier import load_classifier, save_classifier
from cycle_encoding.checkpoints.native import file_sha256, read_native_header
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.losses.identity import build_identity, identity_names
from cycle_encoding.losses.perceptual import build_perceptual, perceptual_names
from cycle_encoding.networks.classifier import AttributeClassifier, ClassifierConfig

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
NAMES = ["fmnist-eval", "fmnist-features"]  # the classifiers; the generator and encoder: test_shipped_gan.py
MARGIN = 0.005


@pytest.mark.parametrize("name", NAMES)
def test_shipped_file_matches_its_card(name: str) -> None:
    path = shipped_model_path(name)
    card = shipped_model_card(name)
    assert path.parent == MODELS_DIR and card.is_file()
    assert file_sha256(path) == card_sha256(card)
    assert path.stat().st_size < 2_000_000
    model = load_classifier(path)
    assert len(model.outputs) == 10 and model.config.input_size == 32 and model.config.in_channels == 1
    n_params = sum(p.numel() for p in model.parameters())
    text = card.read_text()
    assert f"- parameters: {n_params:,}" in text
    assert "cycle-encoding train-classifier" in text and f"{name}.safetensors" in text
    assert read_native_header(path)["provenance"]["parameters"] == n_params


def test_the_two_networks_differ_in_architecture_and_seed() -> None:
    a = read_native_header(shipped_model_path("fmnist-features"))
    b = read_native_header(shipped_model_path("fmnist-eval"))
    assert a["config"]["arch"] != b["config"]["arch"]
    assert a["provenance"]["seed"] != b["provenance"]["seed"]


def test_unknown_shipped_name() -> None:
    with pytest.raises(CycleEncodingError, match="shipped: fmnist-features"):
        shipped_model_path("nope")


@needs_debian
@pytest.mark.parametrize("name", NAMES)
def test_shipped_accuracy_on_2000_test_images(name: str) -> None:
    from cycle_encoding.training.classifier_trainer import evaluate_classifier, load_tensors

    card = shipped_model_card(name).read_text()
    m = re.search(r"^- test accuracy, first 2,000 test images: ([0-9.]+)$", card, re.MULTILINE)
    assert m, "the card gives the accuracy on the first 2,000 test images"
    x, y = load_tensors("fashion-mnist", "test", limit=2000)
    got = evaluate_classifier(load_classifier(shipped_model_path(name)), x, y)["accuracy"]
    assert got >= float(m.group(1)) - MARGIN
    assert got > 0.8


def test_fmnist_features_names_are_registered() -> None:
    assert "fmnist-features" in perceptual_names() and "fmnist-features" in identity_names()


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1).clamp(-1, 1)


def test_fmnist_features_perceptual_matches_a_separate_computation() -> None:
    dist = build_perceptual("fmnist-features")
    assert "fmnist-features" in dist.name and "fmnist-features.safetensors" in dist.name
    net = load_classifier(shipped_model_path("fmnist-features"))
    x, y = images(4, 0), images(4, 1)
    expected = torch.zeros(4)
    with torch.no_grad():
        for fx, fy in zip(net.features(x), net.features(y)):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = (nx - ny).pow(2).sum(1)
            expected += d.flatten(1).mean(1) if d.dim() > 1 else d
    torch.testing.assert_close(dist(x, y), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(dist(x, x), torch.zeros(4), atol=1e-6)
    xg = x.clone().requires_grad_(True)
    dist(xg, y).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in dist.parameters())


def test_fmnist_features_identity_is_the_cosine_of_embeddings() -> None:
    sim = build_identity("fmnist-features")
    net = load_classifier(shipped_model_path("fmnist-features"))
    x, y = images(3, 2), images(3, 3)
    with torch.no_grad():
        expected = F.cosine_similarity(net.embed(x), net.embed(y), dim=1)
    torch.testing.assert_close(sim(x, y), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sim(x, x), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_fmnist_features_accepts_another_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = AttributeClassifier(ClassifierConfig(arch="vggbn", outputs=("a", "b"), input_size=32, in_channels=1,
                                                 widths=(4, 8)))  # fmt: skip
    f = save_classifier(other, tmp_path / "mine.safetensors")
    dist = build_perceptual("fmnist-features", weights=f)
    sim = build_identity("fmnist-features", weights=f)
    assert "mine.safetensors" in dist.name and "mine.safetensors" in sim.name
    x, y = images(2, 4), images(2, 5)
    with torch.no_grad():
        expected = F.cosine_similarity(other.eval().embed(x), other.embed(y), dim=1)
    torch.testing.assert_close(sim(x, y), expected, rtol=1e-5, atol=1e-6)
