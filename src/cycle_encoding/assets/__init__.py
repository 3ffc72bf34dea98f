"""Files shipped with the package (package data): trained models under ``assets/models/``, each with a model card
``NAME-card.md`` (the command that reproduces it, data, steps, wall time and machine, metrics, sha256)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CycleEncodingError

MODELS_DIR = Path(__file__).resolve().parent / "models"
SHIPPED_MODELS: dict[str, str] = {
    "fmnist-features": "Fashion-MNIST feature network (convnet): perceptual / identity-like terms of the domain",
    "fmnist-eval": "Fashion-MNIST evaluation network (vggbn): edit success and the classifier Frechet distance only",
    "fmnist-generator": "Fashion-MNIST StyleGAN2 generator, 32x32, 1 channel (the demo's and the results' generator)",
    "fmnist-encoder": "Fashion-MNIST Cycle Encoding encoder, trained by the rescaled paper schedule on fmnist-generator",
    "fmnist-encoder-e4e": "Fashion-MNIST encoder trained by e4e's schedule on fmnist-generator: a baseline of the results",
    "fmnist-encoder-w": "Fashion-MNIST W encoder (no offsets) trained on fmnist-generator: a baseline of the results",
}
_SHA_LINE = re.compile(r"^- sha256: `([0-9a-f]{64})`", re.MULTILINE)


def shipped_model_path(name: str) -> Path:
    """The file of the shipped model ``name`` (see ``SHIPPED_MODELS``); an error naming the known ones otherwise."""
    if name not in SHIPPED_MODELS:
        raise CycleEncodingError(f"no shipped model {name!r} (shipped: {', '.join(SHIPPED_MODELS)})")
    path = MODELS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise CycleEncodingError(f"{path}: the shipped model {name!r} is missing from this install")
    return path


def shipped_model_card(name: str) -> Path:
    """The model card (Markdown) of the shipped model ``name``."""
    return shipped_model_path(name).with_name(f"{name}-card.md")


def card_sha256(card: str | Path) -> str:
    """The sha256 a model card gives for its file (the line ``- sha256: `HEX```)."""
    text = Path(card).read_text(encoding="utf-8")
    m = _SHA_LINE.search(text)
    if not m:
        raise CycleEncodingError(f"{card}: no '- sha256: `...`' line in the model card")
    return m.group(1)


def resolve_model(path: str | Path) -> Path:
    """``path`` itself when it exists; else, when it is the name of a shipped model (``fmnist-generator``, ...),
    that model's file. Every loader that takes a file calls this, so a shipped name works wherever a file does."""
    p = Path(path)
    if not p.exists() and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(path)):  # Path() turns "://" into ":/"
        url = re.sub(r":/+", "://", str(path), count=1)
        raise CycleEncodingError(f"{url}: URLs are not downloaded: download the file and pass its path")
    if p.exists() or str(path) not in SHIPPED_MODELS:
        return p
    return shipped_model_path(str(path))
