"""Attribute classifier files in the project's format (``.safetensors``, kind ``classifier``): the architecture is
data (``networks.classifier.ClassifierConfig``), built by ``networks.classifier``, and the weights are loaded with
strict key and shape checks; nothing in the file runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..assets import resolve_model
from ..errors import CheckpointError
from ..networks.classifier import SMALL_ARCHS, AttributeClassifier, ClassifierConfig
from .common import check_state_dict
from .native import default_provenance, read_config, read_native, save_native

CLASSIFIER_KIND = "classifier"


def save_classifier(model: AttributeClassifier, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write a classifier in the project's format."""
    return save_native(
        path, CLASSIFIER_KIND, model.config.to_dict(), dict(model.state_dict()), provenance or default_provenance()
    )


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> AttributeClassifier:
    """Read a classifier file (own format, kind ``classifier``; or a shipped model's name), eval mode, frozen."""
    p = resolve_model(path)
    nf = read_native(p, kind=CLASSIFIER_KIND)
    model = AttributeClassifier(read_config(ClassifierConfig, nf.config, p, "classifier"))
    check_state_dict(model, nf.tensors, p, "classifier")
    model.load_state_dict(nf.tensors, strict=True)
    model.name = f"{model.name} from {p.name}"
    return model.to(device).eval().requires_grad_(False)


def load_small_classifier(path: str | Path, device: str | torch.device, what: str) -> AttributeClassifier:
    """A classifier file whose architecture has ``features`` (convnet, vggbn): ``what`` names the asker in errors."""
    model = load_classifier(path, device)
    if model.config.arch not in SMALL_ARCHS:
        raise CheckpointError(
            Path(path), f"{what} needs a {' or '.join(SMALL_ARCHS)} classifier, this one is {model.config.arch}"
        )
    return model
